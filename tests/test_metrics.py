"""/metrics exposition of both planes, parsed with prometheus_client's own text parser.

(The end-to-end scrape of real processes is in test_health_end_to_end.py.)
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from switchgear.adapters.base import ErrorKind, TokenUsage
from switchgear.controlplane.collector import SEED_METRICS, Collector, LoadDelta
from switchgear.controlplane.metrics import ControlPlaneMetrics
from switchgear.controlplane.monitor import Monitor
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.metrics import AgentMetrics, serve_metrics
from tests.conftest import service


def families(collector: object) -> dict[str, object]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, object], name: str, **labels: str) -> float:
    for sample in fams[name].samples:  # type: ignore[attr-defined]
        if all(sample.labels.get(k) == v for k, v in labels.items()) and sample.name in (name, f"{name}_total"):
            return float(sample.value)
    raise KeyError((name, labels))


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_agent_metrics_every_seed_metric_and_the_hooks() -> None:
    clock = Clock()
    m = AgentMetrics(clock=clock, version=lambda: "7.abc")
    with m.measure():
        m.attempt_started(AttemptStart("r", "chat", "llm", "a", 1, 5))
        m.attempt_ended(AttemptEnd("r", "chat", "llm", "a", 1, 0.2, ErrorKind.RETRYABLE))
        m.attempt_started(AttemptStart("r", "chat", "llm", "b", 2, 5))
        m.attempt_ended(AttemptEnd("r", "chat", "llm", "b", 2, 0.4, None, TokenUsage(10, 5), 0.5))
    m.record_cache("chat", hit=True)
    m.record_cache("chat", hit=False)
    m.record_breaker_trip("chat", "a")
    m.set_queue_length("chat", 3)
    m.set_resource_utilization("chat", "b", 0.25)
    fams = families(m)
    for metric in SEED_METRICS:
        assert f"switchgear_{metric}" in fams, metric
    assert value(fams, "switchgear_request_count", endpoint="a") == 1
    assert value(fams, "switchgear_failover_count", endpoint="b") == 1
    assert value(fams, "switchgear_error_rate", endpoint="a") == 1.0
    assert value(fams, "switchgear_success_rate", endpoint="b") == 1.0
    assert value(fams, "switchgear_avg_response_time", endpoint="b") == 400.0
    assert value(fams, "switchgear_cost_per_hour", endpoint="b") == 0.5 * 60  # 60 s window -> per hour
    assert value(fams, "switchgear_cache_hit_rate", endpoint="") == 0.5
    assert value(fams, "switchgear_circuit_breaker_trips", endpoint="a") == 1
    assert value(fams, "switchgear_queue_length", endpoint="") == 3
    assert value(fams, "switchgear_resource_utilization", endpoint="b") == 0.25
    assert value(fams, "switchgear_snapshot_info", version="7.abc") == 1
    overhead = fams["switchgear_gateway_overhead_seconds"]
    count = [s for s in overhead.samples if s.name.endswith("_count")]  # type: ignore[attr-defined]
    assert count[0].value == 1
    clock.now += 120  # the window moves on: rates go back to "no evidence"
    fams = families(m)
    assert value(fams, "switchgear_error_rate", endpoint="a") == 0.0
    assert value(fams, "switchgear_request_count", endpoint="a") == 1  # counters never go back


def test_control_plane_metrics_and_the_http_endpoint(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.db")
    registry = Registry(store)
    registry.register(service("chat", "http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"), "test")
    clock = Clock()
    collector = Collector()
    collector.record("agent-1", [LoadDelta(service="chat", endpoint="e0", category="llm", issued=20, succeeded=10, failed=(("timeout", 10),),
                                           latency_sum_s=2.0, latency_count=20, cost_usd=1.0)], clock.now)
    monitor = Monitor(registry, collector, clock=clock, overrides={"health_debounce_s": 0.0})
    monitor.tick()
    prom = ControlPlaneMetrics(monitor, seq=lambda: registry.snapshot.seq, agents=lambda: 1, reports=lambda: 5)
    fams = families(prom)
    for metric in SEED_METRICS:
        assert f"switchgear_{metric}" in fams, metric
    assert value(fams, "switchgear_request_count", endpoint="e0") == 20
    assert value(fams, "switchgear_service_request_count", service="chat") == 20  # the service's total
    # ... in its own family: a sum over the endpoint family counts each attempt once
    assert sum(s.value for s in fams["switchgear_request_count"].samples if s.name.endswith("_total")) == 20
    assert not [s for f in fams.values() for s in f.samples if s.labels.get("endpoint") == ""]
    assert value(fams, "switchgear_error_rate", endpoint="e0") == 0.5
    assert value(fams, "switchgear_avg_response_time", endpoint="e0") == 100.0
    assert value(fams, "switchgear_alert_firing", rule="high_error_rate", service="chat") == 1
    assert value(fams, "switchgear_snapshot_seq") == registry.snapshot.seq
    server, address = serve_metrics(AgentMetrics(), "127.0.0.1:0")
    try:
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
        assert "switchgear_gateway_overhead_seconds" in text
    finally:
        server.shutdown()
    store.close()
