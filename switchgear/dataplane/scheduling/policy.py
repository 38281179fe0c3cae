"""Which strategy and bounds apply to a request. Pure.

Precedence — the one place it is written down (docs/concepts/strategies.md points here).
The first rule that names a strategy this agent knows wins:

1. the service's own `strategy` (an operator's choice for that one service);
2. the seed's per-request rule: an llm call with priority > 7 runs `latency`
   (EnhancedBIRRouter._get_scheduling_strategy) — on top of the category policy, so a
   priority-9 call under the seed's `llm_services: {strategy: cost_optimized}` runs `latency`,
   and a priority-5 call runs `cost_optimized`;
3. the category's policy from the config's scheduling_policies (its `strategy`, when set);
4. the seed router's category rule: llm -> `cost_optimized`; document -> `least_loaded`;
   knowledge_graph -> `weighted`;
5. settings.default_strategy (the seed's "otherwise intelligent": its default is
   "intelligent"), for vector_db, embedding and requests without a category.

A name this agent does not know falls through to the next rule, and finally to
round_robin, so a newer control plane cannot break an older agent's routing. The category
policy's bounds (max_cost_per_request, min_success_rate) apply whichever strategy wins.
`switchgear config validate` prints, per service, what a priority-5 and a priority-9 call
get, by calling `choose_strategy` itself.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from switchgear.dataplane.scheduling.model import Bounds
from switchgear.dataplane.snapshot import SchedulingPolicy

#: Above this priority an llm call runs `latency` whatever its category policy says (rule 2).
HIGH_PRIORITY = 7


def priority_rule(category: str, priority: int) -> str:
    """Rule 2: the seed's per-request rule, "" when it does not apply."""
    return "latency" if category == "llm" and priority > HIGH_PRIORITY else ""


def seed_rule(category: str, priority: int) -> str:
    """The seed's EnhancedBIRRouter._get_scheduling_strategy, minus its "otherwise" branch
    (rules 2 and 4 together)."""
    if category == "llm":
        return priority_rule(category, priority) or "cost_optimized"
    return {"document": "least_loaded", "knowledge_graph": "weighted"}.get(category, "")


def choose_strategy(
    *,
    service_strategy: str,
    category: str,
    priority: int,
    policies: Mapping[str, SchedulingPolicy],
    default_strategy: str,
    known: Container[str],
) -> str:
    policy = policies.get(category)
    for name in (
        service_strategy,
        priority_rule(category, priority),
        policy.strategy if policy else "",
        seed_rule(category, priority),
        default_strategy,
    ):
        if name and name in known:
            return name
    return "round_robin"


_UNBOUNDED = Bounds()  # frozen: one shared value for the common no-policy case


def bounds_for(category: str, policies: Mapping[str, SchedulingPolicy]) -> Bounds:
    policy = policies.get(category)
    if policy is None:
        return _UNBOUNDED
    return Bounds(max_cost_usd=policy.max_cost_per_request, min_success_rate=policy.min_success_rate,
                  overload=policy.overload_threshold, underload=policy.underload_threshold)
