"""The agent's /metrics: what this agent saw of each endpoint, and its own overhead.

Families (labels service, endpoint, category; endpoint="" carries service-level figures), all
named `switchgear_<seed name>` as on the control plane, for this agent only:
request_count (upstream attempts, retries included: requests are door_metrics.py's
switchgear_requests_total), circuit_breaker_trips, failover_count (counters since start); success_rate,
error_rate, avg_response_time (ms), cost_per_hour (USD), cache_hit_rate (gauges over the last
`window_s`); queue_length, resource_utilization, in_flight (gauges now). Plus histograms
switchgear_response_time_seconds (attempt latency, for PromQL quantiles) and
switchgear_gateway_overhead_seconds (time a request through either door spent in Switchgear,
excluding upstream attempts), and switchgear_snapshot_info.

Cost: an attempt is a few dict updates on the event loop; families are built at scrape time.

Hooks for components other issues add (O(1), call from the event loop):
`record_cache(service, hit)`, `record_breaker_trip(service, endpoint)`,
`set_queue_length(service, n)`, `set_resource_utilization(service, endpoint, ratio)` (else
resource_utilization is in-flight over `capacity(service, endpoint)`, the agent's capacity of
the endpoint as its load reports carry it; no sample while that is 0, unknown), and
`set_decisions(source)`: a callable returning {(service, endpoint): {decision: count}} (the
resilience counters, attempts.Resilience.counters) exported as
switchgear_resilience_decisions_total{service, endpoint, decision}.
"""

from __future__ import annotations

import bisect
import contextvars
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as PromCollector

from switchgear import metrics_http
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.redis_round import RedisRound
from switchgear.dataplane.redis_state import RedisHealth
from switchgear.tls import ListenError

LABELS = ("service", "endpoint", "category")
LATENCY_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

Key = tuple[str, str]

#: Upstream seconds of the Invoke being measured on this task (None outside `measure`).
_UPSTREAM: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("switchgear_upstream", default=None)


@dataclass
class _Totals:
    category: str = ""
    issued: int = 0
    succeeded: int = 0
    failed: int = 0
    failovers: int = 0
    breaker_trips: int = 0
    cache_lookups: int = 0
    cache_hits: int = 0
    latency_sum_s: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_S) + 1))


