"""`switchgear agent --sched-slice-us N`: the agent process, its threads and its `--workers`
run with the slice asked for (read back from the kernel, sched_getattr); values outside what the
kernel keeps are refused naming the flag."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from switchgear.dataplane import sched_slice
from tests.servers import _children

pytestmark = pytest.mark.timeout(60)


def _kernel_keeps_slices() -> bool:
    """Whether this kernel keeps a task's own slice (Linux 6.12+), tried in a child process."""
    probe = subprocess.run([sys.executable, "-c", "from switchgear.dataplane import sched_slice; "
                            "sched_slice.apply(300)"], capture_output=True, text=True, check=False)
    return probe.returncode == 0


needs_slices = pytest.mark.skipif(not _kernel_keeps_slices(), reason="the kernel keeps no per-task slice (< 6.12)")


def _slices(pid: int) -> list[int]:
    """The slice (ns) of each thread of `pid`."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.append(sched_slice.current_ns(int(task.name)))
        except OSError:  # a thread that ended meanwhile
            continue
    return found


def _agent(tmp_path: Path, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "switchgear", "agent", "--control-plane", "127.0.0.1:9",
                             "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--log-level", "warning",
                             *flags], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.mark.parametrize("value", ["50", "-1", "100001", "lots"])
def test_a_slice_the_kernel_would_not_keep_is_refused_naming_the_flag(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from switchgear.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["agent", "--control-plane", "127.0.0.1:9", "--sched-slice-us", value])
    assert exited.value.code == 2 and "--sched-slice-us" in capsys.readouterr().err


@needs_slices
def test_an_agent_and_each_of_its_threads_run_with_the_slice_asked_for(tmp_path: Path) -> None:
    assert sched_slice.current_ns() != 200_000  # (this test's own process keeps the kernel's)
    agent = _agent(tmp_path, "--sched-slice-us", "200")
    try:
        deadline = time.monotonic() + 30
        while len(threads := _slices(agent.pid)) < 2 or set(threads) != {200_000}:  # main thread and those it started
            assert agent.poll() is None, "the agent exited"
            assert time.monotonic() < deadline, f"the agent's threads run with slices {threads} (ns)"
            time.sleep(0.05)
    finally:
        _stop(agent)


@needs_slices
def test_the_workers_of_an_agent_inherit_its_slice(tmp_path: Path) -> None:
    agent = _agent(tmp_path, "--sched-slice-us", "300", "--workers", "2")
    try:
        deadline = time.monotonic() + 45
        while len(workers := _children(agent.pid)) < 2 or any(set(_slices(w)) != {300_000} for w in workers):
            assert agent.poll() is None, "the agent exited"
            assert time.monotonic() < deadline, f"workers {workers}: {[_slices(w) for w in workers]}"
            time.sleep(0.1)
        assert set(_slices(agent.pid)) == {300_000}  # and the supervisor itself
    finally:
        _stop(agent)
