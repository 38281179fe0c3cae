"""Retry budget (Finagle/Envoy style): retries may add at most a fraction of the load. Pure.

Over the last `window_s` seconds, for one service:

    allowed   = min_retries_per_s * window_s + ratio * requests
    available = allowed - spent

`requests` counts calls (first attempts), not attempts, so retries do not earn more retries;
`spent` sums the cost of the retries taken. With ratio 0.2 a provider that fails every call
sees at most 1.2x its normal load from this agent, while the floor (3/s) still lets a quiet
service retry. Envoy bounds concurrent retries instead; a time window is used here because
LLM calls last seconds and concurrency would let one slow burst starve the next.

Cost of a retry (decided in `retry.decide`, documented here because the budget is what it
protects): 1, except a failover to *another* endpoint after a CONNECT error, which costs 0 —
nothing reached the upstream, so there is no load to multiply, and such failovers are bounded
per call by the number of endpoints (and by `max_retries`) and across calls by the breaker,
which opens after a few refused connections.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetSettings:
    ratio: float = 0.2
    min_retries_per_s: float = 3.0
    window_s: float = 10.0
    buckets: int = 10


class RetryBudget:
    """One service's budget. Not thread-safe (event-loop use).

    The window is `buckets` buckets of window_s / buckets seconds; a bucket counts until it
    lies wholly outside the window, so the effective window is up to one bucket longer.
    """

    def __init__(self, settings: BudgetSettings = BudgetSettings()) -> None:
        self.settings = settings
        self._width = settings.window_s / max(1, settings.buckets)
        self._buckets: deque[list[float]] = deque()  # [start, requests, spent]

    def record_request(self, now: float) -> None:
        """Count one call (once per call, before its first attempt)."""
        self._bucket(now)[1] += 1

    def available(self, now: float) -> float:
        """Retries (in cost units) that may still be spent at `now`."""
        self._prune(now)
        requests = sum(b[1] for b in self._buckets)
        spent = sum(b[2] for b in self._buckets)
        s = self.settings
        return s.min_retries_per_s * s.window_s + s.ratio * requests - spent

    def spend(self, now: float, cost: float = 1.0) -> bool:
        """Take `cost` from the budget if it is there; False (and nothing taken) otherwise."""
        if cost <= 0:
            return True
        if self.available(now) < cost:
            return False
        self._bucket(now)[2] += cost
        return True

    def _bucket(self, now: float) -> list[float]:
        start = now - (now % self._width)
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append([start, 0.0, 0.0])
        self._prune(now)
        return self._buckets[-1]

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + self._width <= now - self.settings.window_s:
            self._buckets.popleft()


class RetryBudgets:
    """One budget per service, created on first use."""

    def __init__(self, settings: BudgetSettings = BudgetSettings()) -> None:
        self.settings = settings
        self._budgets: dict[str, RetryBudget] = {}

    def get(self, service: str) -> RetryBudget:
        budget = self._budgets.get(service)
        if budget is None:
            budget = self._budgets[service] = RetryBudget(self.settings)
        return budget
