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

Per-category defaults are for interactive calls and apply to each delay the config's
retry_policy leaves out (see `policy_for`): an LLM call retries after ~0.2 s, never waits
more than 2 s. A delay the config writes applies as written, even when it equals a default.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from switchgear.dataplane.snapshot import RetrySettings
from switchgear.wire.attempt_policy import backoff_delays

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


@functools.lru_cache(maxsize=256)  # pure, called per call; its arguments are frozen (hashable)
def policy_for(category: str, configured: RetrySettings | None) -> BackoffPolicy:
    """The backoff policy of a call in `category`.

    `configured` is the snapshot's retry_policy, or None when the config gave none. Each of its
    delays is used as written; a delay of 0 means the config left it out, and the category's
    interactive default applies (wire/attempt_policy.py::backoff_delays, the same function
    `config validate` prints with). `max_retries` always comes from the config.
    """
    if configured is None:
        base, cap = backoff_delays(category)
        return BackoffPolicy(base_delay_s=base, max_delay_s=cap)
    base, cap = backoff_delays(category, configured.base_delay_s, configured.max_delay_s)
    strategy = configured.backoff_strategy if configured.backoff_strategy in STRATEGIES else "exponential"
    return BackoffPolicy(strategy, base, cap, max_retries=configured.max_retries)
