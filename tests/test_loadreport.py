"""The load-reporting stream: the agent's accumulator and client against the real servicer."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from switchgear.adapters.base import ErrorKind, TokenUsage
from switchgear.controlplane.collector import Collector
from switchgear.controlplane.loadreport import LoadReportServicer, delta_from_proto
from switchgear.dataplane.client import Backoff
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.reporter import LoadAccumulator, ReportClient
from switchgear.v1 import discovery_pb2, loadreport_pb2_grpc

pytestmark = pytest.mark.timeout(30)


def start(endpoint: str, attempt: int = 1, rid: str = "r") -> AttemptStart:
    return AttemptStart(rid, "chat", "llm", endpoint, attempt, 5)


def end(endpoint: str, latency: float, error: ErrorKind | None = None, attempt: int = 1) -> AttemptEnd:
    cost = 0.01 if not error else 0.0
    return AttemptEnd("r", "chat", "llm", endpoint, attempt, latency, error, TokenUsage(10, 5), cost)


def test_accumulator_deltas_and_gauges() -> None:
    acc = LoadAccumulator(bounds_s=(0.1, 1.0))
    acc.attempt_started(start("a"))
    acc.attempt_ended(end("a", 0.05, ErrorKind.RETRYABLE))
    acc.attempt_started(start("b", attempt=2))
    acc.attempt_ended(end("b", 0.5, attempt=2))
    acc.attempt_started(start("b", rid="still-running"))
    acc.record_cache("chat", hit=True)
    acc.set_queue_length("chat", 4)
    loads = {(m.service, m.endpoint): delta_from_proto(m) for m in acc.drain()}
    a, b, svc = loads[("chat", "a")], loads[("chat", "b")], loads[("chat", "")]
    assert (a.issued, a.succeeded, a.failed, a.latency_buckets) == (1, 0, (("retryable", 1),), (1, 0, 0))
    assert (b.issued, b.succeeded, b.failovers, b.in_flight, b.latency_buckets) == (2, 1, 1, 1, (0, 1, 0))
    assert (b.input_tokens, b.output_tokens, b.cost_usd, b.success_latency_sum_s) == (10, 5, 0.01, 0.5)
    assert (svc.cache_lookups, svc.cache_hits, svc.queue_length) == (1, 1, 4)
    # the next interval starts from zero; the in-flight attempt keeps its endpoint in the report
    (again,) = [m for m in acc.drain() if m.endpoint]
    assert (again.endpoint, again.requests_issued, again.in_flight) == ("b", 0, 1)


async def test_agent_reports_reach_the_collector_at_the_interval_the_control_plane_sets() -> None:
    collector = Collector()
    interval = [0.1]
    servicer = LoadReportServicer(collector, lambda: interval[0])
    server = grpc.aio.server()
    loadreport_pb2_grpc.add_LoadReportingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    acc = LoadAccumulator()
    client = ReportClient([f"127.0.0.1:{port}"], discovery_pb2.Node(id="agent-7"), acc, backoff=Backoff(0.05, 0.1))
    stop = asyncio.Event()
    task = asyncio.ensure_future(client.run(stop))
    try:
        for _ in range(100):
            if client.interval_s == 0.1:
                break
            await asyncio.sleep(0.02)
        assert client.interval_s == 0.1
        for i in range(10):
            acc.attempt_started(start("a"))
            acc.attempt_ended(end("a", 0.2, ErrorKind.TIMEOUT if i < 3 else None))
        acc.attempt_started(start("a"))  # one left in flight
        for _ in range(100):
            if collector.stats(("chat", "a"), 60.0, _now()).issued == 11:
                break
            await asyncio.sleep(0.02)
        st = collector.stats(("chat", "a"), 60.0, _now())
        assert (st.issued, st.succeeded, st.errors, st.in_flight) == (11, 7, (("timeout", 3),), 1)
        assert len(st.latency_buckets) == 16  # the control plane's bounds (15) + Inf
        acc.attempt_ended(end("a", 0.2))
        for _ in range(100):  # the next (empty-gauge) report says nothing is in flight any more
            if collector.stats(("chat", "a"), 60.0, _now()).in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert collector.stats(("chat", "a"), 60.0, _now()).in_flight == 0
        assert collector.reporting_agents(5.0, _now()) == 1
        interval[0] = 0.05  # the config changed: the agent is told after its next report
        for _ in range(100):
            if client.interval_s == 0.05:
                break
            await asyncio.sleep(0.02)
        assert client.interval_s == 0.05
    finally:
        stop.set()
        await task
        await server.stop(None)
    assert collector.reporting_agents(5.0, _now()) == 0  # the stream ended: the agent is gone


def _now() -> float:
    return time.monotonic()


async def test_usage_a_failed_report_drained_goes_out_with_the_next_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets and the usage API count what agents report: a report whose write fails gives its
    tenant tallies back to the quota book, and the next session carries them."""
    from switchgear.dataplane import reporter as reporter_module
    from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer, UsageTally
    from switchgear.v1 import loadreport_pb2

    quotas = QuotaEnforcer(LocalCounters())
    quotas._tallies["acme"] = UsageTally(requests=12, rejected=28, tokens=300, cost_usd=0.5)  # as calls leave them
    sessions: list[list[loadreport_pb2.StreamLoadStatsRequest]] = []
    delivered = asyncio.Event()

    class Call:
        def __init__(self) -> None:
            self.sent: list[loadreport_pb2.StreamLoadStatsRequest] = []
            self.answered = False
            sessions.append(self.sent)

        async def write(self, request: loadreport_pb2.StreamLoadStatsRequest) -> None:
            if request.tenant_loads and len(sessions) == 1:  # the first session breaks as it reports
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           "connection reset")
            self.sent.append(request)
            if request.tenant_loads:
                delivered.set()

        async def read(self) -> object:
            if not self.answered:
                self.answered = True
                response = loadreport_pb2.StreamLoadStatsResponse()
                response.load_reporting_interval.FromNanoseconds(10_000_000)
                return response
            await asyncio.Event().wait()  # the control plane says nothing more
            raise AssertionError("unreachable")

        def cancel(self) -> None:
            pass

    class Stub:
        def __init__(self, channel: object) -> None:
            pass

        def StreamLoadStats(self, metadata: object = ()) -> Call:  # noqa: N802
            return Call()

    monkeypatch.setattr(reporter_module.loadreport_pb2_grpc, "LoadReportingServiceStub", Stub)
    client = ReportClient(["127.0.0.1:9"], discovery_pb2.Node(id="agent-7"), LoadAccumulator(),
                          tenants=quotas.drain_usage, restore=quotas.restore_usage, backoff=Backoff(0.01, 0.02))
    stop = asyncio.Event()
    task = asyncio.ensure_future(client.run(stop))
    try:
        await asyncio.wait_for(delivered.wait(), 5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert len(sessions) >= 2
    loads = [t for request in sessions[1] for t in request.tenant_loads]
    assert [(t.tenant, t.requests, t.rejected, t.tokens, t.cost_usd) for t in loads] == [("acme", 12, 28, 300, 0.5)]
