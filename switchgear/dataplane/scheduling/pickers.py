"""Pickers: choose one candidate. Each is `(candidates, scores | None, ctx) -> Candidate`.

Candidates are never empty here (the scheduler returns None before). Pickers keep their state
in `ctx.memory` (per group and strategy), so it survives snapshot swaps; randomness comes only
from `ctx.rng`. Slow start: weight-based pickers scale weights, cost-based pickers divide
their cost, by `LiveStats.slow_start` (in [min, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from switchgear.dataplane.scheduling.model import Candidate, Context
from switchgear.dataplane.scheduling.scorers import latency_estimates, queue_factor

Picker = Callable[[Sequence[Candidate], Sequence[float] | None, Context], Candidate]
Key = Callable[[Sequence[Candidate], Context], list[tuple[float, ...]]]

TIE = 1e-9


def round_robin(cands: Sequence[Candidate], scores: Sequence[float] | None, ctx: Context) -> Candidate:
    """The next candidate in order; the counter advances once per pick."""
    turn: int = ctx.memory.get("rr", 0)
    ctx.memory["rr"] = turn + 1
    return cands[turn % len(cands)]


def smooth_weighted(cands: Sequence[Candidate], scores: Sequence[float] | None, ctx: Context) -> Candidate:
    """Smooth weighted round robin over w_i = weight_i x slow_start_i, with nginx's state and an
    earliest-deadline choice that keeps every share within one pick of exact.

    State: current_i, as in nginx. Each pick: current_i += w_i for every candidate (current_i / W
    is then how many picks candidate i is owed, W = sum w); among candidates owed something
    (current_i > 0) take the one whose next pick is due first — the smallest (W - current_i) /
    w_i, the earliest-deadline rule — and subtract W from its current. nginx takes the largest
    current instead, which can fall more than one pick behind (weights 2,20,2,46,46,2,46,46
    reach 1.05 after 1,000 picks); with deadlines the count of each candidate after n picks stays
    strictly within 1 of n x w_i / W (the EDF schedule of unit jobs released at k / rate with
    deadlines (k + 1) / rate is feasible when the rates sum to 1). Picks are interleaved
    (5,1,1 gives a a a b a c a), with no list expanded per weight unit as the seed's sample does.
    """
    current: dict[str, float] = ctx.memory.setdefault("swrr", {})
    weights = [c.weight * ctx.stats.slow_start(c.key, ctx.now) for c in cands]
    total = sum(weights)
    best: Candidate | None = None
    best_due, best_value = math.inf, -math.inf
    fallback, fallback_value = cands[0], -math.inf
    for c, w in zip(cands, weights, strict=True):
        value = current.get(c.key, 0.0) + w
        current[c.key] = value
        if value > 1e-9 * total:
            due = (total - value) / w
            # equal deadlines: the one owed more goes first (2:1 gives a b a, not a a b)
            if due < best_due - 1e-12 or (due <= best_due + 1e-12 and value > best_value):
                best, best_due, best_value = c, due, value
        if value > fallback_value:
            fallback, fallback_value = c, value
    chosen = best or fallback  # none owed: only after the candidate set changed; nginx's rule
    current[chosen.key] -= total
    return chosen


def random_weighted(cands: Sequence[Candidate], scores: Sequence[float] | None, ctx: Context) -> Candidate:
    """A random candidate with probability weight_i / sum weight (LiteLLM's simple-shuffle)."""
    return ctx.rng.choices(cands, weights=[c.weight for c in cands])[0]


def argmax(cands: Sequence[Candidate], scores: Sequence[float] | None, ctx: Context) -> Candidate:
    """The highest score; candidates within 1e-9 of it take turns (round robin)."""
    if scores is None:
        return round_robin(cands, None, ctx)
    top = max(scores)
    tied = [c for c, s in zip(cands, scores, strict=True) if s >= top - TIE]
    return tied[0] if len(tied) == 1 else round_robin(tied, None, ctx)


def least(key: Key) -> Picker:
    """The candidate with the smallest key; exact ties take turns (round robin)."""

    def pick(cands: Sequence[Candidate], scores: Sequence[float] | None, ctx: Context) -> Candidate:
        keys = key(cands, ctx)
        low = min(keys)
        tied = [c for c, k in zip(cands, keys, strict=True) if k == low]
        return tied[0] if len(tied) == 1 else round_robin(tied, None, ctx)

    return pick


def power_of_two(key: Key) -> Picker:
    """Power of two choices: two distinct random candidates, the smaller key wins (Mitzenmacher;
    Finagle's and Linkerd's balancers). With two candidates both are always compared. Picking
    the best of two random ones instead of the global best keeps many independent agents,
    each seeing only its own in-flight counts, from herding onto one endpoint."""

    def pick(cands: Sequence[Candidate], scores: Sequence[float] | None, ctx: Context) -> Candidate:
        n = len(cands)
        if n == 1:
            return cands[0]
        i = ctx.rng.randrange(n)
        j = ctx.rng.randrange(n - 1)
        j += j >= i
        pair = [cands[i], cands[j]]
        a, b = key(pair, ctx)
        return pair[0] if a <= b else pair[1]

    return pick


# --- keys --------------------------------------------------------------------------------


def _load(c: Candidate, ctx: Context) -> float:
    """(in_flight + 1) / capacity / slow_start: the load this pick would add, as a fraction of the
    endpoint's capacity (max_concurrency, or 1 when unknown), inflated while ramping up."""
    n = ctx.stats.get(c.key).in_flight
    return (n + 1) / (c.max_concurrency or 1) / ctx.stats.slow_start(c.key, ctx.now)


def load_then_latency(cands: Sequence[Candidate], ctx: Context) -> list[tuple[float, ...]]:
    """(load, expected latency): least loaded first, the faster one on a tie."""
    e = latency_estimates(cands, ctx)
    return [(_load(c, ctx), x) for c, x in zip(cands, e, strict=True)]


def load_only(cands: Sequence[Candidate], ctx: Context) -> list[tuple[float, ...]]:
    """(load,) — ties are left to the picker (round robin)."""
    return [(_load(c, ctx),) for c in cands]


def latency_cost(cands: Sequence[Candidate], ctx: Context) -> list[tuple[float, ...]]:
    """Finagle's peak-EWMA cost, extended: e_i / r_i x q_i / slow_start_i.

    e = latency_estimates (peak EWMA, per output token for LLMs, TTFT for streams, stall-aware);
    dividing by the success rate r gives the expected time to a success when failures are
    retried; q is the queue this pick joins: scorers.queue_factor when the endpoint's
    max_concurrency is known (no wait below it), else Finagle's (in_flight + 1).
    """
    e = latency_estimates(cands, ctx)
    out: list[tuple[float, ...]] = []
    for c, x in zip(cands, e, strict=True):
        s = ctx.stats.get(c.key)
        queue = queue_factor(c, s.in_flight) if c.max_concurrency else 1.0 + s.in_flight
        out.append((x / s.success_rate(ctx.now) * queue / ctx.stats.slow_start(c.key, ctx.now),))
    return out
