"""Hypothesis properties of the scheduling core, over every strategy."""

from __future__ import annotations

import random

from hypothesis import example, given, settings
from hypothesis import strategies as st

from switchgear.dataplane.scheduling import STRATEGIES, Scheduler, pickers
from switchgear.dataplane.scheduling.model import Bounds, Candidate, Request
from tests.scheduling_helpers import cand, complete, ctx, occupy, stats

HEALTH = st.sampled_from(["healthy", "healthy", "degraded", "ejected", "draining"])


@st.composite
def pools(draw: st.DrawFn) -> tuple[list[Candidate], set[str], dict[str, tuple[int, float, bool]]]:
    """Candidates with random tiers, weights, prices, capacity and health; a random blocked set;
    random live numbers (in-flight, a latency sample, a failure or not) per candidate."""
    n = draw(st.integers(2, 7))
    cands = [
        cand(f"e{i}", weight=float(draw(st.integers(1, 9))), tier=(draw(st.integers(0, 1)), draw(st.integers(0, 2))),
             health=draw(HEALTH), max_concurrency=draw(st.sampled_from([0, 1, 4])),
             price=draw(st.sampled_from([0.0, 0.001, 0.01])))
        for i in range(n)
    ]
    blocked = {c.key for c in cands if draw(st.booleans())}
    live = {c.key: (draw(st.integers(0, 6)), draw(st.floats(0.01, 5.0)), draw(st.booleans())) for c in cands}
    return cands, blocked, live


@settings(max_examples=150, deadline=None)
@given(pool=pools(), strategy=st.sampled_from(sorted(STRATEGIES)), priority=st.integers(1, 10),
       seed=st.integers(0, 2**16), picks=st.integers(1, 5))
def test_a_blocked_or_ejected_endpoint_is_never_picked_while_a_healthy_one_exists(
    pool: tuple[list[Candidate], set[str], dict[str, tuple[int, float, bool]]], strategy: str, priority: int,
    seed: int, picks: int,
) -> None:
    cands, blocked, numbers = pool
    live = stats()
    for key, (in_flight, latency, failed) in numbers.items():
        complete(live, key, latency, tokens=20)
        if failed:
            from switchgear.adapters.base import ErrorKind

            complete(live, key, latency, error=ErrorKind.RETRYABLE)
        occupy(live, key, in_flight)
    scheduler = Scheduler(live, random.Random(seed), unavailable=blocked)
    request = Request(category="llm", priority=priority, input_tokens=100, output_tokens=50)
    usable = [c for c in cands if c.key not in blocked and c.health not in ("ejected", "draining")]
    for _ in range(picks):
        chosen = scheduler.pick(cands, request, strategy, group="s", bounds=Bounds(min_success_rate=0.99))
        if usable:
            assert chosen is not None and chosen.key not in blocked
            assert chosen.health not in ("ejected", "draining")
        else:
            assert chosen is None


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.integers(1, 50), min_size=1, max_size=8))
@example(weights=[2, 20, 2, 46, 46, 2, 46, 46])  # nginx's rule: 1.05 picks off after 1,000
@example(weights=[23, 39, 39, 39, 12, 1, 12, 12])  # nginx's rule: 1.03 off after 100
def test_smooth_wrr_stays_within_one_pick_of_exact_proportions(weights: list[int]) -> None:
    cands = [cand(f"e{i}", weight=float(w)) for i, w in enumerate(weights)]
    c = ctx(stats())
    counts = dict.fromkeys((x.key for x in cands), 0)
    total = sum(weights)
    for n in range(1, 1001):
        counts[pickers.smooth_weighted(cands, None, c).key] += 1
        if n % 50 == 0 or n == 1000:
            for x, w in zip(cands, weights, strict=True):
                assert abs(counts[x.key] - n * w / total) <= 1.0, (n, weights, counts)


@settings(max_examples=150, deadline=None)
@given(pool=pools(), seed=st.integers(0, 2**16))
def test_priority_never_uses_a_lower_tier_while_a_higher_one_has_healthy_capacity(
    pool: tuple[list[Candidate], set[str], dict[str, tuple[int, float, bool]]], seed: int,
) -> None:
    cands, _, numbers = pool
    live = stats()
    for key, (in_flight, _, _) in numbers.items():
        occupy(live, key, in_flight)
    scheduler = Scheduler(live, random.Random(seed))
    usable = [c for c in cands if c.health not in ("ejected", "draining")]

    def has_room(c: Candidate) -> bool:
        return c.health == "healthy" and (not c.max_concurrency or live.get(c.key).in_flight < c.max_concurrency)

    for _ in range(5):
        chosen = scheduler.pick(cands, Request(), "priority", group="s")
        if not usable:
            assert chosen is None
            continue
        assert chosen is not None
        roomy = [c.tier for c in usable if has_room(c)]
        if roomy:
            assert chosen.tier == max(roomy)
        else:
            assert chosen.tier == max(c.tier for c in usable)


CAPS = st.frozensets(st.sampled_from(["vision", "tools", "json"]), max_size=3)


@settings(max_examples=200, deadline=None)
@given(offered=st.lists(st.tuples(CAPS, st.sampled_from([0, 50, 200, 1000]), st.sampled_from([0, 30, 500])),
                        min_size=1, max_size=6),
       need=CAPS, input_tokens=st.integers(0, 1200), asked=st.integers(0, 600),
       strategy=st.sampled_from(sorted(STRATEGIES)), seed=st.integers(0, 2**16))
def test_a_pick_offers_every_required_capability_and_fits_its_window(
    offered: list[tuple[frozenset[str], int, int]], need: frozenset[str], input_tokens: int, asked: int,
    strategy: str, seed: int,
) -> None:
    """Whatever the strategy, the pick offers all the request requires and its context window (0:
    unknown) holds input + the asked answer (capped by the target's max_tokens); None exactly when
    no candidate does."""
    import dataclasses

    cands = [dataclasses.replace(cand(f"e{i}"), capabilities=caps, context_window=window, max_tokens=max_tokens)
             for i, (caps, window, max_tokens) in enumerate(offered)]
    request = Request(category="llm", input_tokens=input_tokens, output_tokens=asked or 256,
                      output_default=not asked, capabilities=need)

    def fits(c: Candidate) -> bool:
        out = min(asked, c.max_tokens) if c.max_tokens and asked else asked
        return need <= c.capabilities and (not c.context_window or input_tokens + out <= c.context_window)

    chosen = Scheduler(stats(), random.Random(seed)).pick(cands, request, strategy, group="s")
    if any(fits(c) for c in cands):
        assert chosen is not None and fits(chosen)
    else:
        assert chosen is None
