"""`switchgear agent --workers N`: one agent as N processes sharing its gRPC and HTTP ports.

The supervisor (this process) reserves both ports, then starts N workers. Each worker is a
whole agent (server.build_agent) that binds the same ports with SO_REUSEPORT, so the kernel
spreads new connections over the workers (by a hash of the connection's addresses: a client
that keeps one connection stays on one worker); with `--worker-spread even` (the default) a
worker holding more connections than another passes new ones to it (switchgear/rpc/spread.py,
over tables and sockets in the supervisor's private directory). The supervisor starts a worker that exits again
(0.2 s later, doubling to 5 s while it keeps dying young), stops all on SIGTERM or SIGINT, and
serves the one /metrics (worker_metrics.py).

One snapshot subscription per worker, not one shared: each worker is then an ordinary agent
(its own subscription, ACKs and load reports, with nothing new on the wire and no shared memory
between processes), and the load a worker reports is the load it carries. The control plane
sees N agents named `<node id>/w0` ... `/w<N-1>` (ListAgents sorts them together); N streams
and N reports per interval are small next to the calls N workers serve.

Per-worker state: routing statistics, breakers, outlier ejection and the memory cache are each
worker's. Quota counters and the response cache are shared through Redis (`--redis`), exactly
as between agents; without Redis, each worker counts alone, so a tenant's limit holds per
worker (up to N times it across the agent) and a cached answer is only served by the worker
that stored it; the supervisor says so in its log.

A worker learns its settings from a pickled `WorkerPlan` on its stdin (not argv: the agent
token is in it) and keeps that pipe open: when the supervisor dies, even by SIGKILL, the pipe
closes and the worker stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copyreg
import dataclasses
import io
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry

from switchgear import metrics_http
from switchgear.dataplane.server import Announce, Options, default_node_id, serve
from switchgear.dataplane.worker_metrics import WorkersCollector
from switchgear.rpc.spread import SPREADS, Group, create_table, held, mark_down

log = logging.getLogger("switchgear.dataplane.workers")

MAX_WORKERS = 256
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
RESTART_DELAY_S = (0.2, 5.0)  # first delay, and the most it doubles to
YOUNG_S = 10.0  # a worker that dies younger than this waits longer before its next start
WORKER_ENTRY = "from switchgear.cli import agent_worker; agent_worker()"


def workers_arg(text: str) -> int:
    """--workers: a whole number from 1 to MAX_WORKERS, or "auto" (the cores this process may use)."""
    if text == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number from 1 to {MAX_WORKERS}, got {text!r}")
    return int(text)


class WorkerFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class WorkerPlan:
    """What a worker process runs: its agent options, its index and its log level."""

    options: Options
    index: int
    log_level: str


def reserve(address: str) -> tuple[socket.socket, str]:
    """Bind (not listen) `address` with SO_REUSEPORT: port 0 becomes a real port the workers all
    bind, and the port stays this agent's while workers restart. OSError when it is taken."""
    host, _, port_text = address.rpartition(":")
    bare = host.strip("[]")
    if bare in ("", "*", "0.0.0.0", "::"):
        family, ip = (socket.AF_INET6, "::") if bare == "::" else (socket.AF_INET, "0.0.0.0")
    else:
        family, _, _, _, sockaddr = socket.getaddrinfo(bare, None, type=socket.SOCK_STREAM)[0]
        ip = str(sockaddr[0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((ip, int(port_text)))
    except OSError:
        sock.close()
        raise
    return sock, f"{host}:{sock.getsockname()[1]}"


def _reserved(stack: contextlib.ExitStack, flag: str, address: str) -> str:
    if not address:
        return address
    try:
        sock, bound = reserve(address)
    except OSError as exc:
        raise WorkerFailed(f"{flag} {address}: {exc.strerror}") from None
    stack.callback(sock.close)
    return bound


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    delay_s: float = RESTART_DELAY_S[0]
    address: str = ""
    http_address: str = ""


class Supervisor:
    """Runs `workers` agent processes for `options` (see the module docstring)."""

    def __init__(self, options: Options, workers: int, log_level: str = "info", spread: str = "even") -> None:
        if spread not in SPREADS:
            raise ValueError(f"--worker-spread must be one of {', '.join(SPREADS)}, got {spread!r}")
        self.options = options
        self.count = workers
        self.log_level = log_level
        self.spread = spread
        self._doors: tuple[str, ...] = ()  # the doors whose connections are spread evenly
        self._sockets = ""
        self.restarts = 0
        self._workers = [_Worker(k) for k in range(workers)]
        self._plans: list[WorkerPlan] = []
        self._background: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event, announce: Announce | None = None) -> None:
        """Serve until `stop` is set; once every worker serves, `announce` gets the addresses.
        WorkerFailed when a port is taken or a worker cannot start."""
        with contextlib.ExitStack() as stack:
            options = self._reserve(stack)
            sockets = Path(tempfile.mkdtemp(prefix="switchgear-workers-"))  # 0700: only this user
            stack.callback(shutil.rmtree, sockets, True)
            self._sockets = str(sockets)
            self._doors = self._spread_doors(options)
            for door in self._doors:
                create_table(self._sockets, door, self.count)
            self._plans = [self._plan(options, k, sockets) for k in range(self.count)]
            if not options.redis_url:
                log.warning("%d workers without --redis: quota counters and the response cache are each "
                            "worker's own, so a tenant's limit holds per worker (up to %d times it in all)",
                            self.count, self.count)
            try:
                await self._start_all()
                metrics = self._serve_metrics(stack)
                for worker in self._workers:
                    self._keep(worker, stop)
                _announce(announce or Announce(), self._workers[0], metrics)
                await stop.wait()
            finally:
                stop.set()
                await self._stop_all()

    async def _start_all(self) -> None:
        """Start every worker; the first that fails cancels the others' starts (WorkerFailed)."""
        try:
            async with asyncio.TaskGroup() as group:
                for worker in self._workers:
                    group.create_task(self._start(worker))
        except* WorkerFailed as failed:
            raise failed.exceptions[0] from None

    def _reserve(self, stack: contextlib.ExitStack) -> Options:
        listen = _reserved(stack, "--listen", self.options.listen)
        http_listen = _reserved(stack, "--http-listen", self.options.http_listen)
        return dataclasses.replace(self.options, reuse_port=True, listen=listen, http_listen=http_listen)

    def _plan(self, options: Options, k: int, sockets: Path) -> WorkerPlan:
        base = options.node_id or default_node_id()
        metrics_socket = str(sockets / f"w{k}.sock") if options.metrics_listen else ""
        spread = Group(str(sockets), k, self.count) if self._doors else None
        return WorkerPlan(dataclasses.replace(options, node_id=f"{base}/w{k}", metrics_listen="",
                                              metrics_socket=metrics_socket, spread=spread), k, self.log_level)

    def _spread_doors(self, options: Options) -> tuple[str, ...]:
        """The doors whose connections the workers pass to each other (switchgear.rpc.spread)."""
        if self.spread != "even":
            return ()
        doors = ("http",) if options.http_listen else ()
        if options.grpc_server == "switchgear":
            return ("grpc", *doors)
        log.warning("--worker-spread even with --grpc-server %s: gRPC connections stay on the worker the "
                    "kernel gives them (grpc core accepts them itself); only the HTTP door's are spread",
                    options.grpc_server)
        return doors

    def _serve_metrics(self, stack: contextlib.ExitStack) -> str | None:
        if not self.options.metrics_listen:
            return None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector([p.options.metrics_socket for p in self._plans], lambda: self.restarts,
                                           connections=self.connections if self._doors else None))
        server, address = metrics_http.serve(registry, self.options.metrics_listen)
        stack.callback(server.shutdown)
        return address

    def connections(self) -> list[tuple[str, int, int]]:
        """(door, worker, connections it serves) for each serving worker on each spread door."""
        return [(door, k, n) for door in self._doors
                for k, n in enumerate(held(self._sockets, door, self.count)) if n is not None]

    async def _start(self, worker: _Worker) -> None:
        """Start worker `worker.index` and wait for its READY (and HTTP) line."""
        loop = asyncio.get_running_loop()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER_ENTRY, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True)  # the terminal's Ctrl-C reaches the supervisor, which stops the workers
        worker.proc, worker.started = proc, loop.time()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(_pickled(self._plans[worker.index]))
        await proc.stdin.drain()  # and the pipe stays open: its end tells the worker to stop
        try:
            await asyncio.wait_for(self._ready(worker, proc.stdout), READY_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            raise WorkerFailed(f"worker w{worker.index} was not ready within {READY_TIMEOUT_S:g} s") from None
        self._spawn(_drain(proc.stdout))
        log.info("worker w%d (pid %d) serving", worker.index, proc.pid)

    async def _ready(self, worker: _Worker, stdout: asyncio.StreamReader) -> None:
        while not worker.address or (self.options.http_listen and not worker.http_address):
            line = (await stdout.readline()).decode(errors="replace")
            if not line:
                assert worker.proc is not None
                code = await worker.proc.wait()
                raise WorkerFailed(f"worker w{worker.index} exited with code {code} before it was ready "
                                   "(its log above says why)")
            kind, _, rest = line.strip().partition(" ")
            if kind == "READY":
                worker.address = rest
            elif kind == "HTTP":
                worker.http_address = rest

    def _keep(self, worker: _Worker, stop: asyncio.Event) -> None:
        self._spawn(self._restart_loop(worker, stop))

    async def _restart_loop(self, worker: _Worker, stop: asyncio.Event) -> None:
        """Start `worker` again whenever it exits, until `stop`."""
        loop = asyncio.get_running_loop()
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            for door in self._doors:  # the others stop passing it connections
                mark_down(self._sockets, door, self.count, worker.index)
            if stop.is_set():
                return
            young = loop.time() - worker.started < YOUNG_S
            worker.delay_s = min(worker.delay_s * 2, RESTART_DELAY_S[1]) if young else RESTART_DELAY_S[0]
            log.warning("worker w%d (pid %d) exited with code %s; starting it again in %.1f s",
                        worker.index, worker.proc.pid, code, worker.delay_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), worker.delay_s)
                return
            self.restarts += 1
            worker.address = worker.http_address = ""
            try:
                await self._start(worker)
            except WorkerFailed as exc:
                log.error("%s", exc)

    async def _stop_all(self) -> None:
        procs = [w.proc for w in self._workers if w.proc is not None and w.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_TIMEOUT_S)
        except TimeoutError:
            for proc in procs:
                if proc.returncode is None:
                    log.warning("worker pid %d did not stop within %g s: killed", proc.pid, STOP_TIMEOUT_S)
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _pickled(plan: WorkerPlan) -> bytes:
    """The plan's bytes; read-only mappings (in the resilience settings) go as mappingproxy(dict)."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out)
    pickler.dispatch_table = {**copyreg.dispatch_table, MappingProxyType: _mappingproxy}
    pickler.dump(plan)
    return out.getvalue()


def _mappingproxy(value: MappingProxyType[Any, Any]) -> tuple[Callable[..., Any], tuple[dict[Any, Any]]]:
    return _read_only, (dict(value),)


def _read_only(value: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(value)


async def _drain(stdout: asyncio.StreamReader) -> None:
    while await stdout.read(1 << 12):
        pass


def _announce(announce: Announce, first: _Worker, metrics: str | None) -> None:
    for call, value in ((announce.ready, first.address), (announce.http, first.http_address or None),
                        (announce.metrics, metrics)):
        if call is not None and value:
            call(value)


# --- the worker process ---------------------------------------------------------------------------

def worker_main() -> Coroutine[Any, Any, None]:
    """A worker: read its WorkerPlan from stdin; the coroutine serves until SIGTERM or the end of
    stdin (the CLI's `agent_worker` runs it on the agent's event loop)."""
    plan: WorkerPlan = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=getattr(logging, plan.log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s w{plan.index} %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        threading.Thread(target=_stop_at_eof, args=(loop, stop), daemon=True).start()
        await serve(plan.options, stop, _line("READY"), _line("HTTP"))

    return run()


def _line(prefix: str) -> Callable[[str], None]:
    def say(address: str) -> None:
        print(f"{prefix} {address}", flush=True)

    return say


def _stop_at_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The supervisor holds our stdin open while it lives: its end means the supervisor is gone."""
    with contextlib.suppress(OSError, ValueError):
        while sys.stdin.buffer.read(1 << 12):
            pass
    with contextlib.suppress(RuntimeError):  # the loop already closed
        loop.call_soon_threadsafe(stop.set)
