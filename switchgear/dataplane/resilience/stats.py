"""Counters for every resilience decision, per endpoint, for the agent to expose. Pure.

Keys are `(service, endpoint)`; decisions that concern a whole service (a fallback, a shed
from the service queue) use `endpoint=""`. Counters only grow; exporters (Prometheus, load
reports) take deltas. Not thread-safe: use it from the event loop, like the rest of the path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(slots=True)
class Counters:
    """Monotonic counts of decisions taken about one endpoint (or one service when endpoint="")."""

    trips: int = 0  # breaker closed/half-open -> open
    probes: int = 0  # half-open probe attempts admitted
    throttled: int = 0  # 429s that held the endpoint out of selection
    ejections: int = 0  # outlier ejections
    retries: int = 0  # retries on the same endpoint after a delay
    failovers: int = 0  # retries moved to another endpoint of the same service
    budget_denied: int = 0  # retries refused by the retry budget
    fallbacks: int = 0  # calls that moved to another service, a preset or the task queue
    sheds: int = 0  # admissions refused: queue full, deadline or queue timeout
    queued: int = 0  # admissions that had to wait
    attempt_timeouts: int = 0  # attempts abandoned at their adaptive timeout (before the deadline)
    hedges: int = 0  # hedged attempts sent (counted on the endpoint hedged away from)
    hedge_wins: int = 0  # hedged attempts that answered first (counted on the hedge's endpoint)
    silences: int = 0  # times the endpoint was judged silent: new calls held back (filters.not_silent)


COUNTER_NAMES = tuple(f.name for f in fields(Counters))


class ResilienceStats:
    """A small registry of `Counters`; `bump(service, endpoint, "trips")` adds one."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Counters] = {}

    def counters(self, service: str, endpoint: str = "") -> Counters:
        key = (service, endpoint)
        found = self._by_key.get(key)
        if found is None:
            found = self._by_key[key] = Counters()
        return found

    def bump(self, service: str, endpoint: str, name: str, by: int = 1) -> None:
        """Add `by` to counter `name` (one of COUNTER_NAMES) of (service, endpoint)."""
        if name not in COUNTER_NAMES:
            raise KeyError(f"unknown resilience counter {name!r}")
        counters = self.counters(service, endpoint)
        setattr(counters, name, getattr(counters, name) + by)

    def as_dict(self) -> dict[tuple[str, str], dict[str, int]]:
        """A copy of every counter, for an exporter."""
        return {key: asdict(c) for key, c in self._by_key.items()}

    def total(self, name: str) -> int:
        return sum(getattr(c, name) for c in self._by_key.values())
