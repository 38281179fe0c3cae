"""Outlier ejection fed from the request path's attempt events. Pure (no I/O).

`AttemptEnd` carries service, endpoint and error kind, which is all outlier ejection needs,
so it subscribes like any other observer. The breaker is *not* an observer: it must see the
`Ticket` its `allow` handed out (probe accounting) and the Retry-After, which the events do
not carry, so the invoker calls it inline (see the package docstring).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.resilience.outlier import OutlierDetector


class OutlierObserver:
    """An `AttemptObserver` that records every attempt's outcome in an `OutlierDetector`."""

    def __init__(self, detector: OutlierDetector, clock: Callable[[], float] = time.monotonic) -> None:
        self.detector = detector
        self._clock = clock

    def attempt_started(self, event: AttemptStart) -> None:
        pass

    def attempt_ended(self, event: AttemptEnd) -> None:
        self.detector.record(self._clock(), event.service, event.endpoint, event.error)
