"""The Grafana dashboard imports as JSON, shows every seed metric, and names only real series."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from switchgear.adapters.base import TokenUsage
from switchgear.controlplane.collector import SEED_METRICS, Collector, LoadDelta
from switchgear.controlplane.metrics import ControlPlaneMetrics
from switchgear.controlplane.monitor import Monitor
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.dataplane.access_log import Exchange
from switchgear.dataplane.door_metrics import DoorMetrics
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.metrics import AgentMetrics
from tests.conftest import REPO, service


def exposed(collector: object) -> set[str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    samples = set(re.findall(r"^(switchgear_\w+?)(?:\{| )", text, re.M))
    return samples | set(re.findall(r"^# HELP (switchgear_\w+)", text, re.M))  # families with no series yet


def test_dashboard_queries_name_real_series(tmp_path: Path) -> None:
    dashboard = json.loads((REPO / "dashboards" / "switchgear.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"switchgear_\w+", e)}
    for metric in SEED_METRICS:
        assert any(u.startswith((f"switchgear_{metric}", f"switchgear_service_{metric}")) for u in used), metric

    agent = AgentMetrics()
    with agent.measure():
        agent.attempt_started(AttemptStart("r", "chat", "llm", "e0", 1, 5))
        agent.attempt_ended(AttemptEnd("r", "chat", "llm", "e0", 1, 0.1, None, TokenUsage(1, 1)))
    store = SqliteStore(tmp_path / "r.db")
    registry = Registry(store)
    registry.register(service("chat"), "test")
    collector = Collector()
    collector.record("a", [LoadDelta(service="chat", endpoint="e0", category="llm", issued=1, succeeded=1)], 1.0)
    cp = ControlPlaneMetrics(Monitor(registry, collector), seq=lambda: 1, agents=lambda: 1, reports=lambda: 1)
    door = DoorMetrics()
    exchange = Exchange("http", "r")
    exchange.route, exchange.status_class, exchange.reason = "chat", "4xx", "invalid_api_key"
    exchange.answered(1, 1, 0.01, "e0", 1)
    exchange.close()
    door.record(exchange)
    door.attempt_ended(AttemptEnd("r", "chat", "llm", "e0", 1, 0.1, None, TokenUsage(1, 1)))
    real = exposed(agent) | exposed(cp) | exposed(door)
    store.close()
    assert used <= real, used - real
