"""Filters: which candidates may serve a request. Each is `(candidates, ctx) -> candidates`.

Hard filters (`usable`, `not_blocked`, `has_capabilities`, `fits_context`, `tenant_allowed`)
remove candidates that cannot or must not serve. Bound filters (`within_cost`,
`min_success`, `within_latency`, `has_capacity`) express preferences; wrap them in `prefer`
so that when nothing meets them the request is still served by all (the seed's fallback).
Narrowing stages (`top_tier`, `cheapest`) are filters too. `not_silent` holds new calls back
from an endpoint whose attempts are silent past their first-token time (the scheduler runs it
for every strategy). Order is preserved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

from switchgear.dataplane.scheduling.model import Candidate, Context
from switchgear.dataplane.scheduling.scorers import queue_factor

Filter = Callable[[Sequence[Candidate], Context], list[Candidate]]

UNUSABLE_HEALTH = frozenset({"ejected", "draining"})


def usable(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """Drops endpoints the control plane marked ejected or draining."""
    return [c for c in cands if c.health not in UNUSABLE_HEALTH]


def not_blocked(unavailable: Collection[str] | Callable[[str], bool]) -> Filter:
    """Drops candidates whose key is unavailable: a collection of keys ("service/endpoint"), or
    a predicate on the key. This is the resilience engine's input (open breakers, ejections);
    the predicate is read on every pick, so it always reflects the current state. Which keys
    were refused is noted in `stats.blocked`; one seen usable again gets `stats.unblocked`
    (its slow start restarts: it comes back ramped, not all at once)."""
    blocked = unavailable if callable(unavailable) else unavailable.__contains__

    def apply(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
        was = ctx.stats.blocked
        kept = []
        for c in cands:
            if blocked(c.key):
                was.add(c.key)
            else:
                if c.key in was:
                    ctx.stats.unblocked(c.key, ctx.now)
                kept.append(c)
        return kept

    return apply


def has_capabilities(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """Keeps candidates offering every capability the request requires."""
    need = ctx.request.capabilities
    return [c for c in cands if need <= c.capabilities] if need else list(cands)


def fits_context(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """Keeps candidates whose context window (tokens; 0 = unknown) holds the request
    (`Candidate.context_need`: estimated input + the answer bound it asked, as this target caps it)."""
    r = ctx.request
    return [c for c in cands if not c.context_window or c.context_need(r) <= c.context_window]


def tenant_allowed(allowed: Callable[[str, Candidate], bool]) -> Filter:
    """Keeps candidates `allowed(tenant, candidate)` accepts: the governance hook (allow-lists
    per tenant). Requests without a tenant are not filtered."""

    def apply(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
        tenant = ctx.request.tenant
        return [c for c in cands if allowed(tenant, c)] if tenant else list(cands)

    return apply


def within_cost(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """Keeps candidates whose expected cost (USD: price x estimated tokens) <= bounds.max_cost_usd."""
    limit = ctx.bounds.max_cost_usd
    return [c for c in cands if c.cost(ctx.request) <= limit] if limit > 0 else list(cands)


#: How often a candidate kept out by `min_success` in a failure streak is sent one probe.
PROBE_INTERVAL_S = 1.0


def min_success(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """Keeps candidates whose windowed success rate is not shown to be below
    bounds.min_success_rate (stats.EndpointStats.below: below it on the point estimate, and
    either in a failure streak or with failures improbable at that rate — one or two random
    failures among few samples, as in a window started afresh, do not disqualify).

    One below it in a failure streak (stats.EndpointStats.failing_now: the successes that
    would lift its rate are held until a newer attempt succeeds) is sent a probe — the pick is
    only that candidate — PROBE_INTERVAL_S after its latest failed attempt was sent, then at
    most once per PROBE_INTERVAL_S, and only with none of its newer attempts in flight:
    without one, a streak that was noise would keep it out for the whole window."""
    floor = ctx.bounds.min_success_rate
    if floor <= 0:
        return list(cands)
    kept = []
    for c in cands:
        s = ctx.stats.get(c.key)
        if not s.below(floor, ctx.now):
            kept.append(c)
        elif s.failing_now() and ctx.now - max(s.probed_at, s.failure_sent_at) >= PROBE_INTERVAL_S:
            s.probed_at = ctx.now
            return [c]
    return kept


def not_silent(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """Holds new calls back from silent candidates (stats.EndpointStats.silent: attempts sent
    since the newest one that sent a first token all still silent, jointly improbable under
    its own time to first token) while another candidate can serve. Not sticky: judged on
    every pick, so a candidate is back as soon as one of those attempts sends a first token,
    or they end. The attempts already waiting on its first token fail over at such a pick once
    it has also answered nothing for 0.5 s (stats.LiveStats.while_silent: dataplane/abandon.py).

    A silent candidate is let through — left to the strategy, which may send it a probe —
    when its newest attempt was sent PROBE_INTERVAL_S ago or more and it was not let through
    for as long: one call a second at most goes to it, enough to see it answer again (the
    probe's first token clears it). Only let through, never forced: a strategy whose own
    bounds keep it out (too slow, too dear) sends it nothing. Keeps at least one candidate:
    with all silent, all are kept."""
    now = ctx.now
    kept: list[Candidate] = []
    for c in cands:
        s = ctx.stats.get(c.key)
        if not s.awaiting_first or not s.silent(now):
            if ctx.stats.silenced:
                ctx.stats.judged_silent(c.key, False)
            kept.append(c)
            continue
        ctx.stats.judged_silent(c.key, True)
        newest = next(reversed(s.awaiting_first.values()))
        if now - max(newest, s.silence_probed_at) >= PROBE_INTERVAL_S:
            s.silence_probed_at = now
            kept.append(c)
    return kept or list(cands)


def within_latency(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """Keeps candidates where a request sent now should meet bounds.max_latency_s:
    a x exp(-idle / forget_s) x queue_factor <= bound, where a is the average latency (plain
    EWMA, s; the seed's avg_response_time) and idle the seconds since the endpoint's last
    sample — so an endpoint excluded for being slow is probed again after a while instead of
    being excluded forever on a stale number. With no average yet a candidate passes while it
    is below its max_concurrency (a cold start must not flood the cheapest endpoint)."""
    limit = ctx.bounds.max_latency_s
    if limit <= 0:
        return list(cands)
    forget = ctx.stats.config.forget_s
    kept = []
    for c in cands:
        s = ctx.stats.get(c.key)
        average = s.mean_latency.value
        if average is None or s.last_sample_at is None:
            if not c.max_concurrency or s.in_flight < c.max_concurrency:
                kept.append(c)
            continue
        if forget > 0:
            average *= math.exp(-max(0.0, ctx.now - s.last_sample_at) / forget)
        if average * queue_factor(c, s.in_flight) <= limit:
            kept.append(c)
    return kept


def has_capacity(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """Keeps candidates with in-flight < max_concurrency (0 = unlimited)."""
    return [c for c in cands if not c.max_concurrency or ctx.stats.get(c.key).in_flight < c.max_concurrency]


def prefer(*filters: Filter) -> Filter:
    """All `filters` in turn, as one soft stage: if they leave nothing, the input is kept."""

    def apply(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
        kept = list(cands)
        for f in filters:
            kept = f(kept, ctx)
            if not kept:
                return list(cands)
        return kept

    return apply


def top_tier(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
    """The highest `tier` (service priority, endpoint priority) that has healthy capacity:
    some member not degraded and below its max_concurrency. Spills to the next tier when a tier
    has none; when no tier has any, the highest tier is kept (it queues rather than fail)."""
    tiers = sorted({c.tier for c in cands}, reverse=True)
    for tier in tiers:
        members = [c for c in cands if c.tier == tier]
        if any(c.health != "degraded" for c in has_capacity(members, ctx)):
            return members
    return [c for c in cands if c.tier == tiers[0]] if tiers else []


def cheapest(tolerance: float = 0.01) -> Filter:
    """Candidates whose expected cost <= min cost x (1 + tolerance) + 1e-12 USD: equal prices tie,
    so a picker can spread load among them instead of pinning one endpoint."""

    def apply(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
        if not cands:
            return []
        costs = [c.cost(ctx.request) for c in cands]
        limit = min(costs) * (1.0 + tolerance) + 1e-12
        return [c for c, cost in zip(cands, costs, strict=True) if cost <= limit]

    return apply
