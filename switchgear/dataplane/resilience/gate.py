"""Breakers and outlier ejection seen as one answer: may this endpoint be called now? Pure.

The scheduler takes `unavailable`, a predicate on candidate keys "service/endpoint" (see
scheduling.model.candidate_key), at construction; `Gate.unavailable` is that predicate, with
the gate's injected clock. An endpoint is unavailable when its breaker refuses (open, or
half-open with every probe out), it is ejected, or a Retry-After still holds it.

Service names and endpoint ids cannot contain "/" (the snapshot converter's name rule), so
the key splits at its first "/".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from switchgear.dataplane.resilience.breaker import BreakerBook
from switchgear.dataplane.resilience.outlier import OutlierDetector


class Gate:
    def __init__(self, breakers: BreakerBook, outliers: OutlierDetector,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.breakers = breakers
        self.outliers = outliers
        self._clock = clock

    def usable(self, service: str, endpoint_ids: Iterable[str], now: float) -> dict[str, float]:
        """{endpoint: hold_s} of the endpoints neither refused by their breaker nor ejected;
        hold_s > 0 while a Retry-After holds it. The input to `retry.RetryState.usable`."""
        ejected = self.outliers.ejected(service, now)
        return {e: h for e, h in self.breakers.usable(service, endpoint_ids, now).items() if e not in ejected}

    def available(self, service: str, endpoint: str, now: float) -> bool:
        """`usable(service, (endpoint,), now)` holds it with hold_s 0, without building the
        dicts: this runs for every candidate of every pick."""
        if self.outliers.is_ejected(service, endpoint, now):
            return False
        hold = self.breakers.get(service, endpoint).hold_s(now)
        return hold is not None and hold <= 0

    def unavailable(self, key: str) -> bool:
        """The scheduler's predicate: True when "service/endpoint" may not be called now."""
        service, _, endpoint = key.partition("/")
        return not self.available(service, endpoint, self._clock())
