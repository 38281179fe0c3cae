"""Tables of cases for every filter, scorer and picker of the scheduling core."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.scheduling import filters, pickers, scorers
from switchgear.dataplane.scheduling.model import Bounds, Candidate, Request
from switchgear.dataplane.scheduling.stats import FAILING, LiveStats
from tests.scheduling_helpers import ANY, NO_BOUNDS, Clock, cand, complete, ctx, names, occupy, stats

A, B, C = cand("a"), cand("b"), cand("c")


# --- filters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterCase:
    id: str
    f: filters.Filter
    cands: tuple[Candidate, ...]
    expect: list[str]
    request: Request = ANY
    bounds: Bounds = NO_BOUNDS
    setup: Callable[[LiveStats], None] = lambda live: None


FILTER_CASES = [
    FilterCase("usable drops ejected and draining, keeps degraded", filters.usable,
               (cand("a", health="ejected"), cand("b", health="draining"), cand("c", health="degraded")), ["c"]),
    FilterCase("blocked by a collection of keys", filters.not_blocked({"s/a", "s/c"}), (A, B, C), ["b"]),
    FilterCase("blocked by a predicate", filters.not_blocked(lambda k: k.endswith("b")), (A, B, C), ["a", "c"]),
    FilterCase("nothing blocked", filters.not_blocked(()), (A, B), ["a", "b"]),
    FilterCase("capabilities required", filters.has_capabilities,
               (cand("a", capabilities=frozenset({"chat"})), cand("b", capabilities=frozenset({"chat", "vision"}))),
               ["b"], request=Request(capabilities=frozenset({"vision"}))),
    FilterCase("no capability required keeps all", filters.has_capabilities,
               (cand("a"), cand("b", capabilities=frozenset({"chat"}))), ["a", "b"]),
    FilterCase("context window fits input + output; 0 = unknown", filters.fits_context,
               (cand("a", context_window=1000), cand("b", context_window=4000), cand("c")), ["b", "c"],
               request=Request(input_tokens=900, output_tokens=200)),
    FilterCase("tenant allow-list", filters.tenant_allowed(lambda t, c: (t, c.endpoint) != ("acme", "a")),
               (A, B), ["b"], request=Request(tenant="acme")),
    FilterCase("no tenant, no filtering", filters.tenant_allowed(lambda t, c: False), (A, B), ["a", "b"]),
    FilterCase("max cost per request", filters.within_cost,
               (cand("a", price=0.01), cand("b", price=0.001)), ["b"],
               request=Request(input_tokens=1000, output_tokens=1000), bounds=Bounds(max_cost_usd=0.005)),
    FilterCase("no cost bound keeps all", filters.within_cost, (cand("a", price=9.0), B), ["a", "b"],
               request=Request(input_tokens=1000)),
    FilterCase("min success rate", filters.min_success, (A, B, C), ["a", "c"], bounds=Bounds(min_success_rate=0.9),
               setup=lambda live: complete(live, "s/b", 0.1, error=filters_error(), n=3)),
    FilterCase("latency bound on the average, unknown passes", filters.within_latency, (A, B, C), ["a", "c"],
               bounds=Bounds(max_latency_s=1.0),
               setup=lambda live: (complete(live, "s/a", 0.5), complete(live, "s/b", 2.0))),
    FilterCase("latency bound counts the queue a request would join", filters.within_latency,
               (cand("a", max_concurrency=2), cand("b", max_concurrency=2)), ["b"], bounds=Bounds(max_latency_s=1.0),
               setup=lambda live: (complete(live, "s/a", 0.6), complete(live, "s/b", 0.6), occupy(live, "s/a", 3))),
    FilterCase("unknown latency passes only below capacity", filters.within_latency,
               (cand("a", max_concurrency=1), cand("b", max_concurrency=1)), ["b"], bounds=Bounds(max_latency_s=1.0),
               setup=lambda live: occupy(live, "s/a", 1)),
    FilterCase("capacity: in-flight below max_concurrency, 0 = unlimited", filters.has_capacity,
               (cand("a", max_concurrency=2), cand("b", max_concurrency=3), C), ["b", "c"],
               setup=lambda live: (occupy(live, "s/a", 2), occupy(live, "s/b", 2), occupy(live, "s/c", 50))),
    FilterCase("prefer keeps all when nothing qualifies", filters.prefer(filters.has_capacity),
               (cand("a", max_concurrency=1), cand("b", max_concurrency=1)), ["a", "b"],
               setup=lambda live: (occupy(live, "s/a", 1), occupy(live, "s/b", 1))),
    FilterCase("prefer narrows when something qualifies", filters.prefer(filters.has_capacity),
               (cand("a", max_concurrency=1), cand("b", max_concurrency=1)), ["b"],
               setup=lambda live: occupy(live, "s/a", 1)),
    FilterCase("top tier with capacity", filters.top_tier,
               (cand("a", tier=(0, 2)), cand("b", tier=(0, 2)), cand("c", tier=(0, 1))), ["a", "b"]),
    FilterCase("top tier full: spill to the next", filters.top_tier,
               (cand("a", tier=(0, 2), max_concurrency=1), cand("c", tier=(0, 1))), ["c"],
               setup=lambda live: occupy(live, "s/a", 1)),
    FilterCase("top tier only degraded: spill", filters.top_tier,
               (cand("a", tier=(0, 2), health="degraded"), cand("c", tier=(0, 1))), ["c"]),
    FilterCase("service priority outranks endpoint priority", filters.top_tier,
               (cand("a", tier=(1, 0)), cand("b", tier=(0, 9))), ["a"]),
    FilterCase("no tier has capacity: the top one queues", filters.top_tier,
               (cand("a", tier=(0, 2), max_concurrency=1), cand("c", tier=(0, 1), max_concurrency=1)), ["a"],
               setup=lambda live: (occupy(live, "s/a", 1), occupy(live, "s/c", 1))),
    FilterCase("cheapest, with 1% tolerance", filters.cheapest(0.01),
               (cand("a", price=0.0100), cand("b", price=0.01005), cand("c", price=0.02)), ["a", "b"],
               request=Request(input_tokens=1000)),
    FilterCase("cheapest: free ties", filters.cheapest(0.01), (A, B), ["a", "b"], request=Request(input_tokens=100)),
]


def filters_error():  # type: ignore[no-untyped-def]
    from switchgear.adapters.base import ErrorKind

    return ErrorKind.RETRYABLE


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: c.id)
def test_filter(case: FilterCase) -> None:
    live = stats()
    case.setup(live)
    assert names(case.f(list(case.cands), ctx(live, case.request, case.bounds))) == case.expect


# --- scorers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreCase:
    id: str
    scorer: scorers.Scorer
    cands: tuple[Candidate, ...]
    expect: list[float]
    request: Request = ANY
    setup: Callable[[LiveStats], None] = lambda live: None


SCORE_CASES = [
    ScoreCase("latency: best / own", scorers.latency_score, (A, B), [1.0, 0.25],
              setup=lambda live: (complete(live, "s/a", 0.5), complete(live, "s/b", 2.0))),
    ScoreCase("latency: unknown gets the median prior", scorers.latency_score, (A, B, C), [1.0, 0.5, 0.5],
              setup=lambda live: (complete(live, "s/a", 1.0), complete(live, "s/b", 2.0))),
    ScoreCase("latency: per output token for LLM requests", scorers.latency_score, (A, B), [0.5, 1.0],
              request=Request(output_tokens=100),
              setup=lambda live: (complete(live, "s/a", 1.0, tokens=50), complete(live, "s/b", 2.0, tokens=200))),
    ScoreCase("latency: TTFT for streams", scorers.latency_score, (A, B), [1.0, 0.5],
              request=Request(stream=True, output_tokens=100),
              setup=lambda live: (complete(live, "s/a", 5.0, tokens=100, ttft_s=0.1),
                                  complete(live, "s/b", 1.0, tokens=100, ttft_s=0.2))),
    ScoreCase("latency: queue beyond capacity", scorers.latency_score,
              (cand("a", max_concurrency=2), cand("b", max_concurrency=2)), [0.5, 1.0],
              setup=lambda live: (complete(live, "s/a", 1.0), complete(live, "s/b", 1.0), occupy(live, "s/a", 3))),
    ScoreCase("latency: nothing known, all tie", scorers.latency_score, (A, B), [1.0, 1.0]),
    ScoreCase("load: 1 - in_flight / capacity", scorers.load_score,
              (cand("a", max_concurrency=4), cand("b", max_concurrency=4), cand("c", max_concurrency=2)),
              [1.0, 0.5, 0.0], setup=lambda live: (occupy(live, "s/b", 2), occupy(live, "s/c", 3))),
    ScoreCase("load: unknown capacity, relative to the busiest + 1", scorers.load_score, (A, B), [1.0, 0.25],
              setup=lambda live: occupy(live, "s/b", 3)),
    ScoreCase("success: r / best r", scorers.success_score, (A, B), [1.0, 0.5],
              setup=lambda live: complete(live, "s/b", 0.1, error=filters_error())),
    ScoreCase("cost: log scale between cheapest and dearest", scorers.cost_score,
              (cand("a", price=0.001), cand("b", price=0.01), cand("c", price=0.1)), [1.0, 0.5, 0.0],
              request=Request(input_tokens=1000)),
    ScoreCase("cost: equal prices all score 1", scorers.cost_score, (cand("a", price=0.1), cand("b", price=0.1)),
              [1.0, 1.0], request=Request(input_tokens=1000)),
]


@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: c.id)
def test_scorer(case: ScoreCase) -> None:
    live = stats()
    case.setup(live)
    got = case.scorer(list(case.cands), ctx(live, case.request))
    assert got == pytest.approx(case.expect, abs=1e-9)
    assert all(0.0 <= s <= 1.0 for s in got)


@pytest.mark.parametrize(
    ("request_", "table"),
    [
        (Request(priority=9), scorers.HIGH_PRIORITY_WEIGHTS),
        (Request(priority=9, user_type="premium"), scorers.HIGH_PRIORITY_WEIGHTS),
        (Request(priority=7, user_type="premium"), scorers.PREMIUM_WEIGHTS),
        (Request(priority=5), scorers.STANDARD_WEIGHTS),
    ],
)
def test_seed_weight_tables(request_: Request, table: dict[str, float]) -> None:
    assert scorers.seed_weights(request_) is table
    assert sum(table.values()) == pytest.approx(1.0)


def test_weighted_combines_factors_by_the_request_s_table() -> None:
    factors = {"x": lambda cs, c: [1.0, 0.0], "y": lambda cs, c: [0.0, 1.0]}
    score = scorers.weighted(lambda r: {"x": 0.75, "y": 0.25}, factors)
    assert score([A, B], ctx(stats())) == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize(("x", "expect"), [(-1.0, 0.0), (0.3, 0.3), (7.0, 1.0), (float("nan"), 0.0)])
def test_clamp(x: float, expect: float) -> None:
    assert scorers.clamp(x) == expect


# --- pickers -----------------------------------------------------------------------------


def run_picker(picker: pickers.Picker, cands: list[Candidate], n: int, scores: list[float] | None = None,
               live: LiveStats | None = None) -> list[str]:
    c = ctx(live or stats())
    return [picker(cands, scores, c).endpoint for _ in range(n)]


@pytest.mark.parametrize(
    ("id_", "picker", "cands", "scores", "expect"),
    [
        ("round robin cycles", pickers.round_robin, [A, B, C], None, list("abcabc")),
        ("smooth WRR interleaves 5:1:1", pickers.smooth_weighted,
         [cand("a", weight=5.0), cand("b", weight=1.0), cand("c", weight=1.0)], None, list("aaabacaaaabaca")),
        ("smooth WRR equal weights is round robin", pickers.smooth_weighted, [A, B, C], None, list("abcabc")),
        ("smooth WRR 2:1", pickers.smooth_weighted, [cand("a", weight=2.0), cand("b", weight=1.0)], None,
         list("abaaba")),
        ("argmax takes the best", pickers.argmax, [A, B, C], [0.2, 0.9, 0.5], list("bbb")),
        ("argmax ties take turns", pickers.argmax, [A, B, C], [0.9, 0.9, 0.5], list("abab")),
        ("argmax without scores is round robin", pickers.argmax, [A, B], None, list("abab")),
    ],
)
def test_picker_sequences(id_: str, picker: pickers.Picker, cands: list[Candidate], scores: list[float] | None,
                          expect: list[str]) -> None:
    assert run_picker(picker, cands, len(expect), scores) == expect


def test_least_takes_the_smallest_key_and_rotates_ties() -> None:
    live = stats()
    occupy(live, "s/c", 1)
    assert run_picker(pickers.least(pickers.load_only), [A, B, C], 4, live=live) == list("abab")


def test_power_of_two_with_two_candidates_always_takes_the_better() -> None:
    live = stats()
    occupy(live, "s/a", 3)
    assert set(run_picker(pickers.power_of_two(pickers.load_then_latency), [A, B], 50, live=live)) == {"b"}


def test_power_of_two_never_takes_the_worst_of_three_and_spreads_the_rest() -> None:
    live = stats()
    occupy(live, "s/a", 1)
    occupy(live, "s/c", 5)
    got = run_picker(pickers.power_of_two(pickers.load_then_latency), [A, B, C], 300, live=live)
    assert "c" not in got and got.count("b") > got.count("a") > 0


def test_load_then_latency_breaks_load_ties_by_latency() -> None:
    live = stats()
    complete(live, "s/a", 2.0)
    complete(live, "s/b", 0.5)
    assert set(run_picker(pickers.power_of_two(pickers.load_then_latency), [A, B], 20, live=live)) == {"b"}


def test_latency_cost_divides_by_success_and_counts_the_queue() -> None:
    live = stats()
    complete(live, "s/a", 1.0, n=3)
    complete(live, "s/b", 1.0, n=3)
    complete(live, "s/b", 0.01, error=filters_error(), n=4)  # b: 4 of 7 failed
    c = ctx(live)
    (ka,), (kb,) = pickers.latency_cost([A, B], c)
    assert kb == pytest.approx(ka * (8 / 4))  # r_a = 4/4, r_b = 4/8 (one prior success each)
    occupy(live, "s/a", 9)
    (ka2,), _ = pickers.latency_cost([A, B], c)
    assert ka2 == pytest.approx(ka * 10)  # unknown capacity: Finagle's (in_flight + 1)


def test_random_weighted_follows_weights() -> None:
    got = run_picker(pickers.random_weighted, [cand("a", weight=9.0), cand("b", weight=1.0)], 1000)
    assert 850 < got.count("a") < 950


def test_slow_start_scales_weights_of_a_new_endpoint() -> None:
    from switchgear.dataplane.scheduling.stats import StatsConfig

    clock = Clock()
    live = LiveStats(clock, StatsConfig(slow_start_s=10.0, slow_start_min=0.1))
    live.get("s/a")
    clock.t += 100  # a is old; b appears now
    got = run_picker(pickers.smooth_weighted, [A, B], 110, live=live)
    assert got.count("b") == 10  # weight 1 x 0.1 against 1: 1 in 11


def test_min_success_probes_a_candidate_in_a_failure_streak_once_a_second() -> None:
    """Kept out by the rate while its late successes are held (stats.FAILING), a candidate
    gets one probe a second — the pick is only it — and none while that probe is in flight."""
    clock = Clock()
    live = stats(clock)
    bounds = Bounds(min_success_rate=0.95)
    complete(live, "s/a", 0.1, error=ErrorKind.RETRYABLE, n=FAILING)
    assert names(filters.min_success((A, B), ctx(live, bounds=bounds))) == ["b"]  # not yet: just failed
    clock.t += filters.PROBE_INTERVAL_S
    assert names(filters.min_success((A, B), ctx(live, bounds=bounds))) == ["a"]  # the probe
    assert names(filters.min_success((A, B), ctx(live, bounds=bounds))) == ["b"]  # once per interval
    occupy(live, "s/a", 1, tag="probe")
    clock.t += 10 * filters.PROBE_INTERVAL_S
    assert names(filters.min_success((A, B), ctx(live, bounds=bounds))) == ["b"]  # the probe is out
