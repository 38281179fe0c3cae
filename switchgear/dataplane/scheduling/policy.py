"""Which strategy and bounds apply to a request. Pure.

Precedence (first that applies wins):
1. the service's own `strategy`;
2. the category's policy from the config's scheduling_policies (its `strategy`, when set);
3. the seed router's rule: llm -> `latency` when priority > 7, else `cost_optimized`;
   document -> `least_loaded`; knowledge_graph -> `weighted`;
4. settings.default_strategy (the seed's "otherwise intelligent": its default is
   "intelligent"), for vector_db, embedding and requests without a category.

A name this agent does not know falls through to the next rule, and finally to
round_robin, so a newer control plane cannot break an older agent's routing.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from switchgear.dataplane.scheduling.model import Bounds
from switchgear.dataplane.snapshot import SchedulingPolicy


def seed_rule(category: str, priority: int) -> str:
    """The seed's EnhancedBIRRouter._get_scheduling_strategy, minus its "otherwise" branch."""
    if category == "llm":
        return "latency" if priority > 7 else "cost_optimized"
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
