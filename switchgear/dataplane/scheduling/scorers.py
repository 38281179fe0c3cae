"""Scorers: how good each candidate is for a request, in [0, 1], 1 = best.

Each is `(candidates, ctx) -> list[float]`, one score per candidate, computed over the whole
candidate set: scores are *relative* (normalised across the candidates), never fixed
constants like the seed's /10000 ms or /0.01 USD, so they work for a 50 ms embedding service
and a 30 s document parser alike. Every value passes through `clamp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from switchgear.dataplane.scheduling.model import Candidate, Context, Request

Scorer = Callable[[Sequence[Candidate], Context], list[float]]


def clamp(x: float) -> float:
    """x limited to [0, 1]; NaN -> 0."""
    if x != x or x <= 0.0:  # NaN compares unequal to itself
        return 0.0
    return 1.0 if x >= 1.0 else x


def latency_estimates(cands: Sequence[Candidate], ctx: Context) -> list[float]:
    """Expected seconds for the request on each candidate, comparable across candidates.

    e_i = the endpoint's estimate (stats.EndpointStats.expected_latency), or the prior when it
    has none, where prior = median of the known estimates (1 s when none is known: then all
    tie). The stale estimate of an idle endpoint regresses to the prior: e_i = prior +
    (e_i - prior) x exp(-(now - last sample) / forget_s), so a slow endpoint is eventually
    probed again — by one request: while it has attempts in flight, its estimate stays put.
    Finally e_i is multiplied by the stall factor (oldest outstanding attempt vs peak latency).
    """
    stats = [ctx.stats.get(c.key) for c in cands]
    raw = [s.expected_latency(ctx.request, ctx.now) for s in stats]
    known = sorted(x for x in raw if x is not None)
    prior = known[len(known) // 2] if known else 1.0
    forget = ctx.stats.config.forget_s
    out = []
    for s, estimate in zip(stats, raw, strict=True):
        if estimate is None:
            e = prior
        elif s.last_sample_at is not None and forget > 0 and not s.in_flight:
            e = prior + (estimate - prior) * math.exp(-max(0.0, ctx.now - s.last_sample_at) / forget)
        else:
            e = estimate
        out.append(max(e, 1e-6) * s.stall_factor(ctx.now, prior))
    return out


def queue_factor(c: Candidate, in_flight: int) -> float:
    """How much longer than its service time a request sent now waits at a FIFO endpoint with
    `max_concurrency` servers: 1 + max(0, in_flight + 1 - capacity) / capacity. 1 when the
    capacity is unknown (an elastic provider API)."""
    cap = c.max_concurrency
    return 1.0 + max(0, in_flight + 1 - cap) / cap if cap else 1.0


def latency_score(cands: Sequence[Candidate], ctx: Context) -> list[float]:
    """s_i = min_j t_j / t_i, t_i = e_i x queue_factor_i: the response time a request sent now
    should see (e = latency_estimates, s). The fastest scores 1; twice as slow, 0.5."""
    e = latency_estimates(cands, ctx)
    t = [x * queue_factor(c, ctx.stats.get(c.key).in_flight) for c, x in zip(cands, e, strict=True)]
    best = min(t, default=1.0)
    return [clamp(best / x) for x in t]


def utilisation(c: Candidate, ctx: Context, peak_in_flight: int) -> float:
    """in_flight / max_concurrency when the capacity is known, else in_flight / (peak + 1) where
    peak is the highest in-flight among the candidates."""
    n = ctx.stats.get(c.key).in_flight
    return n / c.max_concurrency if c.max_concurrency else n / (peak_in_flight + 1)


def load_score(cands: Sequence[Candidate], ctx: Context) -> list[float]:
    """s_i = 1 - utilisation_i (see `utilisation`): idle scores 1, at capacity 0."""
    peak = max((ctx.stats.get(c.key).in_flight for c in cands), default=0)
    return [clamp(1.0 - utilisation(c, ctx, peak)) for c in cands]


def success_score(cands: Sequence[Candidate], ctx: Context) -> list[float]:
    """s_i = r_i / max_j r_j, r = windowed success rate (stats.SuccessWindow.rate)."""
    r = [ctx.stats.get(c.key).success_rate(ctx.now) for c in cands]
    best = max(r, default=1.0)
    return [clamp(x / best) if best > 0 else 1.0 for x in r]


def cost_score(cands: Sequence[Candidate], ctx: Context) -> list[float]:
    """s_i = 1 - ln(c_i / c_min) / ln(c_max / c_min), c = expected USD for this request (price x
    estimated tokens, floored at 1e-9): the cheapest scores 1, the dearest 0, and the rest by
    where they sit on a log scale. Log, because prices span orders of magnitude (a hosted
    frontier model and a local one differ 100x): on a linear ratio every endpoint but the
    cheapest would score ~0 and cost would swamp the other factors. All 1 when prices tie."""
    c = [max(x.cost(ctx.request), 1e-9) for x in cands]
    low, high = min(c, default=1.0), max(c, default=1.0)
    if high <= low * (1 + 1e-9):
        return [1.0] * len(c)
    span = math.log(high / low)
    return [clamp(1.0 - math.log(x / low) / span) for x in c]


#: The seed's weight tables (IntelligentLoadBalancer._calculate_service_score), exactly.
HIGH_PRIORITY_WEIGHTS = {"load": 0.2, "latency": 0.4, "success": 0.3, "cost": 0.1}
PREMIUM_WEIGHTS = {"load": 0.25, "latency": 0.3, "success": 0.3, "cost": 0.15}
STANDARD_WEIGHTS = {"load": 0.2, "latency": 0.2, "success": 0.3, "cost": 0.3}


def seed_weights(request: Request) -> Mapping[str, float]:
    """priority > 7 -> high-priority table; else premium user -> premium; else standard."""
    if request.priority > 7:
        return HIGH_PRIORITY_WEIGHTS
    if request.user_type == "premium":
        return PREMIUM_WEIGHTS
    return STANDARD_WEIGHTS


SEED_FACTORS: Mapping[str, Scorer] = {
    "load": load_score, "latency": latency_score, "success": success_score, "cost": cost_score,
}


def weighted(weights: Callable[[Request], Mapping[str, float]], factors: Mapping[str, Scorer]) -> Scorer:
    """s_i = sum_k w_k s_k,i / sum_k w_k over the factors named in `weights(request)`."""

    def score(cands: Sequence[Candidate], ctx: Context) -> list[float]:
        table = weights(ctx.request)
        total = sum(table.values()) or 1.0
        acc = [0.0] * len(cands)
        for name, w in table.items():
            if w:
                for i, s in enumerate(factors[name](cands, ctx)):
                    acc[i] += w * s
        return [clamp(a / total) for a in acc]

    return score
