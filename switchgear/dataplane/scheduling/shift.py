"""Load shifting: the seed's `_optimize_service_allocation`, per pick. Pure.

The seed, every 30 s, finds services above 0.8 load and moves routing weight from each to the
services of its kind below 0.6. Here the same rule runs on every pick, over the candidates of
one route (its targets): a candidate whose utilisation is above `overload` (0.8) is left out
of the pick while at least one candidate is below `underload` (0.6); the strategy then
chooses among the rest. So the overloaded target's share goes to the idle ones at once, comes
back as soon as its in-flight falls (no 30 s period, no weights to restore), and nothing
moves when every target is busy (shedding would only move the queue).

utilisation = in-flight / capacity, where capacity = the target's `max_concurrency` when
configured, else the capacity `stats.Capacity` learned (the in-flight level at which its
latency rises past 2x its unloaded value). A target of unknown capacity (nothing configured,
no bend seen yet: an elastic provider API) is never overloaded, and takes shed load like an
idle one. In-flight is this agent's
own count, so with several agents the configured max_concurrency reads as a per-agent
capacity, while a learned one is learned from this agent's share of the load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from switchgear.dataplane.scheduling.filters import Filter
from switchgear.dataplane.scheduling.model import Candidate, Context
from switchgear.dataplane.scheduling.stats import LiveStats


@dataclass(frozen=True)
class ShiftSettings:
    """Defaults for the thresholds (fractions of capacity); a policy's Bounds override them."""

    overload: float = 0.8
    underload: float = 0.6


def capacity(c: Candidate, ctx: Context) -> int:
    """max_concurrency when configured, else the learned capacity (0: unknown)."""
    return c.max_concurrency or ctx.stats.get(c.key).capacity.learned()


def reported_capacity(max_concurrency: int, stats: LiveStats, key: str) -> int:
    """`capacity`'s figure for the load report, without creating stats for an unseen key."""
    if max_concurrency:
        return max_concurrency
    seen = stats.peek(key)
    return seen.capacity.learned() if seen is not None else 0


def utilisation(c: Candidate, ctx: Context) -> float | None:
    """In-flight / capacity; None when the capacity is unknown."""
    cap = capacity(c, ctx)
    return ctx.stats.get(c.key).in_flight / cap if cap else None


def shed(settings: ShiftSettings = ShiftSettings()) -> Filter:
    """The stage: candidates above the overload threshold leave the pick while some candidate
    of its tier is below the underload threshold or of unknown capacity (module docstring).
    Keeps at least one candidate."""

    def apply(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
        high = ctx.bounds.overload or settings.overload
        stats = ctx.stats
        for c in cands:  # the usual case first: nobody above the threshold, at a dict look-up each
            s = stats.get(c.key)
            n = s.in_flight
            if n and n > high * (c.max_concurrency or s.capacity.learned() or n / high):
                break
        else:
            return list(cands)
        low = ctx.bounds.underload or settings.underload
        loads = [utilisation(c, ctx) for c in cands]
        idle = {c.tier for c, u in zip(cands, loads, strict=True) if u is None or u < low}
        return [c for c, u in zip(cands, loads, strict=True) if u is None or u <= high or c.tier not in idle]

    return apply
