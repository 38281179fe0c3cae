"""The switch alert actions across a route's targets: switch_to_faster_service moves the route's
traffic to its fastest observed target, switch_to_cheaper_service to its cheapest, for as long
as the alert fires, and back on recovery — through the monitor, the real registry and store,
into the snapshot as agents get it, audited."""

from __future__ import annotations

import dataclasses

import pytest

from switchgear.controlplane import alerts as al
from switchgear.controlplane.collector import Collector, LoadDelta
from switchgear.controlplane.convert import service_from_proto, service_to_proto, snapshot_to_proto
from switchgear.controlplane.model import (
    Category,
    EndpointSpec,
    MonitoringSettings,
    Pricing,
    RegistryState,
    ServiceSpec,
)
from switchgear.controlplane.monitor import Monitor
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.snapshot import EMPTY_OVERLAY, Overlay, ServiceOverride, build, content_hash
from switchgear.controlplane.validate import validate_state
from tests import test_alerts
from tests.test_alerts import Clock


def price(usd_per_1k: float) -> Pricing:
    return Pricing(input_cost_per_1k_tokens=usd_per_1k, output_cost_per_1k_tokens=usd_per_1k)


def route(name: str = "gpt") -> ServiceSpec:
    """One route over three providers: different URLs and prices (b has the service's)."""
    return ServiceSpec(
        name=name, category=Category.LLM, protocol="openai", pricing=price(0.02),
        endpoints=(
            EndpointSpec("a", "http://127.0.0.1:9/v1", pricing=price(0.01)),
            EndpointSpec("b", "http://127.0.0.1:10/v1"),
            EndpointSpec("c", "http://127.0.0.1:11/v1", pricing=price(0.001)),
        ),
    )


RULE = {r.name: al.AlertRule(**dataclasses.asdict(r)) for r in MonitoringSettings().alert_rules}


# --- pure ------------------------------------------------------------------------------------


def test_a_target_s_price_travels_the_register_path_and_is_validated() -> None:
    spec = route()
    assert service_from_proto(service_to_proto(spec)) == spec
    bad = dataclasses.replace(spec, endpoints=(EndpointSpec("a", "http://127.0.0.1:9/v1", pricing=price(-1.0)),))
    problems = validate_state(RegistryState(services=(bad,)))
    assert [p.path for p in problems] == ["services[gpt].endpoints[0].pricing.input_cost_per_1k_tokens",
                                          "services[gpt].endpoints[0].pricing.output_cost_per_1k_tokens"]


@pytest.mark.parametrize(("latencies", "expect"), [
    ({"a": 12.0, "b": 0.3, "c": 0.5}, ("b",)),  # the fastest observed
    ({"a": 12.0}, ("b", "c")),  # the only one seen is slow itself: the untried ones
    ({"a": 0.2}, ("a",)),  # the only one seen is fast
    ({}, ("a", "b", "c")),
    ({"a": 12.0, "b": 11.0, "c": 15.0}, ()),  # all slow: nowhere to go
])
def test_faster_means_the_fastest_observed_target(latencies: dict[str, float], expect: tuple[str, ...]) -> None:
    chosen, why = al.switch_targets("switch_to_faster_service", route(), RULE["high_response_time"],
                                    lambda s, e: latencies.get(e))
    assert chosen == expect, why


def test_cheaper_means_the_lowest_price_a_target_s_own_else_the_service_s() -> None:
    chosen, why = al.switch_targets("switch_to_cheaper_service", route(), RULE["high_cost"], lambda s, e: None)
    assert chosen == ("c",) and "0.002" in why


def test_preferred_targets_are_served_one_priority_above_the_rest_and_hash_into_the_version() -> None:
    state = RegistryState(services=(route(),))
    overlay = Overlay(services=(("gpt", ServiceOverride("priority", None, ("c",))),))
    served = snapshot_to_proto(build(state, 2, overlay=overlay)).services[0]
    assert served.strategy == "priority"
    assert {e.id: e.priority for e in served.endpoints} == {"a": 0, "b": 0, "c": 1}
    plain = Overlay(services=(("gpt", ServiceOverride("priority")),))
    assert len({content_hash(state), content_hash(state, overlay), content_hash(state, plain)}) == 3
    assert content_hash(state, EMPTY_OVERLAY) == content_hash(state)
    gone = RegistryState(services=(dataclasses.replace(route(), endpoints=route().endpoints[:2]),))
    assert overlay.pruned(gone).services == (("gpt", ServiceOverride("priority", None, ())),)


# --- through the monitor ---------------------------------------------------------------------

rig = test_alerts.rig  # the fixture: registry, store, collector, monitor, clocks


