"""Alert rules: the seed's four, pure evaluator tables, and each rule's action through the
monitor, the real registry and store: condition met -> action in the next snapshot (as agents
get it) and an audit row; condition cleared (with hysteresis, after clear_for) -> recovered,
action reverted, audit row."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from switchgear.controlplane import alerts as al
from switchgear.controlplane.collector import Collector, LoadDelta
from switchgear.controlplane.convert import snapshot_to_proto
from switchgear.controlplane.metrics import ControlPlaneMetrics
from switchgear.controlplane.model import AlertRuleSpec, Category, MonitoringSettings
from switchgear.controlplane.monitor import Monitor
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from tests.conftest import service
from tests.test_metrics import families, value


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- pure evaluator ---------------------------------------------------------------------------


def test_seed_rules_are_the_seeds() -> None:
    assert [(r.name, r.condition, r.severity, r.action) for r in al.SEED_RULES] == [
        ("high_error_rate", "error_rate > 0.05", "warning", "enable_circuit_breaker"),
        ("high_response_time", "avg_response_time > 10000", "warning", "switch_to_faster_service"),
        ("high_cost", "cost_per_hour > 100", "critical", "switch_to_cheaper_service"),
        ("service_unavailable", "success_rate < 0.9", "critical", "enable_failover"),
    ]


@pytest.mark.parametrize(
    ("condition", "parsed"),
    [("error_rate > 0.05", ("error_rate", ">", 0.05)), ("success_rate<0.9", ("success_rate", "<", 0.9)),
     (" cost_per_hour >= 1e2 ", ("cost_per_hour", ">=", 100.0))],
)
def test_conditions_parse(condition: str, parsed: tuple[str, str, float]) -> None:
    assert al.parse_condition(condition) == parsed


@pytest.mark.parametrize("condition", ["error_rate", "errors > 1", "error_rate == 1", "error_rate > x"])
def test_bad_conditions_are_refused(condition: str) -> None:
    with pytest.raises(al.RuleError) as info:
        al.parse_condition(condition)
    assert info.value.path == "condition"


@pytest.mark.parametrize(
    ("rule", "firing_value", "between", "clear_value"),
    [
        (al.SEED_RULES[0], 0.2, 0.045, 0.01),  # 0.045 < 0.05 but above 0.05 * (1 - 0.2)
        (al.SEED_RULES[1], 12000.0, 9000.0, 5000.0),
        (al.SEED_RULES[2], 150.0, 90.0, 10.0),
        (al.SEED_RULES[3], 0.5, 0.92, 0.99),  # clears above min(0.9 * 1.2, 0.95) = 0.95
    ],
)
def test_each_seed_rule_fires_holds_through_hysteresis_and_recovers(
    rule: al.AlertRule, firing_value: float, between: float, clear_value: float
) -> None:
    evaluator = al.AlertEvaluator([rule])
    fig = lambda v: {"svc": {rule.metric: v}}  # noqa: E731
    assert evaluator.evaluate(0.0, fig(firing_value), {"svc": 5}) == []  # too few requests: no evidence
    (fired,) = evaluator.evaluate(1.0, fig(firing_value), {"svc": 100})
    assert fired.kind == "fired" and fired.alert.value == firing_value
    assert evaluator.evaluate(2.0, fig(between), {"svc": 100}) == []  # inside the hysteresis: still firing
    assert evaluator.evaluate(100.0, fig(between), {"svc": 100}) == []
    assert evaluator.evaluate(101.0, fig(clear_value), {"svc": 100}) == []  # clear, but not for clear_for_s yet
    assert [a.rule.name for a in evaluator.firing()] == [rule.name]
    (recovered,) = evaluator.evaluate(131.0, fig(clear_value), {"svc": 100})
    assert recovered.kind == "recovered" and recovered.alert.recovered_at == 131.0
    assert evaluator.firing() == [] and evaluator.recovered(5)[0].rule == rule


def test_for_s_delays_firing_and_a_blip_resets_it() -> None:
    rule = al.AlertRule("r", "error_rate > 0.1", for_s=10.0)
    evaluator = al.AlertEvaluator([rule])
    bad, good = {"s": {"error_rate": 0.5}}, {"s": {"error_rate": 0.0}}
    assert evaluator.evaluate(0.0, bad, {"s": 50}) == []
    assert evaluator.evaluate(5.0, good, {"s": 50}) == []  # the condition broke: the timer restarts
    assert evaluator.evaluate(6.0, bad, {"s": 50}) == []
    assert evaluator.evaluate(15.0, bad, {"s": 50}) == []
    assert [e.kind for e in evaluator.evaluate(16.0, bad, {"s": 50})] == ["fired"]


def test_a_relapse_while_clearing_keeps_the_alert() -> None:
    evaluator = al.AlertEvaluator([al.SEED_RULES[0]])
    evaluator.evaluate(0.0, {"s": {"error_rate": 0.3}}, {"s": 50})
    evaluator.evaluate(1.0, {"s": {"error_rate": 0.0}}, {"s": 50})
    evaluator.evaluate(20.0, {"s": {"error_rate": 0.3}}, {"s": 50})  # relapse: the clear timer restarts
    assert evaluator.evaluate(40.0, {"s": {"error_rate": 0.0}}, {"s": 50}) == []
    assert evaluator.firing()


# --- no data is not healthy ------------------------------------------------------------------

UNAVAILABLE = al.SEED_RULES[3]  # success_rate < 0.9, min_requests 10, clear_for 30 s
BAD, GOOD = {"s": {"success_rate": 0.5}}, {"s": {"success_rate": 1.0}}


def _fired(rule: al.AlertRule = UNAVAILABLE) -> al.AlertEvaluator:
    evaluator = al.AlertEvaluator([rule])
    assert [e.kind for e in evaluator.evaluate(0.0, BAD, {"s": 100})] == ["fired"]
    return evaluator


@pytest.mark.parametrize(
    ("figures", "requests", "why"),
    [
        ({}, {}, "no report names the service: its 0 is not a success rate"),
        ({"s": {}}, {"s": 0}, "a row without the metric"),
        ({"s": {"success_rate": 0.0}}, {"s": 0}, "a zero from an empty window"),
        ({"s": {"success_rate": 0.0}}, {"s": 9}, "fewer attempts than min_requests"),
    ],
)
def test_no_data_never_fires_a_rule(figures: dict[str, dict[str, float]], requests: dict[str, int], why: str) -> None:
    for rule in (UNAVAILABLE, dataclasses.replace(UNAVAILABLE, min_requests=0)):  # 0: rates still need a sample
        evaluator = al.AlertEvaluator([rule])
        fires = rule.min_requests == 0 and requests.get("s", 0) > 0 and "success_rate" in figures["s"]
        events = evaluator.evaluate(0.0, figures, requests)  # 9 attempts are data for a rule asking none
        assert [e.kind for e in events] == (["fired"] if fires else []), why


@pytest.mark.parametrize(
    ("silence", "why"),
    [
        (({}, {}), "the service vanished from the reports"),
        (({"s": {"success_rate": 0.0}}, {"s": 0}), "an empty window's zero"),
        (({"s": {"success_rate": 1.0}}, {"s": 3}), "a trickle below min_requests that looks healthy"),
    ],
)
def test_a_firing_alert_holds_through_no_data_and_says_so(
    silence: tuple[dict[str, dict[str, float]], dict[str, int]], why: str
) -> None:
    evaluator = _fired()
    figures, requests = silence
    (event,) = evaluator.evaluate(1.0, figures, requests)
    assert event.kind == "no_data" and event.alert.no_data_since == 1.0, why
    for now in (40.0, 100.0, 1000.0):  # far past clear_for_s: silence never clears it
        assert evaluator.evaluate(now, figures, requests) == [], why  # the no_data event came once
    (alert,) = evaluator.firing()
    assert alert.no_data_since == 1.0 and alert.value == 0.5, why  # the last value data gave
    assert evaluator.recovered(5) == []


def test_only_data_that_clears_recovers_and_silence_restarts_the_clear_timer() -> None:
    evaluator = _fired()
    assert evaluator.evaluate(10.0, GOOD, {"s": 100}) == []  # clear timer starts at 10
    evaluator.evaluate(20.0, {}, {})  # silence: the timer is reset, not advanced
    (alert,) = evaluator.firing()
    assert alert.no_data_since == 20.0
    assert evaluator.evaluate(45.0, GOOD, {"s": 100}) == []  # data again: timer restarts at 45
    assert evaluator.firing()[0].no_data_since is None and evaluator.firing()[0].value == 1.0
    assert evaluator.evaluate(74.0, GOOD, {"s": 100}) == []
    (recovered,) = evaluator.evaluate(75.0, GOOD, {"s": 100})
    assert recovered.kind == "recovered" and recovered.alert.recovered_at == 75.0


def test_no_data_restarts_a_pending_for_timer() -> None:
    rule = dataclasses.replace(UNAVAILABLE, for_s=10.0)
    evaluator = al.AlertEvaluator([rule])
    assert evaluator.evaluate(0.0, BAD, {"s": 100}) == []
    assert evaluator.evaluate(5.0, {}, {}) == []
    assert evaluator.evaluate(11.0, BAD, {"s": 100}) == []  # pending again from 11, not from 0
    assert [e.kind for e in evaluator.evaluate(21.0, BAD, {"s": 100})] == ["fired"]


@pytest.mark.parametrize(
    ("rule", "requests", "fires"),
    [
        (al.AlertRule("dead", "request_count < 1", min_requests=0), 0, True),  # zero traffic is a count
        (al.AlertRule("dead", "request_count < 1", min_requests=1), 0, False),
        (al.AlertRule("queue", "queue_length > 5", min_requests=0), 0, False),
    ],
)
def test_counts_are_observed_at_zero_when_the_rule_asks_for_no_minimum(
    rule: al.AlertRule, requests: int, fires: bool
) -> None:
    evaluator = al.AlertEvaluator([rule])
    events = evaluator.evaluate(0.0, {"s": {"request_count": 0.0, "queue_length": 0.0}}, {"s": requests})
    assert [e.kind for e in events] == (["fired"] if fires else [])


def test_an_alert_of_a_deregistered_service_recovers_at_once() -> None:
    evaluator = _fired()
    (event,) = evaluator.evaluate(1.0, {}, {}, registered={"other"})
    assert event.kind == "recovered" and evaluator.firing() == []


# --- actions through the monitor, registry and store -----------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Registry, Collector, Monitor, Clock, Clock]]:
    store = SqliteStore(tmp_path / "r.db")
    registry = Registry(store)
    mono, wall = Clock(), Clock(1_700_000_000.0)
    collector = Collector()
    monitor = Monitor(registry, collector, clock=mono, wall=wall,
                      overrides={"alert_window_s": 10.0, "health_window_s": 10.0, "health_debounce_s": 0.0})
    yield registry, collector, monitor, mono, wall
    store.close()


def _feed(collector: Collector, clock: Clock, svc: str, *, ok: int, failed: int = 0, latency_s: float = 0.1,
          cost: float = 0.0) -> None:
    collector.record("agent-1", [LoadDelta(
        service=svc, endpoint="e0", category="llm", issued=ok + failed, succeeded=ok,
        failed=(("retryable", failed),) if failed else (), latency_sum_s=latency_s * (ok + failed),
        latency_count=ok + failed, success_latency_sum_s=latency_s * ok, success_latency_count=ok, cost_usd=cost,
    )], clock.now)


def _advance(monitor: Monitor, mono: Clock, wall: Clock, seconds: float) -> None:
    mono.now += seconds
    wall.now += seconds
    monitor.tick()


CASES = [
    # rule, traffic that trips it, what the served snapshot shows
    ("high_error_rate", dict(ok=80, failed=20), lambda s: s.settings.circuit_breaker.failure_threshold == 2),
    ("high_response_time", dict(ok=50, latency_s=12.0), lambda s: _svc(s, "chat").strategy == "latency"),
    ("high_cost", dict(ok=50, cost=1.0), lambda s: _svc(s, "chat").strategy == "cost_optimized"),
    ("service_unavailable", dict(ok=50, failed=50), lambda s: list(_svc(s, "chat").fallbacks) == ["backup"]),
]


def _svc(snapshot: object, name: str) -> object:
    return next(s for s in snapshot.services if s.name == name)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("rule", "traffic", "shows"), CASES, ids=[c[0] for c in CASES])
def test_rule_action_reaches_the_snapshot_and_audit_and_is_reverted(
    rig: tuple[Registry, Collector, Monitor, Clock, Clock], rule: str, traffic: dict[str, float], shows: object
) -> None:
    registry, collector, monitor, mono, wall = rig
    registry.register(service("chat", "http://127.0.0.1:9/v1"), "test")
    registry.register(service("backup", "http://127.0.0.1:10/v1", priority=1), "test")
    # only the rule under test, so the other seed rules' actions do not blur the picture
    specs = tuple(s for s in MonitoringSettings().alert_rules if s.name == rule)
    settings = registry.state.settings
    state = dataclasses.replace(registry.state, settings=dataclasses.replace(
        settings, monitoring=dataclasses.replace(settings.monitoring, alert_rules=specs)))
    registry.replace(state, "test", "rules.yaml")
    before = registry.snapshot.version
    _feed(collector, mono, "chat", **traffic)  # type: ignore[arg-type]
    _advance(monitor, mono, wall, 0.5)
    served = snapshot_to_proto(registry.snapshot)
    assert registry.snapshot.version != before
    assert shows(served)  # type: ignore[operator]
    (alert,) = monitor.evaluator.firing()
    assert alert.rule.name == rule and alert.fired_version == registry.snapshot.version and alert.action_detail
    audit = registry.audit(10)
    assert audit[0].action == f"alert_fired:{rule}" and audit[0].target == "chat"
    assert audit[0].version == registry.snapshot.version
    # healthy traffic only, and the old window ages out; then clear_for_s (30 s) of calm
    for _ in range(12):
        _feed(collector, mono, "chat", ok=50, latency_s=0.1)
        _advance(monitor, mono, wall, 4.0)
    assert monitor.evaluator.firing() == []
    served = snapshot_to_proto(registry.snapshot)
    assert not shows(served)  # type: ignore[operator]
    assert served.settings.circuit_breaker.failure_threshold == 5
    assert _svc(served, "chat").strategy == "" and list(_svc(served, "chat").fallbacks) == []  # type: ignore[attr-defined]
    actions = [e.action for e in registry.audit(50)]
    assert f"alert_recovered:{rule}" in actions
    (recovered,) = monitor.evaluator.recovered(5)
    assert recovered.recovered_version == registry.snapshot.version


def test_rules_come_from_the_config(tmp_path: Path) -> None:
    from switchgear.controlplane.config import ConfigError, load_config

    text = (
        "external_services:\n"
        "  monitoring:\n"
        "    report_interval: 500ms\n"
        "    alert_rules:\n"
        "      too_slow:\n"
        "        condition: avg_response_time > 2000\n"
        "        severity: critical\n"
        "        action: switch_to_faster_service\n"
        "        clear_for: 1m\n"
    )
    monitoring = load_config(text, env={}).settings.monitoring
    assert monitoring.report_interval_s == 0.5
    assert monitoring.alert_rules == (AlertRuleSpec("too_slow", "avg_response_time > 2000", "critical",
                                                    "switch_to_faster_service", clear_for_s=60.0),)
    assert load_config("external_services: {}\n", env={}).settings.monitoring.alert_rules == \
        MonitoringSettings().alert_rules
    with pytest.raises(ConfigError) as info:
        load_config(text.replace("avg_response_time", "avg_latency"), env={})
    assert "alert_rules.too_slow.condition" in str(info.value) and "line 6" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(text.replace("switch_to_faster_service", "panic"), env={})
    assert "alert_rules.too_slow.action" in str(info.value)


def test_failover_with_no_other_service_says_so(rig: tuple[Registry, Collector, Monitor, Clock, Clock]) -> None:
    registry, collector, monitor, mono, wall = rig
    registry.register(service("lonely", "http://127.0.0.1:9/v1"), "test")
    assert Category.LLM
    _feed(collector, mono, "lonely", ok=10, failed=90)
    _advance(monitor, mono, wall, 0.5)
    firing = {a.rule.name: a for a in monitor.evaluator.firing()}
    assert "no other llm service" in firing["service_unavailable"].action_detail
    assert any(e.action == "alert_fired:service_unavailable" for e in registry.audit(10))


def test_a_new_leader_takes_over_firing_alerts_from_the_audit_trail(
    rig: tuple[Registry, Collector, Monitor, Clock, Clock],
) -> None:
    """The replica that takes the lead neither fires a firing alert again nor drops its action
    silently: it resumes it from the audit trail and records its recovery once."""
    registry, collector, old, mono, wall = rig
    registry.register(service("chat", "http://127.0.0.1:9/v1"), "test")
    _feed(collector, mono, "chat", ok=80, failed=20)
    _advance(old, mono, wall, 0.5)
    fired = old.evaluator.firing()
    names = sorted(a.rule.name for a in fired)
    assert names == ["high_error_rate", "service_unavailable"]
    served = registry.snapshot.version

    fresh = Collector()  # the new leader's own windows: the old leader's data died with it
    new = Monitor(registry, fresh, clock=mono, wall=wall,
                  overrides={"alert_window_s": 10.0, "health_window_s": 10.0, "health_debounce_s": 0.0})
    assert new.resume_alerts(registry.audit(1000)) == 2
    resumed = new.evaluator.firing()
    assert sorted((a.rule.name, a.service, a.fired_version) for a in resumed) == [(n, "chat", served) for n in names]
    _feed(fresh, mono, "chat", ok=80, failed=20)  # still failing: no second "fired" row
    _advance(new, mono, wall, 1.0)
    actions = [e.action for e in registry.audit(50)]
    assert all(actions.count(f"alert_fired:{n}") == 1 for n in names)
    for _ in range(12):  # calm: it recovers under the new leader, once
        _feed(fresh, mono, "chat", ok=50)
        _advance(new, mono, wall, 4.0)
    assert new.evaluator.firing() == []
    actions = [e.action for e in registry.audit(50)]
    assert all(actions.count(f"alert_recovered:{n}") == 1 for n in names)
    assert registry.snapshot.state.settings.circuit_breaker.failure_threshold == 5
    # A recovered alert is not resumed by the next leader.
    assert Monitor(registry, Collector()).resume_alerts(registry.audit(1000)) == 0


def test_traffic_stops_and_the_alert_and_its_action_stay(
    rig: tuple[Registry, Collector, Monitor, Clock, Clock],
) -> None:
    """A dead service that stops getting traffic keeps its alert and its failover: the monitor
    records the silence (audit row, still firing) and reverts nothing until data says so."""
    registry, collector, monitor, mono, wall = rig
    registry.register(service("chat", "http://127.0.0.1:9/v1"), "test")
    registry.register(service("backup", "http://127.0.0.1:10/v1", priority=1), "test")
    _feed(collector, mono, "chat", ok=10, failed=90)
    _advance(monitor, mono, wall, 0.5)
    assert {a.rule.name for a in monitor.evaluator.firing()} >= {"service_unavailable"}
    fired_version = registry.snapshot.version
    assert list(_svc(snapshot_to_proto(registry.snapshot), "chat").fallbacks) == ["backup"]
    for _ in range(30):  # 120 s without a single report on chat: its window (10 s) is empty
        _advance(monitor, mono, wall, 4.0)
    firing = {a.rule.name: a for a in monitor.evaluator.firing()}
    assert "service_unavailable" in firing and firing["service_unavailable"].no_data_since is not None
    assert registry.snapshot.version == fired_version  # nothing reverted, no new version
    assert list(_svc(snapshot_to_proto(registry.snapshot), "chat").fallbacks) == ["backup"]
    actions = [e.action for e in registry.audit(50)]
    assert "alert_recovered:service_unavailable" not in actions
    assert actions.count("alert_no_data:service_unavailable") == 1
    fams = families(ControlPlaneMetrics(monitor, seq=lambda: 1, agents=lambda: 0, reports=lambda: 0))
    assert value(fams, "switchgear_alert_firing", rule="service_unavailable", service="chat") == 1
    assert value(fams, "switchgear_alert_no_data", rule="service_unavailable", service="chat") == 1
    # Data that says it recovered does clear it (after clear_for_s), and reverts the action.
    for _ in range(12):
        _feed(collector, mono, "chat", ok=50)
        _advance(monitor, mono, wall, 4.0)
    assert monitor.evaluator.firing() == []
    assert list(_svc(snapshot_to_proto(registry.snapshot), "chat").fallbacks) == []
