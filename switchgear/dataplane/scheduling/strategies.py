"""The seven strategies of the seed, each a named composition of filters, a scorer and a picker.

A strategy only narrows, scores and picks among candidates that already passed the
scheduler's hard filters and the policy's bounds (see scheduler.py). No class hierarchy: a
`Strategy` is data, and new ones are new combinations of the same parts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from switchgear.dataplane.scheduling import filters, pickers, scorers
from switchgear.dataplane.scheduling.filters import Filter
from switchgear.dataplane.scheduling.model import Bounds, Candidate, Context
from switchgear.dataplane.scheduling.pickers import Picker
from switchgear.dataplane.scheduling.scorers import Scorer


@dataclass(frozen=True)
class Strategy:
    """`stages` narrow the candidates in order (each leaves at least one of a non-empty input);
    `scorer` (optional) rates the rest in [0, 1]; `picker` chooses using the scores."""

    name: str
    picker: Picker
    stages: tuple[Filter, ...] = ()
    scorer: Scorer | None = None


#: The seed's cost_optimized qualification: under 5000 ms on average and over 95% success.
#: A category policy's min_success_rate / max_cost_per_request, when set, replace these.
SEED_COST_BOUNDS = Bounds(min_success_rate=0.95, max_latency_s=5.0)


def qualified(defaults: Bounds) -> Filter:
    """Soft stage: candidates meeting the policy's bounds (each unset bound taken from
    `defaults`; latency counts the queue a request sent now joins); all candidates when none
    qualifies (the seed's rule)."""
    check = filters.prefer(filters.min_success, filters.within_latency, filters.within_cost)
    merged: dict[Bounds, Bounds] = {}  # policy bounds -> with defaults; few distinct policies

    def apply(cands: Sequence[Candidate], ctx: Context) -> list[Candidate]:
        b = ctx.bounds
        bounds = merged.get(b)
        if bounds is None:
            if len(merged) >= 64:
                merged.clear()
            bounds = merged[b] = Bounds(
                max_cost_usd=b.max_cost_usd or defaults.max_cost_usd,
                min_success_rate=b.min_success_rate or defaults.min_success_rate,
                max_latency_s=b.max_latency_s or defaults.max_latency_s,
            )
        # The same context with these bounds (dataclasses.replace is several times slower).
        return check(cands, Context(ctx.request, ctx.stats, ctx.now, ctx.rng, bounds, ctx.memory))

    return apply


ROUND_ROBIN = Strategy("round_robin", pickers.round_robin)
WEIGHTED = Strategy("weighted", pickers.smooth_weighted)
LEAST_LOADED = Strategy("least_loaded", pickers.power_of_two(pickers.load_then_latency))
PRIORITY = Strategy("priority", pickers.smooth_weighted, stages=(filters.top_tier,))
COST_OPTIMIZED = Strategy(
    "cost_optimized",
    pickers.least(pickers.load_only),
    stages=(qualified(SEED_COST_BOUNDS), filters.cheapest(0.01)),
)
LATENCY = Strategy("latency", pickers.power_of_two(pickers.latency_cost))
INTELLIGENT = Strategy(
    "intelligent",
    pickers.argmax,
    scorer=scorers.weighted(scorers.seed_weights, scorers.SEED_FACTORS),
)

STRATEGIES: Mapping[str, Strategy] = MappingProxyType(
    {s.name: s for s in (ROUND_ROBIN, WEIGHTED, LEAST_LOADED, PRIORITY, COST_OPTIMIZED, LATENCY, INTELLIGENT)}
)
