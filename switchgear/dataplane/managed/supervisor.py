"""What every replica backend shares: supervision, readiness, logs, the backend's bookkeeping.

A `Supervised` replica runs `_once` (start, pump output, poll readiness, wait for the end,
clean up) in a loop:

- Output goes to `<log_dir>/<replica>.log`, rotated to `.log.1` when the file reaches half of
  `log_bytes` (so both files together stay within it); the last `TAIL_LINES` lines (each cut to
  `TAIL_LINE_CHARS`) are kept in memory for status reports.
- Ready once a GET of the readiness URL answers 2xx; not ready within `readiness_timeout_s`
  counts as a crash (the replica is killed).
- A crash (exit, or no readiness in time) restarts it after an exponential backoff
  (`restart_backoff_s` doubling up to `restart_max_backoff_s`; reset once it had been ready);
  `max_crashes` crashes within `crash_window_s` make it "failed": not restarted again, its last
  lines kept.
- The port: the spec's, else one picked free at the first start and kept across restarts (the
  replica's URL must not change under the routes that name it).

Subclasses say how to launch, pump, wait for, kill and clean up one run (process.py, docker.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Generic, TypeVar

import httpx

from switchgear.dataplane.managed.backend import ReplicaSpec, ReplicaStatus, State, fill_port

log = logging.getLogger("switchgear.dataplane.managed")

TAIL_LINES = 20
TAIL_LINE_CHARS = 500
READ_CHUNK = 64 * 1024
READINESS_INTERVAL_S = 0.1

H = TypeVar("H")


class LaunchError(Exception):
    """A run could not start; the message says why (it counts as a crash)."""


def free_port() -> int:
    """A port free on 127.0.0.1 now (another process may take it before the replica binds it;
    the replica then exits, which is a crash like any other and restarts on the same port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ReplicaLog:
    """A replica's output: a rotating file pair and the last lines in memory."""

    def __init__(self, path: Path, limit_bytes: int) -> None:
        self.path = path
        self.limit = max(1, limit_bytes // 2)
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = b""
        self._file = path.open("ab")

    def write(self, data: bytes) -> None:
        if self._file.tell() + len(data) > self.limit:
            self._file.close()
            os.replace(self.path, self.path.with_suffix(".log.1"))
            self._file = self.path.open("ab")
        self._file.write(data[-self.limit:])
        self._file.flush()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-TAIL_LINE_CHARS:]
        for line in lines:
            self.tail.append(line[:TAIL_LINE_CHARS].decode("utf-8", "replace"))

    def note(self, text: str) -> None:
        self.write(f"[switchgear] {text}\n".encode())

    def close(self) -> None:
        self._file.close()


class Supervised(Generic[H]):
    """One supervised replica; `run` is its whole life, until `stop` or failure. `H` is what
    one run is (a process, a container)."""

    def __init__(self, spec: ReplicaSpec, log_dir: Path, http: httpx.AsyncClient, environ: Mapping[str, str],
                 clock: Callable[[], float], on_change: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self.port = spec.port or free_port()
        self.url = fill_port(spec.url, self.port, spec.host)
        self._on_change = on_change
        self._state = State.STARTING
        self.restarts = 0
        self.message = ""
        self.log = ReplicaLog(log_dir / f"{spec.id}.log", spec.log_bytes)
        self._http = http
        self._environ = environ
        self._clock = clock
        self._crashes: collections.deque[float] = collections.deque()
        self.current: H | None = None
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    # --- what a backend says ------------------------------------------------------------------

    async def _launch(self, argv: list[str], env: dict[str, str]) -> H:
        raise NotImplementedError

    async def _pump(self, run: H) -> None:
        """Copy the run's output into self.log until it ends."""
        raise NotImplementedError

    async def _wait(self, run: H) -> int:
        raise NotImplementedError

    async def _end(self, run: H, grace_s: float) -> None:
        """Stop the run (politely, then by force after `grace_s`) and release what it holds."""
        raise NotImplementedError

    def _terminate(self, run: H) -> None:
        """Ask the run to stop (SIGTERM); returns at once."""
        raise NotImplementedError

    def _kill(self, run: H) -> None:
        """Kill the run now (readiness timed out, or it ignored a polite stop); returns at once."""
        raise NotImplementedError

    def pid(self) -> int:
        return 0

    # --- supervision --------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        if value is not self._state:
            self._state = value
            self._on_change()  # the agent reports at once instead of at its next interval

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in self._environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "TMPDIR")}
        base |= {k: self._environ[k] for k in self.spec.inherit_env if k in self._environ}
        return base | {k: fill_port(v, self.port, self.spec.host) for k, v in self.spec.env} | {"PORT": str(self.port)}

    async def run(self) -> None:
        backoff = self.spec.restart_backoff_s
        try:
            while not self.stopping.is_set():
                started = await self._once()
                if self.stopping.is_set():
                    break
                if self._crashed():
                    return
                self.state, self.restarts = State.RESTARTING, self.restarts + 1
                backoff = self.spec.restart_backoff_s if started else backoff
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), backoff)
                backoff = min(backoff * 2, self.spec.restart_max_backoff_s)
        finally:
            if self.state is not State.FAILED:
                self.state = State.STOPPED
            self.log.close()

    def _crashed(self) -> bool:
        """Count a crash; True (state failed) when too many fell in the window."""
        now = self._clock()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.spec.crash_window_s:
            self._crashes.popleft()
        if len(self._crashes) >= self.spec.max_crashes:
            self.state = State.FAILED
            last = f" (last: {self.message})" if self.message else ""
            self.message = f"{len(self._crashes)} crashes within {self.spec.crash_window_s:g} s, not restarted{last}"
            log.warning("replica %s of %s failed: %s", self.spec.id, self.spec.service, self.message)
            return True
        return False

    async def _once(self) -> bool:
        """One run; returns when it is over. True when it had become ready (a crash after
        serving resets the backoff)."""
        argv = [fill_port(arg, self.port, self.spec.host) for arg in self.spec.command]
        self.state = State.STARTING
        try:
            run = await self._launch(argv, self.env())
        except LaunchError as exc:
            self.message = str(exc)
            self.log.note(self.message)
            return False
        self.current = run
        log.info("replica %s of %s started (pid %d, port %d)", self.spec.id, self.spec.service, self.pid(), self.port)
        pump = asyncio.ensure_future(self._pump(run))
        ready = asyncio.ensure_future(self._ready(run))
        try:
            code = await self._wait(run)
        finally:
            ready.cancel()
            await self._end(run, self.spec.stop_grace_s)
            await asyncio.gather(pump, return_exceptions=True)
        became_ready = ready.done() and not ready.cancelled() and ready.result()
        if not self.stopping.is_set():
            self.message = f"exited with status {code}"
            self.log.note(self.message)
            log.warning("replica %s of %s %s", self.spec.id, self.spec.service, self.message)
        return bool(became_ready)

    async def _ready(self, run: H) -> bool:
        """Poll readiness; on success the state is ready; on timeout the run is killed."""
        url = fill_port(self.spec.readiness_url, self.port, self.spec.host)
        deadline = self._clock() + self.spec.readiness_timeout_s
        while self._clock() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                response = await self._http.get(url, timeout=max(0.05, min(2.0, deadline - self._clock())))
                if 200 <= response.status_code < 300:
                    self.state = State.READY
                    log.info("replica %s of %s ready at %s", self.spec.id, self.spec.service, self.url)
                    return True
            await asyncio.sleep(READINESS_INTERVAL_S)
        self.message = f"not ready within {self.spec.readiness_timeout_s:g} s"
        self.log.note(self.message)
        self._kill(run)
        return False

    async def stop(self) -> None:
        """Stop for good: politely, then by force once `stop_grace_s` has passed."""
        self.stopping.set()
        run = self.current
        if self.task is None:
            return
        if run is not None:
            self._terminate(run)
        done, _ = await asyncio.wait({self.task}, timeout=self.spec.stop_grace_s)
        if not done and run is not None:
            self._kill(run)  # it ignored the polite stop for the whole grace
        await asyncio.gather(self.task, return_exceptions=True)

    def status(self) -> ReplicaStatus:
        tail = tuple(self.log.tail) if self.state in (State.FAILED, State.RESTARTING) else ()
        return ReplicaStatus(self.spec.id, self.spec.service, self.state, self.url, self.restarts, tail, self.message,
                             self.pid())


