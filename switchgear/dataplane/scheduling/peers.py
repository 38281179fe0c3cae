"""Endpoints judged against their peers: slow ones off fast, and no herd onto one. Pure.

Two stages the scheduler runs for every strategy (scheduler.py), each leaving at least one
candidate of a non-empty input:

`off_slow` — before the strategy's own stages. A candidate whose observed latency o_i
(`observed`: its whole-answer peak EWMA, which a timeout raises too, x its stall factor, so a
hung endpoint counts as slow within a second or two) exceeds `slow_ratio` x the median of its
peers' — and that median by at least `slow_margin_s`, so that a 2 ms endpoint caught by a 10 ms
scheduling stall on a busy host is not "slow" (jitter, not a slow peer) — is judged slow
(`EndpointStats.slow`) and dropped from the pick until it has recovered (below). Its own
history is not the yardstick: an endpoint that has been 10x slow for a minute has a "normal"
EWMA of 10x, but its peers still answer in 1x. It is probed with a trickle: once per
`probe_interval_s` at most, and only while none of its attempts is in flight, the pick is
*only* that candidate (one probe at a time: a hung endpoint gets one, not one per request;
at 30 requests/s one a second is 3 % of the traffic, and a quiet service still probes). Once its latest two
answers all came within the bound (stats.EndpointStats.recovered) its peak EWMA restarts from
them — decaying alone it would take ~25 s to forget a 10x spell — and it rejoins with a slow
start (ramped); at 30 requests/s that is about 5 s after it recovers.

`over_cap` — around the strategy's stages. Strategies that pick the best (intelligent's argmax,
the latency pickers on a quiet pool) send nearly everything to the fastest endpoint; and after
a fault one survivor can carry everything while a recovered peer gets nothing back (the seed's
cost_optimized qualification asks for 95 % success over 30 s, so a peer that had a burst of
500s stays disqualified long after it recovered). So each candidate's recent share of picks is
tracked (an EWMA over about 1 / `share_alpha` picks); a candidate above its cap — max(
`share_cap`, its ramped weight's share w_i s_i / sum w s, s = slow start) — is left out of the
pick (the strategy's stages then run without it) while a *peer* remains: a candidate of the
same tier and price whose observed latency is within `peer_ratio` of its own. So no target
carries more than 70 % while its peers are within 2x of its latency, tiers and prices the
operator set still decide, weights still hold, and a target coming back from a fault gets its
ramped share (slow start, stats.LiveStats.unblocked), not all or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from switchgear.dataplane.scheduling.filters import Filter
from switchgear.dataplane.scheduling.model import Candidate, Context
from switchgear.dataplane.scheduling.stats import EndpointStats


@dataclass(frozen=True)
class PeerSettings:
    """Ratios are dimensionless; `share_cap` and `share_alpha` fractions in [0, 1]; seconds."""

    slow_ratio: float = 4.0
    slow_margin_s: float = 0.05
    probe_interval_s: float = 1.0
    share_cap: float = 0.65  # so that the share over any second stays under 70 % (the EWMA lags)
    peer_ratio: float = 2.0
    share_alpha: float = 0.05


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def observed(cands: Sequence[Candidate], ctx: Context,
             stats: Sequence[EndpointStats] | None = None) -> list[float]:
    """o_i = (peak-EWMA latency of whole answers, or the median of the known ones) x stall factor.
    Not the per-request estimate the latency scorers use: that one is per output token, learnt
    from successes only, so an endpoint whose attempts time out would keep looking fast."""
    stats = stats or [ctx.stats.get(c.key) for c in cands]
    known = sorted(v for s in stats if (v := s.latency.value) is not None)
    prior = known[len(known) // 2] if known else 1.0
    return [max(s.latency.value or prior, 1e-6) * s.stall_factor(ctx.now, prior) for s in stats]


def off_slow(settings: PeerSettings = PeerSettings()) -> Filter:
    """Drops candidates slower than slow_ratio x the median of their peers (module docstring),
    except for a trickle of probes."""

    def apply(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
        if len(cands) < 2:
            return list(cands)
        stats = [ctx.stats.get(c.key) for c in cands]
        e = observed(cands, ctx, stats)
        low = min(e)
        if (max(e) <= max(settings.slow_ratio * low, low + settings.slow_margin_s)
                and not any(s.slow for s in stats)):
            return list(cands)  # the usual case: nobody is far off (a peer median is >= the minimum)
        kept: list[Candidate] = []
        for i, c in enumerate(cands):
            median = _median(e[:i] + e[i + 1:])
            bound = max(settings.slow_ratio * median, median + settings.slow_margin_s)
            s = stats[i]
            if not s.slow:
                if e[i] <= bound:
                    kept.append(c)
                    continue
                s.judge_slow()
            # Judged slow: out until its latest answers are within the bound again. (Not until
            # its estimate is: a stale estimate regresses toward the median and would let it
            # back unprobed, where a latency strategy would still never pick it.)
            if not s.in_flight and s.recovered(bound, ctx.now):
                s.slow = False
                ctx.stats.unblocked(c.key, ctx.now)  # back, ramped
                kept.append(c)
            elif not s.in_flight and ctx.now - s.probed_at >= settings.probe_interval_s:
                s.probed_at = ctx.now
                return [c]  # the probe
        return kept or list(cands)

    return apply


def over_cap(settings: PeerSettings = PeerSettings()) -> Callable[[Sequence[Candidate], Context], set[str]]:
    """The keys to leave out of this pick: candidates above their share cap that have a peer
    (module docstring). Shares are `record_pick`'s, in ctx.memory."""

    def apply(cands: Sequence[Candidate], ctx: Context) -> set[str]:
        shares: dict[str, float] = ctx.memory.get("shares") or {}
        if len(cands) < 2 or not shares or max(shares.values()) <= settings.share_cap:
            return set()  # the usual case: no share above the cap (every cap is at least share_cap)
        ramp = ctx.stats.slow_start
        w = [c.weight * ramp(c.key, ctx.now) for c in cands]
        total = sum(w)
        over = [shares.get(c.key, 0.0) > max(settings.share_cap, wi / total) for c, wi in zip(cands, w, strict=True)]
        if not any(over):
            return set()
        e = observed(cands, ctx)
        out = set()
        for i, c in enumerate(cands):
            if over[i] and any(j != i and _peers(c, d) and e[j] <= settings.peer_ratio * e[i]
                               for j, d in enumerate(cands)):
                out.add(c.key)
        return out if len(out) < len(cands) else set()

    return apply


def _peers(a: Candidate, b: Candidate) -> bool:
    """Same tier and the same price (within 1 %) for a typical request: the cap never moves
    traffic across the operator's priorities or prices."""
    if a.tier != b.tier:
        return False
    pa, pb = a.pricing.cost(1000, 1000), b.pricing.cost(1000, 1000)
    return abs(pa - pb) <= 0.01 * max(pa, pb) + 1e-12


def record_pick(ctx: Context, chosen: Candidate, candidates: Sequence[Candidate], alpha: float) -> None:
    """share_i <- share_i x (1 - alpha) + alpha x [i chosen], over the group's candidates."""
    shares: dict[str, float] = ctx.memory.setdefault("shares", {})
    keep = 1.0 - alpha
    for c in candidates:
        shares[c.key] = shares.get(c.key, 0.0) * keep
    shares[chosen.key] = shares.get(chosen.key, 0.0) + alpha
