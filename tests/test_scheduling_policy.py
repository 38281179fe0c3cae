"""Which strategy applies (precedence), policies carried in snapshots, the agent's Router, and
each of the seven strategies on a small table of situations."""

from __future__ import annotations

import random
from types import MappingProxyType

import pytest
from google.protobuf import duration_pb2

from switchgear.adapters import builtin_adapters
from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.convert import Call, SnapshotError, call_from_proto, snapshot_from_proto
from switchgear.dataplane.router import Router
from switchgear.dataplane.scheduling import STRATEGIES, Scheduler
from switchgear.dataplane.scheduling.model import Bounds, Candidate, Request, estimate_tokens, user_type_of
from switchgear.dataplane.scheduling.policy import bounds_for, choose_strategy, seed_rule
from switchgear.dataplane.snapshot import AgentSettings, EndpointView, Holder, SchedulingPolicy, ServiceView
from switchgear.v1 import common_pb2, discovery_pb2, gateway_pb2
from tests.scheduling_helpers import NO_BOUNDS, Clock, cand, complete, occupy, stats

LLM = SchedulingPolicy(strategy="round_robin", max_cost_per_request=0.05, min_success_rate=0.95)


@pytest.mark.parametrize(
    ("service_strategy", "category", "priority", "policies", "default", "expect"),
    [
        ("weighted", "llm", 9, {"llm": LLM}, "intelligent", "weighted"),  # service wins
        ("", "llm", 9, {"llm": LLM}, "intelligent", "latency"),  # then the seed's priority > 7 rule
        ("", "llm", 8, {"llm": SchedulingPolicy(strategy="cost_optimized")}, "intelligent", "latency"),
        ("", "llm", 7, {"llm": LLM}, "intelligent", "round_robin"),  # then the category policy
        ("", "llm", 5, {"llm": LLM}, "intelligent", "round_robin"),
        ("", "document", 9, {"document": SchedulingPolicy(strategy="round_robin")}, "intelligent", "round_robin"),
        ("", "llm", 9, {}, "intelligent", "latency"),  # then the seed's rule
        ("", "llm", 8, {}, "intelligent", "latency"),
        ("", "llm", 7, {}, "intelligent", "cost_optimized"),
        ("", "llm", 5, {"llm": SchedulingPolicy(min_success_rate=0.9)}, "intelligent", "cost_optimized"),
        ("", "document", 5, {}, "intelligent", "least_loaded"),
        ("", "knowledge_graph", 5, {}, "intelligent", "weighted"),
        ("", "vector_db", 5, {}, "intelligent", "intelligent"),  # then the default
        ("", "embedding", 5, {}, "round_robin", "round_robin"),
        ("", "", 5, {}, "intelligent", "intelligent"),
        ("teleport", "vector_db", 5, {"vector_db": SchedulingPolicy(strategy="warp")}, "intelligent", "intelligent"),
        ("", "vector_db", 5, {}, "warp", "round_robin"),  # nothing known at all
    ],
)
def test_strategy_precedence(service_strategy: str, category: str, priority: int,
                             policies: dict[str, SchedulingPolicy], default: str, expect: str) -> None:
    got = choose_strategy(service_strategy=service_strategy, category=category, priority=priority,
                          policies=policies, default_strategy=default, known=STRATEGIES)
    assert got == expect


def test_seed_rule_and_bounds() -> None:
    assert seed_rule("vector_db", 9) == ""
    assert bounds_for("llm", {"llm": LLM}) == Bounds(max_cost_usd=0.05, min_success_rate=0.95)
    assert bounds_for("document", {"llm": LLM}) == Bounds()


# --- snapshot and request conversion ------------------------------------------------------


def settings_snapshot(**policies: discovery_pb2.CategoryPolicy) -> discovery_pb2.Snapshot:
    service = common_pb2.Service(name="chat", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai",
                                 endpoints=[common_pb2.Endpoint(id="a", url="http://127.0.0.1:9/v1", weight=1)])
    return discovery_pb2.Snapshot(version="3.x", services=[service],
                                  settings=discovery_pb2.DataPlaneSettings(category_policies=policies))


