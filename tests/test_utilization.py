"""resource_utilization = in-flight over capacity, where the capacity is what agents report per
endpoint (max_concurrency when configured, else the one they learned), summed over agents;
unknown capacity gives no sample (GetStats 0 with capacity 0, no /metrics sample, no data for
alert rules) rather than a healthy-looking 0."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from switchgear.controlplane import alerts as al
from switchgear.controlplane.admin import _stats_to_proto
from switchgear.controlplane.collector import MAX_CAPACITY, Collector, LoadDelta
from switchgear.controlplane.metrics import ControlPlaneMetrics
from switchgear.controlplane.monitor import Monitor, utilization
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.dataplane.events import AttemptStart
from switchgear.dataplane.metrics import AgentMetrics
from switchgear.dataplane.reporter import LoadAccumulator
from switchgear.dataplane.scheduling.model import candidate_key
from switchgear.dataplane.scheduling.stats import LiveStats
from switchgear.dataplane.server import _capacity
from switchgear.dataplane.snapshot import AgentSnapshot, EndpointView, Holder, ServiceView
from switchgear.wire.loadreport import row_from_proto, row_to_proto
from tests.conftest import service
from tests.test_metrics import Clock, families


def row(endpoint: str, in_flight: int = 0, capacity: int = 0, issued: int = 0) -> LoadDelta:
    return LoadDelta(service="chat", endpoint=endpoint, category="llm", issued=issued,
                     in_flight=in_flight, capacity=capacity)


def test_utilization_of_a_pair() -> None:
    assert utilization((3, 4)) == 0.75
    assert utilization((0, 4)) == 0.0
    assert utilization((5, 0)) is None  # unknown capacity: no value, not 0


def test_capacity_travels_on_the_wire() -> None:
    back = row_from_proto(row_to_proto(row("e0", in_flight=2, capacity=7)))
    assert (back.in_flight, back.capacity) == (2, 7)


def cap(c: Collector, now: float) -> tuple[int, int]:
    return c.capacities(now).get(("chat", "e0"), (0, 0))


def test_collector_sums_capacity_over_agents_that_know_it() -> None:
    c = Collector(gauge_ttl_s=30.0)
    c.record("a1", [row("e0", in_flight=3, capacity=4)], 10.0)
    c.record("a2", [row("e0", in_flight=1, capacity=4)], 10.0)
    c.record("a3", [row("e0", in_flight=5)], 10.0)  # knows no capacity: counts in neither sum
    assert cap(c, 10.0) == (4, 8)
    assert c.in_flight(("chat", "e0"), 10.0) == 9
    # an agent idle on the endpoint (no row in its next report) keeps its capacity; in flight 0
    c.record("a1", [], 11.0)
    assert cap(c, 11.0) == (1, 8)
    # a row that says 0 (the learned capacity was forgotten) makes it unknown for that agent
    c.record("a2", [row("e0", in_flight=1, capacity=0)], 12.0)
    assert cap(c, 12.0) == (0, 4)
    c.agent_gone("a1")
    assert cap(c, 12.0) == (0, 0)
    c.record("a1", [row("e0", in_flight=2, capacity=4)], 13.0)
    assert cap(c, 13.0 + 31.0) == (0, 0)  # stale reports count no more


def test_accumulator_reports_the_hooks_capacity_on_endpoint_rows() -> None:
    acc = LoadAccumulator()
    acc.capacity = lambda s, e: {"e0": 6}.get(e, 0)
    for endpoint in ("e0", "e1"):
        acc.attempt_started(AttemptStart("r1", "chat", "llm", endpoint, attempt=1, priority=5))
    acc.record_cache("chat", hit=True)
    rows = {r.endpoint: r for r in acc.drain()}
    assert (rows["e0"].capacity, rows["e1"].capacity, rows[""].capacity) == (6, 0, 0)


def test_agent_capacity_is_max_concurrency_else_learned() -> None:
    stats = LiveStats(clock=lambda: 0.0)
    holder = Holder()
    holder.current = AgentSnapshot(version="1", services={"chat": ServiceView(
        name="chat", category="llm", protocol="openai",
        endpoints=(EndpointView(id="e0", url="u0", max_concurrency=3), EndpointView(id="e1", url="u1")))})
    capacity = _capacity(holder, stats)
    assert capacity("chat", "e0") == 3
    assert capacity("chat", "e1") == 0  # nothing learned yet
    assert not stats.known(candidate_key("chat", "e1"))  # asking creates no stats
    learned = stats.get(candidate_key("chat", "e1")).capacity
    for _ in range(stats.config.bend_samples):
        learned.record(1, 0.1)  # unloaded
        learned.record(4, 0.5)  # 4-7 in flight: 5x slower, past the 2x bend
    assert capacity("chat", "e1") == 4
    assert capacity("other", "e9") == 0


def monitor_with(tmp_path: Path, *max_concurrency: int) -> tuple[Monitor, Collector, Clock, SqliteStore]:
    store = SqliteStore(tmp_path / "r.db")
    registry = Registry(store)
    spec = service("chat", *(f"http://127.0.0.1:{9 + i}/v1" for i in range(len(max_concurrency))))
    endpoints = tuple(dataclasses.replace(e, max_concurrency=m) for e, m in zip(spec.endpoints, max_concurrency,
                                                                                  strict=True))
    registry.register(dataclasses.replace(spec, endpoints=endpoints), "test")
    clock, collector = Clock(), Collector()
    return Monitor(registry, collector, clock=clock, overrides={"health_debounce_s": 0.0}), collector, clock, store


def test_rows_use_the_reported_capacity_else_max_concurrency(tmp_path: Path) -> None:
    monitor, collector, clock, store = monitor_with(tmp_path, 0, 5, 0)
    # e0: no max_concurrency, agents learned 8 and 8; e1: max_concurrency 5 from an agent that
    # reports no capacity (older): every agent's in-flight over it; e2: unknown
    collector.record("a1", [row("e0", 6, 8, 6), row("e1", 2, 0, 2), row("e2", 3, 0, 3)], clock.now)
    collector.record("a2", [row("e0", 2, 8, 2)], clock.now)
    rows = {r.endpoint: r for r in monitor.rows()}
    assert (rows["e0"].utilization, rows["e0"].capacity) == (0.5, 16)
    assert (rows["e1"].utilization, rows["e1"].capacity) == (0.4, 5)
    assert (rows["e2"].utilization, rows["e2"].capacity) == (None, 0)
    # the service: over its endpoints of known capacity (e2's in-flight is not counted)
    assert (rows[""].utilization, rows[""].capacity) == (10 / 21, 21)
    unknown = _stats_to_proto(rows["e2"])
    assert (unknown.resource_utilization, unknown.capacity, unknown.in_flight) == (0.0, 0, 3)
    assert _stats_to_proto(rows["e0"]).resource_utilization == 0.5
    fams = families(ControlPlaneMetrics(monitor, seq=lambda: 1, agents=lambda: 2, reports=lambda: 2))
    samples = {s.labels.get("endpoint"): s.value for s in fams["switchgear_resource_utilization"].samples}
    assert samples == {"e0": 0.5, "e1": 0.4}  # e2: no sample, not 0
    store.close()


def test_unknown_capacity_is_no_data_for_alert_rules(tmp_path: Path) -> None:
    rule = al.AlertRule("busy", "resource_utilization > 0.8", min_requests=0)
    assert not al.has_data(rule, {"queue_length": 0.0}, 50)
    assert al.has_data(rule, {"resource_utilization": 0.0}, 0)  # idle with a known capacity: 0
    monitor, collector, clock, store = monitor_with(tmp_path, 0)
    collector.record("a1", [row("e0", 2, 0, 2)], clock.now)
    assert monitor.rows()[-1].utilization is None
    collector.record("a1", [row("e0", 4, 4, 2)], clock.now)
    assert monitor.rows()[-1].utilization == 1.0
    store.close()


def test_abusive_capacity_figures_are_harmless(tmp_path: Path) -> None:
    monitor, collector, clock, store = monitor_with(tmp_path, 0)
    # the largest uint64 the wire carries, a capacity on a service-level row, an unknown service
    huge = row_from_proto(row_to_proto(row("e0", in_flight=3, capacity=2**64 - 1)))
    service_level = LoadDelta(service="chat", endpoint="", category="llm", capacity=9)
    stranger = LoadDelta(service="nobody", endpoint="e0", category="llm", in_flight=1, capacity=1)
    collector.record("a1", [huge, service_level, stranger], clock.now)
    collector.record("a2", [huge], clock.now)
    assert ("chat", "") not in collector.capacities(clock.now)
    rows = {r.endpoint: r for r in monitor.rows()}
    # each agent's figure counts for at most MAX_CAPACITY: the sum still fits GetStats' uint64
    assert rows["e0"].capacity == 2 * MAX_CAPACITY and 0.0 < (rows["e0"].utilization or 0.0) < 1e-9
    assert _stats_to_proto(rows["e0"]).capacity == _stats_to_proto(rows[""]).capacity == 2 * MAX_CAPACITY
    assert [r.service for r in monitor.rows()] == ["chat", "chat"]  # no row for an unregistered service
    monitor.tick()  # the alert evaluation reads the same figures without error
    store.close()


def test_agent_metrics_utilization_is_in_flight_over_the_agents_capacity() -> None:
    m = AgentMetrics()
    m.capacity = lambda s, e: {"a": 4}.get(e, 0)
    for endpoint in ("a", "a", "a", "b"):
        m.attempt_started(AttemptStart("r", "chat", "llm", endpoint, 1, 5))
    samples = {s.labels["endpoint"]: s.value for s in families(m)["switchgear_resource_utilization"].samples}
    assert samples == {"a": 0.75}  # b: capacity unknown, no sample rather than 0
