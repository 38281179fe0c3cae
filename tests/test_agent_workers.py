"""`switchgear agent --workers 2`: two processes on one gRPC port and one HTTP port, a killed
worker started again while calls keep succeeding, SIGTERM stopping all, and one /metrics that
sums both workers' counters. A real agent (subprocesses), an in-process control plane and a
local OpenAI-shaped upstream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchgear.dataplane.worker_metrics import WorkersCollector, serve_worker_metrics
from switchgear.dataplane.workers import reserve, workers_arg
from switchgear.supervise import Proc, ProcessFailed
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import ControlPlane, Upstream, service
from tests.servers import _alive, _children

pytestmark = pytest.mark.timeout(90)

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def poll(what: Callable[[], object], timeout_s: float = 30.0) -> object:
    deadline = time.monotonic() + timeout_s
    while not (got := await asyncio.to_thread(what)):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
    return got


class Agent:
    def __init__(self, proc: Proc, http: str, metrics: str) -> None:
        self.proc, self.http, self.metrics = proc, http, metrics

    def calls(self, n: int) -> list[int]:
        """`n` chat calls, each on a new connection (the kernel picks a worker per connection)."""
        codes = []
        for _ in range(n):
            with httpx.Client(timeout=10) as client:
                codes.append(client.post(f"http://{self.http}/v1/chat/completions", json=CHAT).status_code)
        return codes

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(httpx.get(f"http://{self.metrics}/metrics", timeout=10).text)

    def per_worker_attempts(self) -> dict[str, float]:
        return {dict(labels)["worker"]: v for (name, labels), v in self.scrape().items()
                if name == "switchgear_worker_attempts_total"}

    def workers(self) -> list[int]:
        return sorted(_children(self.proc.pid))


def two_workers(control_plane: ControlPlane, tmp_path: Path) -> Proc:
    """An agent `--workers 2 --node-id edge` with both doors and /metrics, not started."""
    return Proc.switchgear("agent", ["agent", "--workers", "2", "--auth", "none", "--control-plane",
                                     control_plane.address, "--listen", "127.0.0.1:0", "--http-listen",
                                     "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--node-id", "edge"], tmp_path)


async def start_two(proc: Proc, control_plane: ControlPlane, upstream: tuple[Upstream, str]) -> tuple[str, Agent]:
    """Start `proc` (two_workers) with the service "chat" on `upstream`; (its gRPC address, the
    Agent) once both workers hold a snapshot."""
    control_plane.registry.register(service("chat", upstream[1], model="gpt-4o-mini"), "test")
    address = await asyncio.to_thread(proc.start, 60.0)
    http = (await asyncio.to_thread(proc.wait_line, "HTTP ", 10.0)).split()[1]
    metrics = (await asyncio.to_thread(proc.wait_line, "METRICS ", 10.0)).split()[1]
    # Both workers subscribed under one grouped identity; both serve the one gRPC port.
    await poll(lambda: sorted(a.node.id for a in control_plane.tracker.list() if a.acked_version)
               == ["edge/w0", "edge/w1"])
    return address, Agent(proc, http, metrics)


def total(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, labels), v in scraped.items() if n == name and dict(labels).get("endpoint"))


async def test_two_workers_share_ports_restart_and_stop(
    control_plane: ControlPlane, upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    proc = two_workers(control_plane, tmp_path)
    try:
        address, agent = await start_two(proc, control_plane, upstream)
        assert len(agent.workers()) == 2
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(gateway_pb2.InvokeRequest(
                service="chat", method="chat.completions", payload=orjson.dumps(CHAT)), timeout=10)
        assert reply.endpoint == "e0"

        # Calls on fresh connections reach both workers; the one scrape sums their counters.
        assert await asyncio.to_thread(agent.calls, 24) == [200] * 24
        per_worker = agent.per_worker_attempts()
        assert set(per_worker) == {"w0", "w1"} and all(v > 0 for v in per_worker.values()), per_worker
        scraped = agent.scrape()
        assert total(scraped, "switchgear_request_count_total") == sum(per_worker.values()) == 25
        assert scraped[("switchgear_agent_workers", ())] == 2
        versions = [dict(labels)["worker"] for (name, labels) in scraped if name == "switchgear_snapshot_info"]
        assert sorted(versions) == ["w0", "w1"]  # gauges: one series per worker

        # A killed worker: calls keep succeeding, it is started again, and the sum never drops.
        victim = agent.workers()[0]
        os.kill(victim, signal.SIGKILL)
        # Once it is gone (its listening sockets closed), every new connection goes to the other
        # worker. Connections the kernel had queued on the dying worker are reset: SO_REUSEPORT
        # gives each process its own accept queue (clients retry those, as after any crash).
        await poll(lambda: not _alive(victim), 10.0)
        assert await asyncio.to_thread(agent.calls, 10) == [200] * 10
        await poll(lambda: len(agent.workers()) == 2 and victim not in agent.workers()
                   and agent.scrape().get(("switchgear_agent_workers", ())) == 2)
        scraped = agent.scrape()
        assert scraped[("switchgear_agent_worker_restarts_total", ())] == 1
        # The killed worker's counts (as last scraped, before it died) stay in the sum.
        assert total(scraped, "switchgear_request_count_total") == 25 + 10
        assert await asyncio.to_thread(agent.calls, 24) == [200] * 24
        assert all(v > 0 for v in agent.per_worker_attempts().values())

        # SIGTERM stops every worker, then the supervisor, cleanly.
        workers = agent.workers()
        assert await asyncio.to_thread(proc.stop, 30.0) == 0
        assert not [pid for pid in workers if _alive(pid)]
    finally:
        await asyncio.to_thread(proc.stop)


async def test_workers_stop_when_the_supervisor_is_killed(control_plane: ControlPlane, tmp_path: Path) -> None:
    proc = Proc.switchgear("agent", [
        "agent", "--workers", "2", "--auth", "none", "--control-plane", control_plane.address,
        "--listen", "127.0.0.1:0"], tmp_path)
    await asyncio.to_thread(proc.start, 60.0)
    workers = _children(proc.pid)
    assert len(workers) == 2
    proc.kill()  # SIGKILL: no chance to stop them; their stdin pipe ends instead
    await poll(lambda: not [pid for pid in workers if _alive(pid)], 20.0)


def test_taken_port_and_bad_counts_are_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = Proc.switchgear("agent", ["agent", "--workers", "2", "--auth", "none", "--control-plane",
                                         "127.0.0.1:9", "--listen", f"127.0.0.1:{port}"], tmp_path)
        with pytest.raises(ProcessFailed, match="exited"):
            proc.start(30.0)
        assert f"--listen 127.0.0.1:{port}: Address already in use" in proc.tail()
    managed = Proc.switchgear("managed", ["agent", "--workers", "2", "--managed-cpu", "1", "--auth", "none",
                                          "--control-plane", "127.0.0.1:9", "--listen", "127.0.0.1:0"], tmp_path)
    with pytest.raises(ProcessFailed, match="exited"):  # each worker would run the host's managed replicas
        managed.start(30.0)
    assert "--workers N > 1 cannot be combined with --managed-cpu" in managed.tail()
    for bad in ("0", "-1", "two", "257", "1.5"):
        with pytest.raises(Exception, match="auto"):
            workers_arg(bad)
    assert workers_arg("auto") == len(os.sched_getaffinity(0))
    assert workers_arg("3") == 3


def test_reserved_port_is_shared_only_by_port_reusers() -> None:
    sock, address = reserve("127.0.0.1:0")
    with sock:
        port = int(address.rsplit(":", 1)[1])
        assert port > 0
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # an unrelated program cannot take it
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))


class Fixed:
    """A worker's registry: one counter, one gauge, one histogram, with settable values."""

    def __init__(self, count: float, gauge: float) -> None:
        self.count, self.gauge = count, gauge

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        counter = CounterMetricFamily("switchgear_request_count", "attempts", labels=("service", "endpoint"))
        counter.add_metric(["chat", "e0"], self.count)
        yield counter
        gauge = GaugeMetricFamily("switchgear_in_flight", "now", labels=("service",))
        gauge.add_metric(["chat"], self.gauge)
        yield gauge
        histogram = HistogramMetricFamily("switchgear_overhead_seconds", "h")
        histogram.add_metric([], [("0.1", self.count), ("+Inf", self.count)], self.count / 10)
        yield histogram