def test_category_policies_arrive_in_agent_settings() -> None:
    timeout = duration_pb2.Duration(seconds=300)
    snap = snapshot_from_proto(settings_snapshot(
        llm=discovery_pb2.CategoryPolicy(strategy="cost_optimized", max_cost_per_request=0.05, min_success_rate=0.95),
        document=discovery_pb2.CategoryPolicy(strategy="least_loaded", max_queue_size=50, timeout=timeout),
    ), "3.x", builtin_adapters())
    assert dict(snap.settings.category_policies) == {
        "document": SchedulingPolicy(strategy="least_loaded", max_queue_size=50, timeout_s=300.0),
        "llm": SchedulingPolicy(strategy="cost_optimized", max_cost_per_request=0.05, min_success_rate=0.95),
    }


@pytest.mark.parametrize(
    ("policies", "path"),
    [
        ({"llm": discovery_pb2.CategoryPolicy(min_success_rate=1.5)},
         "settings.category_policies[llm].min_success_rate"),
        ({"llm": discovery_pb2.CategoryPolicy(max_cost_per_request=-1)},
         "settings.category_policies[llm].max_cost_per_request"),
        ({"gpu": discovery_pb2.CategoryPolicy(strategy="latency")}, "settings.category_policies[gpu]"),
    ],
)
def test_a_bad_category_policy_is_nacked_naming_the_field(policies: dict[str, discovery_pb2.CategoryPolicy],
                                                          path: str) -> None:
    with pytest.raises(SnapshotError) as info:
        snapshot_from_proto(settings_snapshot(**policies), "3.x", builtin_adapters())
    assert info.value.path == path


@pytest.mark.parametrize(
    ("user_id", "user_type"),
    [("premium:alice", "premium"), ("standard:bob", "standard"), ("alice", "standard"), ("", "standard"),
     ("gold:carol", "standard"), ("premium:", "premium")],
)
def test_user_type_convention(user_id: str, user_type: str) -> None:
    assert user_type_of(user_id) == user_type
    msg = gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=b"{}", user_id=user_id)
    assert call_from_proto(msg).user_type == user_type


@pytest.mark.parametrize(
    ("payload", "default_max", "expect"),
    [
        ({"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 100}, 0, (11, 100)),
        ({"messages": [{"role": "user", "content": "x" * 41}]}, 2048, (12, 2048)),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}]}]}, 0, (3, 256)),
        ({"input": ["abcd", "efgh"]}, 0, (2, 0)),
        ({"prompt": "abcdefgh", "max_completion_tokens": 7, "max_tokens": 9}, 0, (2, 7)),
        ({}, 0, (0, 0)),
    ],
)
def test_token_estimate(payload: dict[str, object], default_max: int, expect: tuple[int, int]) -> None:
    assert estimate_tokens(payload, default_max) == expect


# --- the agent's Router --------------------------------------------------------------------


def service(strategy: str = "", category: str = "llm", *ids: str) -> ServiceView:
    eps = tuple(EndpointView(id=i, url=f"http://127.0.0.1:9/{i}") for i in (ids or ("a", "b")))
    return ServiceView(name="chat", category=category, protocol="openai", endpoints=eps, strategy=strategy)


def call(priority: int = 5, user_id: str = "") -> Call:
    return Call("r", "", "chat", "chat.completions", {"messages": [{"role": "user", "content": "hi"}]},
                priority, 0.0, user_id, "", user_type_of(user_id))


def router(clock: Clock | None = None) -> Router:
    return Router(stats(clock), random.Random(1))


def test_router_follows_the_category_policy_of_the_settings_it_is_given() -> None:
    r = router()
    rr = AgentSettings(category_policies=MappingProxyType({"llm": SchedulingPolicy(strategy="round_robin")}))
    svc = service()
    assert [r.pick(svc, call=call(), settings=rr).id for _ in range(4)] == ["a", "b", "a", "b"]  # type: ignore[union-attr]
    complete(r.stats, "chat/a", 0.05, tokens=10)
    complete(r.stats, "chat/b", 0.5, tokens=10)
    fast = AgentSettings(category_policies=MappingProxyType({"llm": SchedulingPolicy(strategy="latency")}))
    picks = [r.pick(svc, call=call(), settings=fast).id for _ in range(10)]  # type: ignore[union-attr]
    assert picks.count("a") >= 9  # b, 10x slower than its peer, gets at most a probe (scheduling/peers.py)
    assert r.strategy_for(service("weighted"), call(), fast) == "weighted"


