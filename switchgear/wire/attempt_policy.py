"""What a category policy's attempt-timeout and hedging settings mean, zeros included.

Shared by both planes: the control plane prints the settings in effect (`config validate`),
the agent applies them (dataplane/resilience/timeouts.py and hedging.py, where the formulas
and the reasons for these defaults are). Pure data, the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType


@dataclass(frozen=True)
class AttemptTimeouts:
    """One category's attempt-timeout policy. Seconds; `factor` is dimensionless (>= 1)."""

    floor_s: float = 5.0
    ceiling_s: float = 120.0
    factor: float = 4.0
    min_samples: int = 20
    gap_s: float = 30.0  # streams: the longest silence between two chunks (before the factor rule)


#: Built-in per-category policies (module docstring says how they are chosen).
DEFAULT_TIMEOUTS: Mapping[str, AttemptTimeouts] = MappingProxyType({
    "llm": AttemptTimeouts(floor_s=5.0, ceiling_s=120.0, gap_s=30.0),
    "embedding": AttemptTimeouts(floor_s=2.0, ceiling_s=30.0, gap_s=10.0),
    "vector_db": AttemptTimeouts(floor_s=2.0, ceiling_s=30.0, gap_s=10.0),
    "knowledge_graph": AttemptTimeouts(floor_s=10.0, ceiling_s=120.0, gap_s=30.0),
    "document": AttemptTimeouts(floor_s=60.0, ceiling_s=600.0, gap_s=120.0),
})
FALLBACK_TIMEOUTS = AttemptTimeouts()


def timeouts_for(category: str, floor_s: float = 0.0, ceiling_s: float = 0.0, factor: float = 0.0) -> AttemptTimeouts:
    """The category's defaults with a policy's overrides (0 = keep the default). A floor above
    the default ceiling raises the ceiling with it (config validation refuses floor > ceiling
    when both are given)."""
    base = DEFAULT_TIMEOUTS.get(category, FALLBACK_TIMEOUTS)
    if not (floor_s or ceiling_s or factor):
        return base
    floor = floor_s or base.floor_s
    ceiling = ceiling_s or max(base.ceiling_s, floor)
    return replace(base, floor_s=min(floor, ceiling), ceiling_s=ceiling, factor=factor or base.factor)


#: hedge_min_priority value that turns hedging off.
NEVER = 11


@dataclass(frozen=True)
class HedgeSettings:
    min_priority: int = 8  # 1..10: calls at or above are hedged; NEVER (11): no hedging
    min_samples: int = 20
    min_delay_s: float = 0.005
    min_left_s: float = 0.05
    max_hedges: int = 1


DEFAULT_HEDGING: Mapping[str, HedgeSettings] = MappingProxyType({
    "llm": HedgeSettings(),
    "embedding": HedgeSettings(),
    "vector_db": HedgeSettings(),
    "knowledge_graph": HedgeSettings(min_priority=NEVER),
    "document": HedgeSettings(min_priority=NEVER),
})


def hedging_for(category: str, min_priority: int = 0) -> HedgeSettings:
    """The category's default, with a policy's `hedge_min_priority` (0 = keep the default)."""
    base = DEFAULT_HEDGING.get(category, HedgeSettings(min_priority=NEVER))
    if not min_priority or min_priority == base.min_priority:
        return base
    return HedgeSettings(min_priority, base.min_samples, base.min_delay_s, base.min_left_s, base.max_hedges)


#: Interactive retry delays per category, (base_delay_s, max_delay_s): what a call retries with
#: when the config's retry_policy leaves base_delay / max_delay out (an LLM call retries after
#: ~0.2 s and never waits more than 2 s; a document parse can afford 1..10 s).
BACKOFF_DEFAULTS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "llm": (0.2, 2.0),
    "embedding": (0.1, 1.0),
    "vector_db": (0.05, 0.5),
    "knowledge_graph": (0.5, 5.0),
    "document": (1.0, 10.0),
})
FALLBACK_BACKOFF = (0.2, 2.0)


def backoff_delays(category: str, base_delay_s: float = 0.0, max_delay_s: float = 0.0) -> tuple[float, float]:
    """(base, cap) in seconds for a call in `category`: each configured value as written, each
    0 ("not set") from BACKOFF_DEFAULTS. The cap is never below the base (a base set above the
    category's default cap raises the cap with it)."""
    default_base, default_cap = BACKOFF_DEFAULTS.get(category, FALLBACK_BACKOFF)
    base = base_delay_s or default_base
    return base, max(base, max_delay_s or default_cap)


def call_timeout(requested_s: float, service_s: float, policy_s: float, default_s: float) -> float:
    """A call's whole deadline (s), synchronous calls, streams and tasks alike: the caller's
    own, else the service's `timeout`, else its category policy's `timeout`
    (scheduling_policies.<category>.timeout, e.g. the seed's document_processing 300 s), else
    communication.default_timeout. 0 = not set, at every level."""
    return requested_s or service_s or policy_s or default_s
