"""Outlier ejection across a service's endpoints (Envoy's outlier detection, for small pools). Pure.

Where a breaker judges one endpoint alone, ejection judges it against its pool and keeps the
pool serving: it never ejects more than a share of a service, and never its last endpoint.

Detectors (outcomes are classified by `signals`):

- consecutive failures: `consecutive_5xx` FAILUREs in a row (5xx, connect, timeout), or
  `consecutive_gateway_failure` CONNECT/TIMEOUT in a row, eject at once;
- failure percentage, every `interval_s`: an endpoint with at least
  `failure_percentage_request_volume` outcomes in the interval and

      100 * failures / (successes + failures) >= failure_percentage_threshold

  is ejected (worst first), when the service has at least `failure_percentage_minimum_hosts`
  endpoints. Envoy's success-rate (standard deviation) detector is left out on purpose: it
  needs five or more busy hosts, and AI-provider pools are usually two or three endpoints.

Ejection time, for the endpoint's k-th ejection (k counts down by one for every interval the
endpoint spends un-ejected, so a recovered endpoint earns its short ejections back):

    eject_s(k) = min(max(base_ejection_s, max_ejection_s), base_ejection_s * k)

Cap on ejected endpoints of a service with n endpoints (ejected ones included):

    allowed(n) = min(n - 1, max(1, floor(n * max_ejection_percent / 100)))

so a pool of 2 at 50 % may lose one, a pool of 3 at 10 % still one (ejection must be
possible), and a pool of 1 never loses its only endpoint.

Against the breaker: both react to a run of failures, on purpose. A breaker may open on every
endpoint of a service (then the call goes to its fallbacks fast, which is what a dead provider
deserves); ejection never takes the last one, and adds the relative failure-percentage test a
per-endpoint breaker cannot make. An endpoint blocked by either is filtered out before picking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.resilience.signals import GATEWAY_FAILURES, Signal, signal_of


@dataclass(frozen=True)
class OutlierSettings:
    """Seconds for times, percentages in 0..100."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    interval_s: float = 10.0
    base_ejection_s: float = 5.0  # short at first: slow start brings it back ramped; repeats grow
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 50.0
    failure_percentage_threshold: float = 85.0
    failure_percentage_request_volume: int = 10
    failure_percentage_minimum_hosts: int = 2

    def eject_s(self, times: int) -> float:
        """min(max(base, max_ejection_s), base * times) for the `times`-th ejection."""
        return min(max(self.base_ejection_s, self.max_ejection_s), self.base_ejection_s * times)

    def allowed(self, endpoints: int) -> int:
        """How many of `endpoints` may be ejected at once (see the module docstring)."""
        share = math.floor(endpoints * self.max_ejection_percent / 100.0)
        return max(0, min(endpoints - 1, max(1, share)))


@dataclass(slots=True)
class _Host:
    consecutive: int = 0
    consecutive_gateway: int = 0
    successes: int = 0  # in the current interval
    failures: int = 0
    ejected_until: float = float("-inf")
    times: int = 0  # the ejection multiplier

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


Ejected = Callable[[str, str, float], None]


class OutlierDetector:
    """Tracks every service's endpoints. Call `sync` when a snapshot arrives, `record` after
    each attempt, and read `ejected(service, now)` into the scheduler's `blocked` set.
    Evaluation runs inside those calls once `interval_s` has passed (no timer task needed)."""

    def __init__(self, settings: OutlierSettings = OutlierSettings(), on_eject: Ejected | None = None,
                 now: float = 0.0) -> None:
        self.settings = settings
        self._on_eject = on_eject
        self._services: dict[str, dict[str, _Host]] = {}
        self._next_eval = now + settings.interval_s

    def sync(self, service: str, endpoint_ids: Iterable[str]) -> None:
        """Make `service`'s endpoints exactly `endpoint_ids`, keeping the state of those kept."""
        old = self._services.get(service, {})
        self._services[service] = {e: old.get(e) or _Host() for e in endpoint_ids}

    def forget(self, keep: Iterable[str]) -> None:
        """Drop services not in `keep`."""
        wanted = set(keep)
        for name in [s for s in self._services if s not in wanted]:
            del self._services[name]

    def ejected(self, service: str, now: float) -> frozenset[str]:
        """Endpoint ids of `service` ejected at `now`."""
        self.maybe_evaluate(now)
        hosts = self._services.get(service, {})
        return frozenset(e for e, h in hosts.items() if h.ejected(now))

    def is_ejected(self, service: str, endpoint: str, now: float) -> bool:
        """Whether one endpoint is ejected at `now` (`endpoint in ejected(service, now)`)."""
        self.maybe_evaluate(now)
        host = self._services.get(service, {}).get(endpoint)
        return host is not None and host.ejected(now)

    def record(self, now: float, service: str, endpoint: str, error: ErrorKind | None) -> bool:
        """Count one attempt's outcome; True when it ejected the endpoint."""
        self.maybe_evaluate(now)
        hosts = self._services.setdefault(service, {})
        host = hosts.get(endpoint) or hosts.setdefault(endpoint, _Host())
        signal = signal_of(error)
        if signal is Signal.SUCCESS:
            host.successes += 1
            host.consecutive = host.consecutive_gateway = 0
            return False
        if signal is not Signal.FAILURE:
            return False
        host.failures += 1
        host.consecutive += 1
        host.consecutive_gateway = host.consecutive_gateway + 1 if error in GATEWAY_FAILURES else 0
        s = self.settings
        if host.consecutive >= s.consecutive_5xx or host.consecutive_gateway >= s.consecutive_gateway_failure:
            return self._eject(now, service, endpoint)
        return False

    def maybe_evaluate(self, now: float) -> None:
        """Run the interval evaluation if `interval_s` has passed since the last one."""
        if now >= self._next_eval:
            self.evaluate(now)
            self._next_eval = now + self.settings.interval_s

    def evaluate(self, now: float) -> None:
        """Decay multipliers of un-ejected endpoints, run the failure-percentage detector,
        and start a new interval."""
        for service, hosts in self._services.items():
            for host in hosts.values():
                if not host.ejected(now) and host.times > 0:
                    host.times -= 1
            for endpoint in self._percentage_outliers(hosts):
                self._eject(now, service, endpoint)
            for host in hosts.values():
                host.successes = host.failures = 0

    def _percentage_outliers(self, hosts: dict[str, _Host]) -> list[str]:
        s = self.settings
        if len(hosts) < s.failure_percentage_minimum_hosts:
            return []
        rated = [
            (100.0 * h.failures / (h.successes + h.failures), e)
            for e, h in hosts.items()
            if h.successes + h.failures >= max(1, s.failure_percentage_request_volume)
        ]
        return [e for pct, e in sorted(rated, key=lambda r: (-r[0], r[1])) if pct >= s.failure_percentage_threshold]

    def _eject(self, now: float, service: str, endpoint: str) -> bool:
        hosts = self._services[service]
        host = hosts[endpoint]
        if host.ejected(now):
            return False
        if sum(h.ejected(now) for h in hosts.values()) >= self.settings.allowed(len(hosts)):
            return False
        host.times += 1
        host.ejected_until = now + self.settings.eject_s(host.times)
        host.consecutive = host.consecutive_gateway = 0
        if self._on_eject is not None:
            self._on_eject(service, endpoint, now)
        return True