def feed(collector: Collector, clock: Clock, endpoint: str, *, ok: int, latency_s: float = 0.1,
         cost: float = 0.0) -> None:
    collector.record("agent-1", [LoadDelta(
        service="gpt", endpoint=endpoint, category="llm", issued=ok, succeeded=ok,
        latency_sum_s=latency_s * ok, latency_count=ok, success_latency_sum_s=latency_s * ok,
        success_latency_count=ok, cost_usd=cost,
    )], clock.now)


def only(registry: Registry, rule: str) -> None:
    specs = tuple(s for s in MonitoringSettings().alert_rules if s.name == rule)
    settings = registry.state.settings
    registry.replace(dataclasses.replace(registry.state, settings=dataclasses.replace(
        settings, monitoring=dataclasses.replace(settings.monitoring, alert_rules=specs))), "test", "rules.yaml")


def served_priorities(registry: Registry) -> tuple[str, dict[str, int]]:
    (svc,) = snapshot_to_proto(registry.snapshot).services
    return svc.strategy, {e.id: e.priority for e in svc.endpoints}


CASES = [
    # rule, traffic per endpoint that trips it, the target the traffic moves to
    ("high_response_time", {"a": dict(ok=50, latency_s=14.0), "b": dict(ok=2, latency_s=0.4),
                            "c": dict(ok=2, latency_s=0.9)}, "b"),
    ("high_cost", {"a": dict(ok=50, cost=1.0), "b": dict(ok=2, cost=0.1)}, "c"),
]


@pytest.mark.parametrize(("rule", "traffic", "target"), CASES, ids=[c[0] for c in CASES])
def test_a_switch_moves_the_route_to_another_target_while_firing_and_back_on_recovery(
    rig: tuple[Registry, Collector, Monitor, Clock, Clock], rule: str,
    traffic: dict[str, dict[str, float]], target: str,
) -> None:
    registry, collector, monitor, mono, wall = rig
    registry.register(route(), "test")
    only(registry, rule)
    assert served_priorities(registry) == ("", {"a": 0, "b": 0, "c": 0})
    for endpoint, t in traffic.items():
        feed(collector, mono, endpoint, **t)  # type: ignore[arg-type]
    mono.now += 0.5
    wall.now += 0.5
    monitor.tick()
    strategy, priorities = served_priorities(registry)
    assert strategy == "priority" and priorities[target] == 1 and sum(priorities.values()) == 1
    audit = registry.audit(5)[0]
    assert audit.action == f"alert_fired:{rule}" and audit.target == "gpt"
    assert f"traffic -> ['{target}']" in audit.detail and audit.version == registry.snapshot.version
    # the moved traffic now runs on the target: the choice holds while the alert fires
    version = registry.snapshot.version
    for _ in range(2):
        feed(collector, mono, target, ok=20, latency_s=0.3)
        mono.now += 1.0
        wall.now += 1.0
        monitor.tick()
    assert registry.snapshot.version == version and monitor.evaluator.firing()
    # calm traffic, the old window ages out, then clear_for_s (30 s): back to the route's own
    for _ in range(12):
        for endpoint in ("a", "b", "c"):
            feed(collector, mono, endpoint, ok=20, latency_s=0.1)
        mono.now += 4.0
        wall.now += 4.0
        monitor.tick()
    assert monitor.evaluator.firing() == []
    assert served_priorities(registry) == ("", {"a": 0, "b": 0, "c": 0})
    recovered = [e for e in registry.audit(50) if e.action == f"alert_recovered:{rule}"]
    assert recovered and recovered[0].version == registry.snapshot.version


def test_a_faster_choice_holds_while_its_targets_stay_fast_and_is_made_again_when_they_slow() -> None:
    state = RegistryState(services=(route(),))
    alert = al.Alert(RULE["high_response_time"], "gpt", 14000.0, 0.0)
    seen = {"a": 14.0, "b": 0.30, "c": 0.25}
    first = al.policy([alert], state, latency=lambda s, e: seen.get(e), held={"gpt": ("b",)})
    assert dict(first.services)["gpt"].prefer == ("b",)  # held: b is still fast
    seen["b"] = 12.0  # b, now carrying the traffic, is itself past 10 s
    again = al.policy([alert], state, latency=lambda s, e: seen.get(e), held={"gpt": ("b",)})
    assert dict(again.services)["gpt"].prefer == ("c",)
    cheaper = al.Alert(RULE["high_cost"], "gpt", 500.0, 0.0)
    held = al.policy([cheaper], state, latency=lambda s, e: None, held={"gpt": ("b",)})
    assert dict(held.services)["gpt"].prefer == ("c",)  # cheaper is by price, never held
