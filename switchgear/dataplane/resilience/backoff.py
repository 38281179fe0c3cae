"""Retry delays: exponential, linear or fixed, with full or decorrelated jitter. Pure.

For the n-th retry of a call (n >= 1), base b, cap c (seconds):

    exponential  ceiling(n) = min(c, b * 2 ** (n - 1))
    linear       ceiling(n) = min(c, b * n)
    fixed        ceiling(n) = min(c, b)

    jitter "full"          delay = uniform(0, ceiling(n))                  (AWS "full jitter")
    jitter "decorrelated"  delay = min(c, uniform(b, 3 * previous_delay))  previous = b at n = 1
    jitter "none"          delay = ceiling(n)

Full jitter spreads the retries of many clients that failed together; decorrelated jitter
does too while growing from the last delay actually slept, not the attempt count.

Per-category defaults are for interactive calls and apply when the config gives no
retry_policy (see `policy_for`): an LLM call retries after ~0.2 s, never waits more than 2 s.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from switchgear.dataplane.snapshot import RetrySettings

STRATEGIES = frozenset({"exponential", "linear", "fixed"})
JITTERS = frozenset({"full", "decorrelated", "none"})


@dataclass(frozen=True)
class BackoffPolicy:
    strategy: str = "exponential"
    base_delay_s: float = 0.2
    max_delay_s: float = 2.0
    jitter: str = "full"
    max_retries: int = 3

    def ceiling(self, retry: int) -> float:
        """The un-jittered delay (s) before the `retry`-th retry (1-based)."""
        n = max(1, retry)
        b, c = self.base_delay_s, self.max_delay_s
        if self.strategy == "linear":
            return min(c, b * n)
        if self.strategy == "fixed":
            return min(c, b)
        return min(c, b * 2.0 ** min(n - 1, 62))  # exponent capped: no float overflow

    def delay(self, retry: int, rng: random.Random, previous_s: float = 0.0) -> float:
        """Seconds to wait before the `retry`-th retry (see the module docstring)."""
        if self.jitter == "none":
            return self.ceiling(retry)
        if self.jitter == "decorrelated":
            low = self.base_delay_s
            high = max(low, 3.0 * (previous_s or low))
            return min(self.max_delay_s, rng.uniform(low, high))
        return rng.uniform(0.0, self.ceiling(retry))


#: Interactive defaults per category: (base_delay_s, max_delay_s).
CATEGORY_DEFAULTS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "llm": (0.2, 2.0),
    "embedding": (0.1, 1.0),
    "vector_db": (0.05, 0.5),
    "knowledge_graph": (0.5, 5.0),
    "document": (1.0, 10.0),
})
_FALLBACK_DEFAULT = (0.2, 2.0)


@functools.lru_cache(maxsize=256)  # pure, called per call; its arguments are frozen (hashable)
def policy_for(category: str, configured: RetrySettings | None) -> BackoffPolicy:
    """The backoff policy of a call in `category`.

    `configured` is the snapshot's retry_policy, or None when the config gave none. The
    agent's `RetrySettings()` defaults (1 s base, 30 s cap: the seed's batch-friendly values)
    are treated as "not configured" too, because the snapshot converter fills them in when the
    field is absent; an operator who wants exactly those can set them per category later.
    `max_retries` always comes from the config.
    """
    base, cap = CATEGORY_DEFAULTS.get(category, _FALLBACK_DEFAULT)
    if configured is None:
        return BackoffPolicy(base_delay_s=base, max_delay_s=cap)
    if _is_default(configured):
        return BackoffPolicy(base_delay_s=base, max_delay_s=cap, max_retries=configured.max_retries)
    strategy = configured.backoff_strategy if configured.backoff_strategy in STRATEGIES else "exponential"
    return BackoffPolicy(strategy, configured.base_delay_s, max(configured.base_delay_s, configured.max_delay_s),
                         max_retries=configured.max_retries)


def _is_default(configured: RetrySettings) -> bool:
    d = RetrySettings()
    return (configured.backoff_strategy, configured.base_delay_s, configured.max_delay_s) == (
        d.backoff_strategy, d.base_delay_s, d.max_delay_s)
