"""Strategies across a route's targets (per-target prices) and the seed's 0.8 / 0.6 load
shifting, with a capacity configured or learned from where latency bends. Pure: no I/O."""

from __future__ import annotations

import random
from collections import Counter
from types import MappingProxyType

import pytest

from switchgear.adapters.base import ErrorKind
from switchgear.cli_config import describe
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.convert import settings_to_proto
from switchgear.dataplane.convert import Call, _settings
from switchgear.dataplane.events import AttemptEnd
from switchgear.dataplane.router import Router
from switchgear.dataplane.scheduling import Scheduler
from switchgear.dataplane.scheduling.model import Bounds, Request, candidates_of
from switchgear.dataplane.scheduling.policy import bounds_for
from switchgear.dataplane.scheduling.shift import shed, utilisation
from switchgear.dataplane.scheduling.stats import Capacity, LiveStats, StatsConfig
from switchgear.dataplane.snapshot import AgentSettings, EndpointView, Pricing, SchedulingPolicy, ServiceView
from switchgear.v1 import discovery_pb2
from switchgear.wire.checks import SnapshotError, check_settings
from tests.scheduling_helpers import Clock, cand, complete, ctx, names, occupy, stats

SERVICE_PRICE = Pricing(input_cost_per_1k_tokens=0.01, output_cost_per_1k_tokens=0.03)


def route(*targets: tuple[str, float | None], max_concurrency: int = 0) -> ServiceView:
    """One llm route: targets (id, input = output price per 1k; None = as the service)."""
    return ServiceView(
        name="gpt", category="llm", protocol="openai", pricing=SERVICE_PRICE,
        endpoints=tuple(
            EndpointView(id=t, url=f"http://{t}", max_concurrency=max_concurrency, provider=t,
                         pricing=None if p is None else Pricing(input_cost_per_1k_tokens=p,
                                                                output_cost_per_1k_tokens=p))
            for t, p in targets
        ),
    )


