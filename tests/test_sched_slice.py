"""`switchgear agent --sched-slice-us N`: the event loop's thread runs with the slice asked for
while two or more upstream attempts overlap and with the kernel's otherwise (read back from the
kernel, sched_getattr); values the kernel would not keep are refused naming the flag."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from switchgear.dataplane import sched_slice

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


def _kernel_keeps_slices() -> bool:
    """Whether this kernel keeps a task's own slice (Linux 6.12+), tried in a child process."""
    probe = subprocess.run([sys.executable, "-c", "from switchgear.dataplane import sched_slice; "
                            "sched_slice.apply(300)"], capture_output=True, text=True, check=False)
    return probe.returncode == 0


needs_slices = pytest.mark.skipif(not _kernel_keeps_slices(), reason="the kernel keeps no per-task slice (< 6.12)")


def _in_a_thread(work: Callable[[], T]) -> T:
    """`work()` on a thread of its own (a slice is per thread: the test's own stay as they are)."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join(timeout=30)
    return out[0]


@pytest.mark.parametrize("value", ["50", "-1", "100001", "lots"])
def test_a_slice_the_kernel_would_not_keep_is_refused_naming_the_flag(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from switchgear.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["agent", "--control-plane", "127.0.0.1:9", "--sched-slice-us", value])
    assert exited.value.code == 2 and "--sched-slice-us" in capsys.readouterr().err


@needs_slices
def test_the_short_slice_holds_while_two_or_more_attempts_overlap() -> None:
    def run() -> list[int]:
        kernels = sched_slice.current_ns()
        busy = sched_slice.BusySlice(200)
        seen = []
        for step in (busy.attempt_started, busy.attempt_started, busy.attempt_started, busy.attempt_ended,
                     busy.attempt_ended, busy.attempt_started, busy.attempt_ended, busy.attempt_ended):
            step(None)
            seen.append(sched_slice.current_ns())
        assert busy.changes == 4 and busy.running == 0  # two overlaps: one change into each, one out
        return [kernels, *seen]

    kernels, *seen = _in_a_thread(run)
    assert kernels != 200_000
    assert seen == [kernels, 200_000, 200_000, 200_000, kernels, 200_000, kernels, kernels]


@needs_slices
def test_an_agent_with_the_flag_starts_on_the_kernels_slice_and_watches_its_attempts(tmp_path: Path) -> None:
    """The flag is checked at start, the process keeps the kernel's slice while nothing overlaps,
    and the agent's attempt observers include the slice's (what the workers of --workers N,
    built from the same options, do too)."""
    from switchgear.dataplane.server import Options, _observed
    from switchgear.dataplane.snapshot import Holder

    agent = subprocess.Popen([sys.executable, "-m", "switchgear", "agent", "--control-plane", "127.0.0.1:9",
                              "--listen", "127.0.0.1:0", "--sched-slice-us", "200", "--log-level", "warning"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline()  # READY once it serves (the control plane need not answer)
        assert line.startswith("READY"), line
        threads = [sched_slice.current_ns(int(t.name)) for t in Path(f"/proc/{agent.pid}/task").iterdir()]
        assert 200_000 not in threads  # idle: the kernel's
    finally:
        agent.terminate()
        agent.wait(timeout=15)
    observed = _observed(Options(control_planes=[], sched_slice_us=200), Holder(), "n")
    assert [o for o in observed.observers if isinstance(o, sched_slice.BusySlice)]
    assert not any(isinstance(o, sched_slice.BusySlice)
                   for o in _observed(Options(control_planes=[]), Holder(), "n").observers)