def test_router_s_strategy_follows_each_call_s_priority_the_view_and_the_settings() -> None:
    """The router works out a service's strategy and bounds once per view, settings and side of
    the priority rule: interleaved priority-5 and priority-9 calls each get their own, and a new
    view or new settings theirs at once (what it hands the scheduler, which still picks)."""
    r = router()
    handed: list[tuple[str, Bounds]] = []
    pick = r.scheduler.pick

    def spy(*args: object, **kwargs: object) -> object:
        handed.append((str(args[2]), kwargs["bounds"]))  # type: ignore[arg-type]
        return pick(*args, **kwargs)  # type: ignore[arg-type]

    r.scheduler.pick = spy  # type: ignore[method-assign]
    rr = AgentSettings(category_policies=MappingProxyType({"llm": LLM}))
    svc = service()
    for priority in (5, 9, 5, 8, 7):
        assert r.pick(svc, call=call(priority), settings=rr) is not None
    assert [name for name, _ in handed] == ["round_robin", "latency", "round_robin", "latency", "round_robin"]
    assert {bounds for _, bounds in handed} == {bounds_for("llm", rr.category_policies)}
    assert bounds_for("llm", rr.category_policies).max_cost_usd == 0.05
    handed.clear()
    r.pick(service("weighted"), call=call(9), settings=rr)  # a new view: the service's own strategy
    r.pick(svc, call=call(5), settings=AgentSettings())  # new settings: no policy, the seed's rule, no bounds
    assert handed == [("weighted", bounds_for("llm", rr.category_policies)), ("cost_optimized", NO_BOUNDS)]


def test_router_without_a_policy_spreads_equal_prices_and_skips_tried_endpoints() -> None:
    r = router()
    svc = service("", "llm", "a", "b", "c")
    picks = [r.pick(svc, call=call(), settings=AgentSettings()).id for _ in range(6)]  # type: ignore[union-attr]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]  # cost_optimized, ties in turn
    assert r.pick(svc, ["a", "b"], call=call()).id == "c"  # type: ignore[union-attr]
    assert r.pick(svc, ["a", "b", "c"], call=call()) is None


def test_router_reads_the_holder_s_settings_when_called_without_them() -> None:
    holder = Holder()
    r = Router(stats(), random.Random(1), holder=holder)
    from switchgear.dataplane.snapshot import AgentSnapshot

    holder.current = AgentSnapshot("1", MappingProxyType({}), AgentSettings(
        category_policies=MappingProxyType({"llm": SchedulingPolicy(strategy="round_robin")})))
    assert [r.pick(service(), ()).id for _ in range(3)] == ["a", "b", "a"]  # type: ignore[union-attr]


def test_router_honours_the_unavailable_input_of_the_resilience_engine() -> None:
    blocked = {"chat/a"}
    r = Router(stats(), random.Random(1), unavailable=lambda key: key in blocked)
    assert {r.pick(service("round_robin"), call=call()).id for _ in range(4)} == {"b"}  # type: ignore[union-attr]
    blocked.clear()
    assert {r.pick(service("round_robin"), call=call()).id for _ in range(4)} == {"a", "b"}  # type: ignore[union-attr]


def test_router_skips_ejected_and_draining_endpoints() -> None:
    eps = (EndpointView(id="a", url="http://x/a", health="ejected"), EndpointView(id="b", url="http://x/b"),
           EndpointView(id="c", url="http://x/c", health="draining"))
    svc = ServiceView(name="chat", category="llm", protocol="openai", endpoints=eps, strategy="round_robin")
    assert {router().pick(svc, call=call()).id for _ in range(4)} == {"b"}  # type: ignore[union-attr]


# --- the seven strategies on small tables ---------------------------------------------------


SMALL = Request(input_tokens=100, output_tokens=100)


