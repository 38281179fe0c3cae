"""The `process` backend: each replica a supervised subprocess on the agent's host.

Own process group (a new session): stopping signals the group, so a server's workers go with
it: SIGTERM, then SIGKILL after `stop_grace_s`. stdout and stderr are merged into the replica's
rotated log. Supervision (readiness, restarts with backoff, failed after repeated crashes) is
supervisor.py's, shared with the docker backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping

import httpx

from switchgear.dataplane.managed.backend import ReplicaSpec
from switchgear.dataplane.managed.supervisor import READ_CHUNK, LaunchError, Supervised, SupervisingBackend


class _Run:
    """One started process: its Popen, and a future done when it exits."""

    def __init__(self, popen: subprocess.Popen[bytes], exited: asyncio.Future[None]) -> None:
        self.popen = popen
        self.exited = exited

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode


class _ProcessReplica(Supervised[_Run]):
    async def _launch(self, argv: list[str], env: dict[str, str]) -> _Run:
        # subprocess.Popen, not the event loop's subprocess_exec: Popen starts the child with
        # vfork, which runs no fork handlers. uvloop's fork() runs gRPC's, and a child forked
        # while other threads call into gRPC was seen to die of SIGSEGV before it exec'd.
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as exc:
            raise LaunchError(f"cannot start {argv[0]!r}: {exc.strerror}") from None
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        pidfd = os.pidfd_open(popen.pid)

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)  # readable once the process has exited (Linux 5.3+)
        return _Run(popen, exited)

    async def _pump(self, run: _Run) -> None:
        assert run.popen.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_CHUNK)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), run.popen.stdout)
        try:
            while data := await reader.read(READ_CHUNK):
                self.log.write(data)
        finally:
            transport.close()

    async def _wait(self, run: _Run) -> int:
        await asyncio.shield(run.exited)
        return run.popen.wait()  # reaps it: the exit is already known, so this does not block

    @staticmethod
    def _signal(run: _Run, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, sig)  # the group id is the pid: start_new_session

    def _terminate(self, run: _Run) -> None:
        self._signal(run, signal.SIGTERM)

    def _kill(self, run: _Run) -> None:
        self._signal(run, signal.SIGKILL)

    async def _end(self, run: _Run, grace_s: float) -> None:
        """TERM the group, KILL it after the grace (a leader that exited may leave children)."""
        self._signal(run, signal.SIGTERM)
        if run.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.exited), grace_s)
        self._signal(run, signal.SIGKILL)

    def pid(self) -> int:
        run = self.current
        return run.pid if run is not None and run.returncode is None else 0


class ProcessBackend(SupervisingBackend[_Run]):
    """Runs replicas as local processes (see the module docstring)."""

    def _make(self, spec: ReplicaSpec, http: httpx.AsyncClient, environ: Mapping[str, str],
              clock: Callable[[], float], on_change: Callable[[], None]) -> Supervised[_Run]:
        return _ProcessReplica(spec, self._log_dir, http, environ, clock, on_change)