def call(priority: int = 5) -> Call:
    return Call(request_id="r", category="llm", service="gpt", method="chat",
                payload={"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100},
                priority=priority, timeout_s=0.0, user_id="", session_id="")


def picks(router: Router, service: ServiceView, n: int = 200, priority: int = 5,
          settings: AgentSettings | None = None) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        e = router.pick(service, call=call(priority), settings=settings or AgentSettings())
        assert e is not None
        out[e.id] += 1
    return out


def feed(router: Router, key: str, latency_s: float, n: int = 20, error: bool = False) -> None:
    complete(router.stats, key, latency_s, n=n, tokens=100, error=ErrorKind.RETRYABLE if error else None)


def new_router() -> Router:
    return Router(stats(Clock()), random.Random(7))


# --- per-target prices -----------------------------------------------------------------------


def test_a_target_s_own_price_replaces_the_service_s_and_unset_means_as_the_service() -> None:
    cands = {c.endpoint: c for c in candidates_of(route(("azure", 0.002), ("openai", None)))}
    assert cands["azure"].pricing == Pricing(input_cost_per_1k_tokens=0.002, output_cost_per_1k_tokens=0.002)
    assert cands["openai"].pricing == SERVICE_PRICE
    r = Request(input_tokens=1000, output_tokens=1000)
    assert cands["azure"].cost(r) == pytest.approx(0.004)
    assert cands["openai"].cost(r) == pytest.approx(0.04)


def test_cost_optimized_takes_the_cheapest_target_while_it_meets_the_bounds() -> None:
    svc = route(("dear", 0.03), ("mid", 0.01), ("cheap", 0.001))
    router = new_router()
    for t in ("dear", "mid", "cheap"):
        feed(router, f"gpt/{t}", 0.5)
    assert picks(router, svc, priority=5) == {"cheap": 200}  # llm, priority 5: cost_optimized
    feed(router, "gpt/cheap", 0.5, n=5, error=True)  # 20/26 successes: below the seed's 95 %
    assert picks(router, svc, priority=5) == {"mid": 200}
    feed(router, "gpt/mid", 6.0, n=200)  # average above the seed's 5 s bound
    got = picks(router, svc, priority=5)
    assert got["dear"] >= 195 and got["cheap"] == 0, got  # mid: a trickle of probes (peers.off_slow)


def test_a_policy_cost_cap_counts_each_target_s_own_price() -> None:
    svc = route(("dear", 0.03), ("cheap", 0.001))
    router = new_router()
    feed(router, "gpt/cheap", 0.5, n=5, error=True)  # cheap fails the success bound...
    feed(router, "gpt/dear", 0.5)
    settings = AgentSettings(default_strategy="intelligent")
    assert picks(router, svc, settings=settings) == {"dear": 200}
    # ...but only the cheap one is within the category's cost cap: 500 in + 100 out tokens
    capped = AgentSettings(category_policies=MappingProxyType({"llm": SchedulingPolicy(max_cost_per_request=0.005)}))
    assert picks(router, svc, settings=capped) == {"cheap": 200}


def test_latency_takes_the_fastest_target_whatever_its_price() -> None:
    svc = route(("fast", 0.03), ("slow", 0.001))
    router = new_router()
    feed(router, "gpt/fast", 0.3)
    feed(router, "gpt/slow", 1.2)
    got = picks(router, svc, priority=9)  # llm, priority 9: latency
    assert got["fast"] >= 190, got


@pytest.mark.parametrize(("priority", "expect"), [(5, "cheap"), (9, "fast")])
def test_intelligent_weighs_price_against_speed_with_the_seed_s_tables(priority: int, expect: str) -> None:
    """fast: 0.5 s at 0.01; cheap: 1 s at 0.001. Standard table (cost 0.3, latency 0.2): cheap
    0.9 vs fast 0.7. High-priority table (latency 0.4, cost 0.1): fast 0.9 vs cheap 0.8."""
    svc = ServiceView(**{**route(("fast", 0.01), ("cheap", 0.001)).__dict__, "strategy": "intelligent"})
    router = new_router()
    feed(router, "gpt/fast", 0.5)
    feed(router, "gpt/cheap", 1.0)
    assert picks(router, svc, priority=priority) == {expect: 200}


# --- learned capacity ------------------------------------------------------------------------


def teach(live: LiveStats, key: str, level: int, latency_s: float, n: int = 8) -> None:
    """`n` answers of `latency_s` at `level` attempts in flight (this one included)."""
    occupy(live, key, level - 1, tag=f"lvl{level}")
    complete(live, key, latency_s, n=n)
    service, endpoint = key.split("/", 1)
    for i in range(level - 1):
        live.attempt_ended(AttemptEnd(f"lvl{level}-{key}-{i}", service, "llm", endpoint, 1, 0.0, None,
                                      cancelled=True))


def test_capacity_is_the_level_where_latency_passes_twice_its_unloaded_value() -> None:
    live = stats()
    teach(live, "s/a", 1, 0.10)
    teach(live, "s/a", 2, 0.12)
    teach(live, "s/a", 4, 0.18)  # 1.8x: not yet
    assert live.get("s/a").capacity.learned() == 0
    teach(live, "s/a", 8, 0.40)  # 4x at 8..15 in flight
    assert live.get("s/a").capacity.learned() == 8


def test_capacity_needs_enough_samples_at_both_levels() -> None:
    c = Capacity(StatsConfig())
    for _ in range(7):
        c.record(1, 0.1)
        c.record(16, 1.0)
    assert c.learned() == 0  # 7 < bend_samples at each level
    c.record(1, 0.1)
    assert c.learned() == 0
    c.record(16, 1.0)
    assert c.learned() == 16


# --- load shifting ---------------------------------------------------------------------------


def test_a_target_above_80_percent_sheds_to_one_below_60_percent() -> None:
    live = stats()
    a, b = cand("a", max_concurrency=10), cand("b", max_concurrency=10)
    stage = shed()
    occupy(live, "s/a", 9)
    assert names(stage([a, b], ctx(live))) == ["b"]
    occupy(live, "s/b", 6)  # b at 0.6: not below 0.6, nowhere to shed to
    assert names(stage([a, b], ctx(live))) == ["a", "b"]


def test_between_the_thresholds_nothing_moves_and_the_policy_s_thresholds_win() -> None:
    live = stats()
    a, b = cand("a", max_concurrency=10), cand("b", max_concurrency=10)
    occupy(live, "s/a", 8)  # 0.8 is not above 0.8
    assert names(shed()([a, b], ctx(live))) == ["a", "b"]
    assert names(shed()([a, b], ctx(live, bounds=Bounds(overload=0.7)))) == ["b"]
    occupy(live, "s/b", 3)  # b at 0.3: below 0.6, not below a policy's 0.2
    assert names(shed()([a, b], ctx(live, bounds=Bounds(overload=0.7, underload=0.2)))) == ["a", "b"]


def test_an_elastic_target_of_unknown_capacity_takes_the_shed_load_and_is_never_shed() -> None:
    live = stats()
    a, b = cand("a", max_concurrency=4), cand("b")
    occupy(live, "s/a", 4)
    occupy(live, "s/b", 50)
    assert utilisation(b, ctx(live)) is None
    assert names(shed()([a, b], ctx(live))) == ["b"]


def test_cost_optimized_moves_off_the_overloaded_cheapest_target_and_back() -> None:
    live = stats()
    scheduler = Scheduler(live, random.Random(1))
    cheap = cand("cheap", price=0.001, max_concurrency=10)
    dear = cand("dear", price=0.01, max_concurrency=10)
    request = Request(category="llm", input_tokens=100, output_tokens=100)
    occupy(live, "s/cheap", 9)
    got = scheduler.pick([cheap, dear], request, "cost_optimized")
    assert got is not None and got.endpoint == "dear"
    for i in range(3):  # three of cheap's attempts end: 0.6
        live.attempt_ended(AttemptEnd(f"busy-s/cheap-{i}", "s", "llm", "cheap", 1, 0.0, None, cancelled=True))
    got = scheduler.pick([cheap, dear], request, "cost_optimized")
    assert got is not None and got.endpoint == "cheap"


def test_learned_capacity_sheds_without_any_max_concurrency() -> None:
    live = stats()
    teach(live, "s/cheap", 1, 0.1)
    teach(live, "s/cheap", 4, 0.5)  # bends at 4 in flight
    cheap, dear = cand("cheap", price=0.001), cand("dear", price=0.01, max_concurrency=100)
    occupy(live, "s/cheap", 4)  # 4 / 4 = 1.0 > 0.8
    assert names(shed()([cheap, dear], ctx(live))) == ["dear"]


# --- config keys -----------------------------------------------------------------------------


def test_thresholds_are_config_keys_carried_to_the_agent_and_printed() -> None:
    yaml = """
external_services:
  coordination:
    scheduling_policies:
      llm_services: {overload_threshold: 0.9, underload_threshold: 0.5}
"""
    state = load_config(yaml, env={})
    llm = _settings(settings_to_proto(state.settings)).category_policies["llm"]
    assert (llm.overload_threshold, llm.underload_threshold) == (0.9, 0.5)
    b = bounds_for("llm", {"llm": llm})
    assert (b.overload, b.underload) == (0.9, 0.5)
    assert "load shifting above 0.9 to targets below 0.5 utilisation" in describe(state)


@pytest.mark.parametrize(("text", "path"), [
    ("{overload_threshold: 1.5}", "overload_threshold"),
    ("{underload_threshold: -0.1}", "underload_threshold"),
    ("{underload_threshold: 0.85}", "underload_threshold"),  # not below the default 0.8
    ("{overload_threshold: 0.5}", "underload_threshold"),  # the default 0.6 is not below 0.5
])
def test_thresholds_out_of_range_or_inverted_are_refused_naming_the_key(text: str, path: str) -> None:
    yaml = f"""
external_services:
  coordination:
    scheduling_policies:
      llm_services: {text}
"""
    with pytest.raises(ConfigError) as info:
        load_config(yaml, env={})
    assert path in str(info.value)


@pytest.mark.parametrize("name", ["overload_threshold", "underload_threshold"])
def test_an_agent_refuses_a_snapshot_threshold_outside_0_1_naming_it(name: str) -> None:
    settings = discovery_pb2.DataPlaneSettings(category_policies={"llm": discovery_pb2.CategoryPolicy(**{name: 1.5})})
    with pytest.raises(SnapshotError) as info:
        check_settings(settings)
    assert info.value.path == f"settings.category_policies[llm].{name}"
    check_settings(discovery_pb2.DataPlaneSettings(
        category_policies={"llm": discovery_pb2.CategoryPolicy(**{name: 0.7})}))


def test_a_target_s_own_max_tokens_is_its_output_estimate_when_the_call_asks_for_none() -> None:
    svc = ServiceView(**{**route(("short", 0.01), ("long", 0.005)).__dict__, "max_tokens": 100})
    svc = ServiceView(**{**svc.__dict__, "endpoints": (
        EndpointView(id="short", url="http://s", pricing=Pricing(output_cost_per_1k_tokens=0.01), max_tokens=100),
        EndpointView(id="long", url="http://l", pricing=Pricing(output_cost_per_1k_tokens=0.005), max_tokens=1000),
    )})
    cands = {c.endpoint: c for c in candidates_of(svc)}
    unbounded = Request(output_tokens=100, output_default=True)  # the service's 100 by default
    assert cands["short"].cost(unbounded) == pytest.approx(0.001)
    assert cands["long"].cost(unbounded) == pytest.approx(0.005)  # its own 1,000 tokens at half the price
    asked = Request(output_tokens=100)
    assert cands["long"].cost(asked) == pytest.approx(0.0005)
    router = new_router()
    no_bound = Call(request_id="r", category="llm", service="gpt", method="chat",
                    payload={"messages": [{"role": "user", "content": "hi"}]}, priority=5, timeout_s=0.0,
                    user_id="", session_id="")
    got = router.pick(svc, call=no_bound, settings=AgentSettings())
    assert got is not None and got.id == "short"  # 0.001 vs 0.005 USD expected
    got = router.pick(svc, call=call(), settings=AgentSettings())  # asks for 100: long is cheaper
    assert got is not None and got.id == "long"


def test_a_category_route_prices_each_target_as_its_own_service() -> None:
    """The seed's `llm` route gathers services priced apart; its targets carry no price of
    their own, so each candidate's price is its member service's (the effective target)."""
    from switchgear.dataplane.convert import category_routes

    def member(name: str, price: float) -> ServiceView:
        return ServiceView(name=name, category="llm", protocol="openai",
                           pricing=Pricing(input_cost_per_1k_tokens=price, output_cost_per_1k_tokens=price),
                           endpoints=(EndpointView(id="default", url=f"http://{name}"),))

    services = {s.name: s for s in (member("gpt-4", 0.03), member("gpt-3.5-turbo", 0.002), member("claude", 0.015))}
    llm = category_routes(services)["llm"]
    prices = {c.endpoint: c.pricing.input_cost_per_1k_tokens for c in candidates_of(llm)}
    assert prices == {"gpt-4.default": 0.03, "gpt-3.5-turbo.default": 0.002, "claude.default": 0.015}
    router = Router(rng=random.Random(1))
    settings = AgentSettings(category_policies=MappingProxyType({"llm": SchedulingPolicy(strategy="cost_optimized")}))
    assert picks(router, llm, n=20, settings=settings).most_common(1)[0][0] == "gpt-3.5-turbo.default"
