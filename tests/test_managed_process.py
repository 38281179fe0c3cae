"""The `process` backend with real processes: readiness, restart after SIGKILL on the same port,
"failed" after repeated crashes with the last lines kept, stop by process group (SIGKILL after
the grace when SIGTERM is ignored), bounded rotating logs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from switchgear.dataplane.managed.backend import ReplicaSpec, State
from switchgear.dataplane.managed.process import ProcessBackend

pytestmark = pytest.mark.timeout(30)

EMULATOR = (sys.executable, "-m", "switchgear", "emulate", "openai", "--instance", "r:1:${PORT}")


def spec(replica_id: str, command: tuple[str, ...], **kw: object) -> ReplicaSpec:
    base: dict[str, object] = {"url": "http://127.0.0.1:${PORT}/v1", "readiness_url": "http://127.0.0.1:${PORT}/v1/models",
                               "readiness_timeout_s": 15.0, "restart_backoff_s": 0.05, "restart_max_backoff_s": 0.2,
                               "stop_grace_s": 2.0}
    return ReplicaSpec(replica_id, "svc", command, **(base | kw))  # type: ignore[arg-type]


async def until(check: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def backend(tmp_path: Path) -> ProcessBackend:
    b = ProcessBackend(tmp_path / "logs")
    yield b  # type: ignore[misc]
    await b.close()


async def test_ready_only_after_its_health_call_answers_and_restarted_on_the_same_port_after_sigkill(
        backend: ProcessBackend, tmp_path: Path) -> None:
    changes: list[State] = []
    backend.on_change = lambda: changes.append(backend.status("replica-a").state)  # type: ignore[union-attr]
    await backend.start(spec("replica-a", EMULATOR))
    status = backend.status("replica-a")
    assert status is not None and status.state is State.STARTING  # not ready before the health call answers
    await until(lambda: backend.status("replica-a").state is State.READY, what="ready")  # type: ignore[union-attr]
    ready = backend.status("replica-a")
    assert ready is not None and ready.url.startswith("http://127.0.0.1:") and ready.pid
    models = urllib.request.urlopen(f"{ready.url}/models", timeout=5).read()
    assert b"data" in models
    os.kill(ready.pid, signal.SIGKILL)
    def restarted() -> bool:
        now = backend.status("replica-a")
        return now is not None and now.restarts > ready.restarts and now.pid not in (0, ready.pid) \
            and now.state is State.READY

    await until(restarted, what="a restart, ready again")
    again = backend.status("replica-a")
    assert again is not None and again.url == ready.url and again.pid != ready.pid
    assert urllib.request.urlopen(f"{again.url}/models", timeout=5).status == 200
    # Every transition was announced (the agent reports at once): ..., ready, restarting, starting, ready.
    assert changes[-4:] == [State.READY, State.RESTARTING, State.STARTING, State.READY], changes
    log = (tmp_path / "logs" / "replica-a.log").read_text()
    assert "exited with status -9" in log  # the supervisor's note between the two runs


async def test_a_replica_that_keeps_crashing_is_failed_with_its_last_lines(backend: ProcessBackend) -> None:
    crash = (sys.executable, "-c", "import sys; print('loading weights'); print('CUDA out of memory'); sys.exit(3)")
    await backend.start(spec("replica-b", crash, max_crashes=3, crash_window_s=60.0))
    await until(lambda: backend.status("replica-b").state is State.FAILED, what="failed")  # type: ignore[union-attr]
    status = backend.status("replica-b")
    assert status is not None
    assert status.restarts == 2 and "3 crashes" in status.message and "exited with status 3" in status.message
    assert "CUDA out of memory" in status.last_log and "loading weights" in status.last_log
    await asyncio.sleep(0.3)  # longer than the backoff: a failed replica is not started again
    assert backend.status("replica-b").restarts == 2  # type: ignore[union-attr]


async def test_stop_kills_the_whole_group_even_when_sigterm_is_ignored(backend: ProcessBackend, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"trap '' TERM; sleep 60 & echo $! > {pids}; wait"
    await backend.start(spec("replica-c", ("sh", "-c", script), stop_grace_s=0.5))
    await until(lambda: pids.exists() and pids.read_text().strip() != "", what="the child's pid")
    child = int(pids.read_text())
    leader = backend.status("replica-c").pid  # type: ignore[union-attr]
    start = time.monotonic()
    await backend.stop("replica-c")
    assert time.monotonic() - start < 3.0
    await until(lambda: not alive(child) and not alive(leader), 3.0, "the group to be gone")
    assert backend.status("replica-c") is None


async def test_logs_rotate_within_their_bound(backend: ProcessBackend, tmp_path: Path) -> None:
    chatty = (sys.executable, "-c", "import sys\nfor i in range(2000): print('line', i, 'x' * 40)\nsys.exit(1)")
    await backend.start(spec("replica-d", chatty, log_bytes=8192, max_crashes=1))
    await until(lambda: backend.status("replica-d").state is State.FAILED, what="the run to end")  # type: ignore[union-attr]
    current, old = tmp_path / "logs" / "replica-d.log", tmp_path / "logs" / "replica-d.log.1"
    assert old.exists()
    assert current.stat().st_size + old.stat().st_size <= 8192
    assert "line 1999" in "\n".join(backend.logs("replica-d"))


async def test_a_command_that_cannot_start_is_a_crash_with_its_reason(backend: ProcessBackend) -> None:
    await backend.start(spec("replica-e", ("/nonexistent/model-server",), max_crashes=2))
    await until(lambda: backend.status("replica-e").state is State.FAILED, what="failed")  # type: ignore[union-attr]
    assert "cannot start" in backend.status("replica-e").message  # type: ignore[union-attr]