class _Window:
    """Per-second sums over the last `window_s`: [finished, succeeded, latency_sum, cost, lookups, hits]."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.seconds: dict[int, list[float]] = {}

    def add(self, now: float, index: int, value: float) -> None:
        self.row(now)[index] += value

    def row(self, now: float) -> list[float]:
        """The sums of the second `now` falls in (older seconds are dropped when it starts)."""
        row = self.seconds.get(int(now))
        if row is None:
            row = self.seconds[int(now)] = [0.0] * 6
            oldest = int(now - self.window_s)
            for old in [s for s in self.seconds if s <= oldest]:
                del self.seconds[old]
        return row

    def sums(self, now: float) -> list[float]:
        oldest = int(now - self.window_s)
        total = [0.0] * 6
        for second, row in self.seconds.items():
            if second > oldest:
                for i, v in enumerate(row):
                    total[i] += v
        return total


class AgentMetrics(PromCollector):
    """AttemptObserver + Prometheus collector. Use from the event loop (scrapes come from the
    metrics thread and only read; a scrape racing an update may see it half applied)."""

    after_answer = True  # counts only: a success reaches it after the answer (events.AttemptObserver)

    def __init__(self, *, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 version: Callable[[], str] = lambda: "") -> None:
        self._clock = clock
        self._window_s = window_s
        self._version = version
        self._totals: dict[Key, _Totals] = {}
        self._windows: dict[Key, _Window] = {}
        self._in_flight: dict[Key, int] = {}
        self._queue: dict[str, int] = {}
        self._utilization: dict[Key, float] = {}
        self.capacity: Callable[[str, str], int] = lambda service, endpoint: 0
        self._overhead = [0] * (len(OVERHEAD_BOUNDS_S) + 1)
        self._overhead_sum = 0.0
        self._decisions: Callable[[], Mapping[Key, Mapping[str, int]]] | None = None

    def _key(self, service: str, endpoint: str, category: str = "") -> tuple[_Totals, _Window]:
        key = (service, endpoint)
        totals = self._totals.get(key)
        if totals is None:
            totals = self._totals[key] = _Totals(category)
            self._windows[key] = _Window(self._window_s)
        return totals, self._windows[key]

    # AttemptObserver
    def attempt_started(self, event: AttemptStart) -> None:
        totals, _ = self._key(event.service, event.endpoint, event.category)
        totals.issued += 1
        if event.attempt > 1:
            totals.failovers += 1
        key = (event.service, event.endpoint)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def attempt_ended(self, event: AttemptEnd) -> None:
        totals, window = self._key(event.service, event.endpoint, event.category)
        key = (event.service, event.endpoint)
        self._in_flight[key] = max(0, self._in_flight.get(key, 0) - 1)
        if event.cancelled or (event.error is not None and event.error.caller_fault):
            return  # abandoned, or the caller's own mistake: not the endpoint's error rate, latency or cost
        now = self._clock()
        ok = event.error is None
        totals.succeeded += ok
        totals.failed += not ok
        totals.latency_sum_s += event.latency_s
        totals.buckets[bisect.bisect_left(LATENCY_BOUNDS_S, event.latency_s)] += 1
        row = window.row(now)
        row[0] += 1.0
        row[2] += event.latency_s
        if ok:
            row[1] += 1.0
            row[3] += event.cost_usd
        upstream = _UPSTREAM.get()
        if upstream is not None:
            upstream[0] += event.latency_s

    # hooks
    def record_cache(self, service: str, hit: bool) -> None:
        totals, window = self._key(service, "")
        totals.cache_lookups += 1
        totals.cache_hits += hit
        now = self._clock()
        window.add(now, 4, 1.0)
        if hit:
            window.add(now, 5, 1.0)

    def record_breaker_trip(self, service: str, endpoint: str) -> None:
        self._key(service, endpoint)[0].breaker_trips += 1

    def set_queue_length(self, service: str, length: int) -> None:
        self._queue[service] = length

    def set_decisions(self, source: Callable[[], Mapping[Key, Mapping[str, int]]]) -> None:
        self._decisions = source

    def set_cache(self, source: Callable[[], Any]) -> None:
        """The response cache's counters (cache.CacheCounters): hits, misses, evictions, bytes."""
        self._cache = source

    def set_resource_utilization(self, service: str, endpoint: str, ratio: float) -> None:
        self._utilization[(service, endpoint)] = ratio

    def _utilization_of(self, key: Key, sums: list[float]) -> float | None:
        if key in self._utilization:
            return self._utilization[key]
        capacity = self.capacity(*key) if key[1] else 0
        return self._in_flight.get(key, 0) / capacity if capacity else None

    @contextmanager
    def measure(self) -> Iterator[None]:
        """Wrap one request (either door): records its time minus its upstream attempts' time as overhead."""
        upstream = [0.0]
        token = _UPSTREAM.set(upstream)
        start = time.perf_counter()
        try:
            yield
        finally:
            _UPSTREAM.reset(token)
            self.record_overhead(max(0.0, time.perf_counter() - start - upstream[0]))

    def record_overhead(self, seconds: float) -> None:
        """One request's time in Switchgear, its upstream attempts' time excluded (the doors'
        edge measures it: door_metrics.Edge)."""
        self._overhead[bisect.bisect_left(OVERHEAD_BOUNDS_S, seconds)] += 1
        self._overhead_sum += seconds

    # Prometheus
    def collect(self) -> Iterator[Any]:
        now = self._clock()
        rows = sorted(self._totals.items())
        for name, text, attr in (
            ("request_count", "Upstream attempts started by this agent", "issued"),
            ("circuit_breaker_trips", "Circuit breaker openings on this agent", "breaker_trips"),
            ("failover_count", "Attempts that were a retry or failover onto this endpoint", "failovers"),
        ):
            family = CounterMetricFamily(f"switchgear_{name}", text, labels=LABELS)
            for (service, endpoint), t in rows:
                family.add_metric([service, endpoint, t.category], float(getattr(t, attr)))
            yield family
        window = f" over the last {self._window_s:g} s"
        sums = {key: self._windows[key].sums(now) for key, _ in rows}
        gauges: dict[str, tuple[str, Callable[[Key, list[float]], float | None]]] = {
            "success_rate": ("Successful share of finished attempts" + window,
                             lambda k, s: s[1] / s[0] if s[0] else 1.0),
            "error_rate": ("Failed share of finished attempts" + window, lambda k, s: 1 - s[1] / s[0] if s[0] else 0.0),
            "avg_response_time": ("Mean attempt latency in milliseconds" + window,
                                  lambda k, s: s[2] / s[0] * 1e3 if s[0] else 0.0),
            "cost_per_hour": ("USD spent" + window + ", scaled to one hour",
                              lambda k, s: s[3] * 3600.0 / self._window_s),
            "cache_hit_rate": ("Cache hits over lookups" + window, lambda k, s: s[5] / s[4] if s[4] else 0.0),
            "queue_length": ("Requests waiting for admission",
                             lambda k, s: float(self._queue.get(k[0], 0)) if not k[1] else 0.0),
            "resource_utilization": ("In-flight over capacity (max_concurrency, else the learned one); "
                                     "no sample while unknown", self._utilization_of),
            "in_flight": ("Attempts in flight", lambda k, s: float(self._in_flight.get(k, 0))),
        }
        for name, (text, value) in gauges.items():
            gauge = GaugeMetricFamily(f"switchgear_{name}", text, labels=LABELS)
            for key, t in rows:
                figure = value(key, sums[key])
                if figure is not None:  # resource_utilization of unknown capacity: no sample
                    gauge.add_metric([key[0], key[1], t.category], figure)
            yield gauge
        histogram = HistogramMetricFamily("switchgear_response_time_seconds", "Attempt latency", labels=LABELS)
        for (service, endpoint), t in rows:
            if endpoint:
                histogram.add_metric([service, endpoint, t.category], _buckets(t.buckets, LATENCY_BOUNDS_S),
                                     t.latency_sum_s)
        yield histogram
        overhead = HistogramMetricFamily(
            "switchgear_gateway_overhead_seconds",
            "Time a request (either door) spent in Switchgear, excluding upstream attempts")
        overhead.add_metric([], _buckets(self._overhead, OVERHEAD_BOUNDS_S), self._overhead_sum)
        yield overhead
        if self._decisions is not None:
            decisions = CounterMetricFamily("switchgear_resilience_decisions",
                                            "Resilience decisions: trips, ejections, retries, failovers, "
                                            "fallbacks, sheds, ...", labels=("service", "endpoint", "decision"))
            for (service, endpoint), counts in sorted(self._decisions().items()):
                for decision, count in counts.items():
                    decisions.add_metric([service, endpoint, decision], float(count))
            yield decisions
        cache = getattr(self, "_cache", None)
        if cache is not None:
            counters = cache()
            for name, text in (("hits", "Response cache hits"), ("misses", "Response cache misses"),
                               ("evictions", "Entries evicted to keep the memory bound"),
                               ("expirations", "Entries dropped at their TTL"), ("stores", "Responses stored")):
                family = CounterMetricFamily(f"switchgear_cache_{name}", text)
                family.add_metric([], float(getattr(counters, name)))
                yield family
            for name, text in (("bytes", "Bytes the response cache holds"), ("entries", "Entries it holds")):
                gauge = GaugeMetricFamily(f"switchgear_cache_{name}", text)
                gauge.add_metric([], float(getattr(counters, name)))
                yield gauge
        info = GaugeMetricFamily("switchgear_snapshot_info", "The snapshot version this agent serves",
                                 labels=("version",))
        info.add_metric([self._version()], 1.0)
        yield info