def pick_counts(strategy: str, cands: list[Candidate], n: int, setup=lambda live: None,  # type: ignore[no-untyped-def]
                request: Request = SMALL, bounds: Bounds = NO_BOUNDS) -> dict[str, int]:
    live = stats()
    setup(live)
    s = Scheduler(live, random.Random(3), peers=None)  # the strategy alone (peers: test_tail_scheduling)
    counts: dict[str, int] = {}
    for _ in range(n):
        chosen = s.pick(cands, request, strategy, group="g", bounds=bounds)
        assert chosen is not None
        counts[chosen.endpoint] = counts.get(chosen.endpoint, 0) + 1
    return counts


def slow_b(live):  # type: ignore[no-untyped-def]
    complete(live, "s/a", 0.2, tokens=100, n=3)
    complete(live, "s/b", 2.0, tokens=100, n=3)


@pytest.mark.parametrize(
    ("strategy", "cands", "setup", "request_", "bounds", "expect"),
    [
        ("round_robin", [cand("a"), cand("b")], slow_b, Request(), Bounds(), {"a": 5, "b": 5}),
        ("weighted", [cand("a", weight=4.0), cand("b", weight=1.0)], slow_b, Request(), Bounds(), {"a": 8, "b": 2}),
        ("least_loaded", [cand("a"), cand("b")], lambda live: occupy(live, "s/a", 3), Request(), Bounds(), {"b": 10}),
        ("least_loaded", [cand("a"), cand("b")], slow_b, Request(), Bounds(), {"a": 10}),
        ("priority", [cand("a", tier=(0, 1), max_concurrency=1), cand("b", tier=(0, 1)), cand("c")], None,
         Request(), Bounds(), {"a": 5, "b": 5}),
        ("priority", [cand("a", tier=(0, 1), max_concurrency=1), cand("c", tier=(0, 0))],
         lambda live: occupy(live, "s/a", 1), Request(), Bounds(), {"c": 4}),  # full top tier spills
        ("cost_optimized", [cand("a", price=0.01), cand("b", price=0.001), cand("c", price=0.002)], None,
         Request(input_tokens=100), Bounds(), {"b": 10}),
        ("cost_optimized", [cand("a", price=0.01), cand("b", price=0.001)],
         lambda live: complete(live, "s/b", 0.1, error=ErrorKind.RETRYABLE, n=2),
         Request(input_tokens=100), Bounds(), {"a": 10}),  # b fails the seed's 95% success bound
        ("cost_optimized", [cand("a", price=0.01), cand("b", price=0.001)],
         lambda live: (complete(live, "s/a", 0.1, error=ErrorKind.RETRYABLE, n=2),
                       complete(live, "s/b", 0.1, error=ErrorKind.RETRYABLE, n=2)),
         Request(input_tokens=100), Bounds(), {"b": 10}),  # none qualifies: all, then cheapest
        ("cost_optimized", [cand("a", price=0.01), cand("b", price=0.001)],
         lambda live: (complete(live, "s/a", 1.0), complete(live, "s/b", 9.0)),
         Request(input_tokens=100), Bounds(), {"a": 10}),  # b is over the seed's 5 s average
        ("latency", [cand("a"), cand("b")], slow_b, Request(output_tokens=100), Bounds(), {"a": 10}),
        ("intelligent", [cand("a", price=0.01), cand("b", price=0.0001)], slow_b,
         Request(priority=9, input_tokens=100, output_tokens=100), Bounds(), {"a": 10}),
        ("intelligent", [cand("a", price=0.01), cand("b", price=0.0001)], slow_b,
         Request(priority=5, input_tokens=100, output_tokens=100), Bounds(), {"b": 10}),
    ],
)
def test_strategy_table(strategy: str, cands: list[Candidate], setup, request_: Request, bounds: Bounds,  # type: ignore[no-untyped-def]
                        expect: dict[str, int]) -> None:
    assert pick_counts(strategy, cands, sum(expect.values()), setup or (lambda live: None), request_, bounds) == expect


def test_policy_cost_cap_applies_to_every_strategy() -> None:
    cands = [cand("a", price=0.01), cand("b", price=0.001)]
    got = pick_counts("round_robin", cands, 4, request=Request(input_tokens=1000), bounds=Bounds(max_cost_usd=0.005))
    assert got == {"b": 4}
