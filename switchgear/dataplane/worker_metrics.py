"""One /metrics for an agent run as N worker processes (`switchgear agent --workers N`).

Each worker serves its registry's exposition text on a Unix socket in the supervisor's private
directory (mode 0700, so only this user can connect; no port is opened and nothing is read from
the connection). The supervisor's /metrics asks every worker on each scrape and merges:

- counters, histograms and summaries: summed over the workers, series by series (same name and
  labels). A worker that does not answer counts with what it said last, and a restarted
  worker's last counts are kept in the sum, so the sum never goes backwards (Prometheus would
  read a drop as a counter reset);
- gauges: one series per worker, labelled `worker` ("w0", "w1", ...): a success rate or a
  snapshot version summed over processes would mean nothing; `sum by (...)` adds those that add.

Plus the supervisor's own: switchgear_agent_workers (gauge, workers that answered this scrape),
switchgear_agent_worker_restarts_total and switchgear_worker_attempts_total{worker} (upstream
attempts each worker started, i.e. how the kernel spread the calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

SUMMED_TYPES = frozenset({"counter", "histogram", "summary"})
MAX_SCRAPE_BYTES = 64 * 1024 * 1024  # what the supervisor reads from one worker at most
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


async def serve_worker_metrics(collectors: Sequence[Collector], path: str) -> Callable[[], Awaitable[None]]:
    """Serve `collectors` on the Unix socket `path`: each connection gets `# pid <pid>` and the
    exposition text, then is closed. Returns the coroutine function that stops serving."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(f"# pid {os.getpid()}\n".encode() + generate_latest(registry))
            await writer.drain()
        except OSError:
            pass  # the supervisor gave up on this scrape
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by this worker's previous process
    server = await asyncio.start_unix_server(answer, path)

    async def close() -> None:
        server.close()
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    return close


class LoopTasks(Collector):
    """switchgear_event_loop_tasks: asyncio tasks alive on the agent's event loop (a gauge; the
    soak watches it for leaks). Read from the metrics thread: all_tasks copes with that."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily("switchgear_event_loop_tasks", "asyncio tasks alive on the agent's event loop")
        tasks.add_metric([], float(len(asyncio.all_tasks(self._loop))))
        yield tasks


def scrape(path: str, timeout_s: float) -> tuple[int, list[Metric]] | None:
    """One worker's (pid, families), or None when it does not answer in time (down, restarting)."""
    chunks, size = [], 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            while chunk := sock.recv(1 << 16):
                size += len(chunk)
                if size > MAX_SCRAPE_BYTES:
                    return None
                chunks.append(chunk)
    except OSError:
        return None
    text = b"".join(chunks).decode("utf-8", "replace")
    first, _, rest = text.partition("\n")
    if not first.startswith("# pid "):
        return None
    return int(first[6:]), list(text_string_to_metric_families(rest))


class _Sums:
    """Families in first-seen order, each with its samples summed by (sample name, labels)."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, dict[SampleKey, float]]] = {}

    def add(self, families: Iterable[Metric], summed_only: bool = True) -> None:
        for family in families:
            if summed_only and family.type not in SUMMED_TYPES:
                continue
            _, _, samples = self.families.setdefault(family.name, (family.type, family.documentation, {}))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a start time: the sum of two would mean nothing
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value

    def plus(self, other: _Sums) -> Iterator[Metric]:
        """Every family of both, with the samples of both added up."""
        empty: dict[SampleKey, float] = {}
        for name in dict.fromkeys((*other.families, *self.families)):
            kind, text, _ = self.families.get(name) or other.families[name]
            total: dict[SampleKey, float] = {}
            for sums in (other, self):
                for key, value in (sums.families[name][2] if name in sums.families else empty).items():
                    total[key] = total.get(key, 0.0) + value
            metric = Metric(name, text, kind)
            for (sample_name, labels), value in total.items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


class WorkersCollector(Collector):
    """The supervisor's /metrics (see the module docstring). `paths[k]` is worker k's socket;
    `restarts` returns how many times workers were started again. Thread-safe (scrapes come
    from the metrics server's thread)."""

    def __init__(self, paths: Sequence[str], restarts: Callable[[], int], timeout_s: float = 2.0,
                 connections: Callable[[], Iterable[tuple[str, int, int]]] | None = None) -> None:
        self._paths = list(paths)
        self._restarts = restarts
        self._connections = connections  # (door, worker, open connections) with --worker-spread even
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._last: dict[int, tuple[int, list[Metric]]] = {}  # worker -> (pid, families) it answered last
        self._carried = _Sums()  # counts of workers' earlier processes

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            answered = self._scrape_all()
            sums = _Sums()
            for _pid, families in self._last.values():
                sums.add(families)
            yield from sums.plus(self._carried)
            yield from _per_worker_gauges(answered)
            yield from self._own(len(answered))

    def _scrape_all(self) -> dict[int, list[Metric]]:
        answered = {}
        for k, path in enumerate(self._paths):
            got = scrape(path, self._timeout_s)
            if got is None:
                continue
            pid, families = got
            previous = self._last.get(k)
            if previous is not None and previous[0] != pid:
                self._carried.add(previous[1])  # a new process: the old one's counts stay in the sum
            self._last[k] = got
            answered[k] = families
        return answered

    def _own(self, serving: int) -> Iterator[Metric]:
        workers = GaugeMetricFamily("switchgear_agent_workers", "Worker processes that answered this scrape")
        workers.add_metric([], float(serving))
        yield workers
        restarts = CounterMetricFamily("switchgear_agent_worker_restarts", "Worker processes started again")
        restarts.add_metric([], float(self._restarts()))
        yield restarts
        attempts = CounterMetricFamily("switchgear_worker_attempts",
                                       "Upstream attempts each worker's current process started", labels=("worker",))
        for k, (_pid, families) in sorted(self._last.items()):
            attempts.add_metric([f"w{k}"], _attempts(families))
        yield attempts
        if self._connections is not None:
            held = GaugeMetricFamily("switchgear_worker_connections",
                                     "Connections each worker serves on each door (--worker-spread even)",
                                     labels=("door", "worker"))
            for door, k, n in self._connections():
                held.add_metric([door, f"w{k}"], float(n))
            yield held


def _per_worker_gauges(answered: dict[int, list[Metric]]) -> Iterator[Metric]:
    merged: dict[str, Metric] = {}
    for k, families in sorted(answered.items()):
        for family in families:
            if family.type in SUMMED_TYPES:
                continue
            metric = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                metric.add_sample(sample.name, {**sample.labels, "worker": f"w{k}"}, sample.value)
    yield from merged.values()


def _attempts(families: Iterable[Metric]) -> float:
    return sum(sample.value for family in families if family.name == "switchgear_request_count"
               for sample in family.samples
               if sample.name == "switchgear_request_count_total" and sample.labels.get("endpoint"))