class SupervisingBackend(Generic[H]):
    """start/stop/status/logs over `Supervised` replicas. Use from one event loop."""

    def __init__(self, log_dir: Path, *, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log_dir = log_dir
        self._environ = dict(os.environ if environ is None else environ)
        self._clock = clock
        self._http = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        self._replicas: dict[str, Supervised[H]] = {}
        self.on_change: Callable[[], None] = lambda: None  # called on every replica's state change

    def _make(self, spec: ReplicaSpec, http: httpx.AsyncClient, environ: Mapping[str, str],
              clock: Callable[[], float], on_change: Callable[[], None]) -> Supervised[H]:
        raise NotImplementedError

    async def start(self, spec: ReplicaSpec) -> None:
        if spec.id in self._replicas:
            return
        self._log_dir.mkdir(parents=True, exist_ok=True)
        replica = self._make(spec, self._http, self._environ, self._clock, lambda: self.on_change())
        replica.task = asyncio.ensure_future(replica.run())
        self._replicas[spec.id] = replica

    async def stop(self, replica_id: str) -> None:
        replica = self._replicas.pop(replica_id, None)
        if replica is not None:
            await replica.stop()
            log.info("replica %s of %s stopped", replica_id, replica.spec.service)

    def status(self, replica_id: str) -> ReplicaStatus | None:
        replica = self._replicas.get(replica_id)
        return None if replica is None else replica.status()

    def logs(self, replica_id: str) -> tuple[str, ...]:
        replica = self._replicas.get(replica_id)
        return () if replica is None else tuple(replica.log.tail)

    def ids(self) -> list[str]:
        return sorted(self._replicas)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(i) for i in list(self._replicas)))
        await self._http.aclose()