def _buckets(counts: list[int], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, count in zip((*bounds, math.inf), counts, strict=True):
        running += count
        out.append(("+Inf" if bound == math.inf else repr(bound), float(running)))
    return out


def serve_metrics(collector: PromCollector, listen: str, *more: PromCollector) -> tuple[Any, str]:
    """Serve /metrics on `listen` ("host:port"; port 0 picks one) in a daemon thread, from
    `collector` and any `more` (e.g. RedisMetrics).

    Returns (server, bound address); `server.shutdown()` stops it.
    """
    registry = CollectorRegistry(auto_describe=False)
    for each in (collector, *more):
        registry.register(each)
    try:
        return metrics_http.serve(registry, listen)
    except OSError as exc:
        raise ListenError(f"--metrics-listen {listen}: {exc.strerror or exc}") from None


class RedisMetrics(PromCollector):
    """The shared-state mode of an agent run with Redis (redis_state.RedisHealth):
    switchgear_redis_degraded (gauge, 1 while quotas and cache are local only),
    switchgear_redis_failures_total{use} (Redis calls that failed, use "quota" or "cache") and
    switchgear_redis_fallbacks_total{use} (operations answered locally: failed, or skipped while
    degraded) and switchgear_redis_stores_dropped_total (cache stores written behind that never
    reached Redis: the bounded queue was full, or their round failed; redis_round.py). Scrapes
    only read counts."""

    def __init__(self, health: RedisHealth, rounds: RedisRound | None = None) -> None:
        self._health = health
        self._rounds = rounds

    def collect(self) -> Iterator[Any]:
        degraded = GaugeMetricFamily("switchgear_redis_degraded",
                                     "1 while Redis is unusable and quotas and cache are this agent's alone")
        degraded.add_metric([], float(self._health.degraded))
        yield degraded
        for name, text, counts in (
            ("failures", "Redis calls that failed or timed out", self._health.failures),
            ("fallbacks", "Operations answered locally because Redis failed or was degraded", self._health.fallbacks),
        ):
            family = CounterMetricFamily(f"switchgear_redis_{name}", text, labels=("use",))
            for use, count in sorted(counts.items()):
                family.add_metric([use], float(count))
            yield family
        dropped = CounterMetricFamily("switchgear_redis_stores_dropped",
                                      "Cache stores not copied to Redis: the write-behind queue was full or "
                                      "their round failed (the entry stays in this agent's memory)")
        dropped.add_metric([], float(self._rounds.stores_dropped if self._rounds is not None else 0))
        yield dropped