async def test_merge_sums_counters_labels_gauges_and_survives_restarts(tmp_path: Path) -> None:
    paths = [str(tmp_path / "w0.sock"), str(tmp_path / "w1.sock"), str(tmp_path / "w2.sock")]
    w0, w1 = Fixed(3, 1), Fixed(4, 2)
    close0 = await serve_worker_metrics([w0], paths[0])  # type: ignore[list-item]
    close1 = await serve_worker_metrics([w1], paths[1])  # type: ignore[list-item]
    # w2 never answers (not started, or down): it is left out, not an error.
    collector = WorkersCollector(paths, restarts=lambda: 0, timeout_s=1.0)

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        return samples(generate_latest(registry).decode())

    got = await asyncio.to_thread(scrape)
    key = ("switchgear_request_count_total", (("endpoint", "e0"), ("service", "chat")))
    assert got[key] == 7
    assert got[("switchgear_overhead_seconds_count", ())] == 7
    assert got[("switchgear_overhead_seconds_bucket", (("le", "0.1"),))] == 7
    assert got[("switchgear_in_flight", (("service", "chat"), ("worker", "w0")))] == 1
    assert got[("switchgear_in_flight", (("service", "chat"), ("worker", "w1")))] == 2
    assert got[("switchgear_agent_workers", ())] == 2
    # w1 goes down: its last counts stay in the sum; its gauges go.
    await close1()
    got = await asyncio.to_thread(scrape)
    assert got[key] == 7 and ("switchgear_in_flight", (("service", "chat"), ("worker", "w1"))) not in got
    # "w1" comes back as a new process (another pid) from zero: the sum goes on from 7, never back.
    close1 = await _other_process(paths[1], Fixed(2, 0))
    got = await asyncio.to_thread(scrape)
    assert got[key] == 3 + 4 + 2
    w0.count = 5
    assert (await asyncio.to_thread(scrape))[key] == 5 + 4 + 2
    await close0()
    await close1()


async def _other_process(path: str, collector: Fixed) -> Callable[[], object]:
    """serve_worker_metrics as another process would: a different `# pid` line."""

    async def answer(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)  # type: ignore[arg-type]
        writer.write(f"# pid {os.getpid() + 1}\n".encode() + generate_latest(registry))
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer, path)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return close


def test_scrape_of_a_wrong_or_oversized_answer_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from switchgear.dataplane import worker_metrics

    monkeypatch.setattr(worker_metrics, "MAX_SCRAPE_BYTES", 1024)
    path = str(tmp_path / "w.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        for body in (b"not metrics at all\n", b"# pid 1\n" + b"# x\n" * 512):
            thread = threading.Thread(target=_answer_once, args=(listener, body))
            thread.start()
            assert worker_metrics.scrape(path, 2.0) is None
            thread.join()
    assert worker_metrics.scrape(str(tmp_path / "none.sock"), 0.5) is None  # nobody listening


def _answer_once(listener: socket.socket, body: bytes) -> None:
    served, _ = listener.accept()
    with served, contextlib.suppress(OSError):  # the scraper stopped reading at its bound
        served.sendall(body)
