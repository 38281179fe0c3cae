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
from collections.abc import Callable, Mapping

import httpx

from switchgear.dataplane.managed.backend import ReplicaSpec
from switchgear.dataplane.managed.supervisor import READ_CHUNK, LaunchError, Supervised, SupervisingBackend

Process = asyncio.subprocess.Process


class _ProcessReplica(Supervised[Process]):
    async def _launch(self, argv: list[str], env: dict[str, str]) -> Process:
        try:
            return await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as exc:
            raise LaunchError(f"cannot start {argv[0]!r}: {exc.strerror}") from None

    async def _pump(self, run: Process) -> None:
        assert run.stdout is not None
        while data := await run.stdout.read(READ_CHUNK):
            self.log.write(data)

    async def _wait(self, run: Process) -> int:
        return await run.wait()

    @staticmethod
    def _signal(run: Process, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, sig)  # the group id is the pid: start_new_session

    def _terminate(self, run: Process) -> None:
        self._signal(run, signal.SIGTERM)

    def _kill(self, run: Process) -> None:
        self._signal(run, signal.SIGKILL)

    async def _end(self, run: Process, grace_s: float) -> None:
        """TERM the group, KILL it after the grace (a leader that exited may leave children)."""
        self._signal(run, signal.SIGTERM)
        if run.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.wait(), grace_s)
        self._signal(run, signal.SIGKILL)

    def pid(self) -> int:
        run = self.current
        return run.pid if run is not None and run.returncode is None else 0


class ProcessBackend(SupervisingBackend[Process]):
    """Runs replicas as local processes (see the module docstring)."""

    def _make(self, spec: ReplicaSpec, http: httpx.AsyncClient, environ: Mapping[str, str],
              clock: Callable[[], float], on_change: Callable[[], None]) -> Supervised[Process]:
        return _ProcessReplica(spec, self._log_dir, http, environ, clock, on_change)
