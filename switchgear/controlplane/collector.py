"""The metrics collector: agents' load-report deltas aggregated into time windows. Pure.

Each report carries, per (service, endpoint), what one agent saw since its previous report.
Per endpoint the collector keeps cumulative sums (every agent's deltas added in) and, for every
time bucket (`bucket_s` wide) that received data, the cumulative sums at the bucket's start; a
window's sums are the difference, so a query is one bisect and one vector subtraction whatever
the window, the fleet size or the report rate. Marks older than `retention_s` are dropped.

Gauges (in-flight attempts, queue length) are not deltas: the latest value per agent is kept
and summed across agents whose last report is fresher than `gauge_ttl_s`; a disconnected
agent's gauges are dropped at once (`agent_gone`). The capacity gauge (each agent's capacity
for an endpoint: max_concurrency, else the one it learned) is kept per agent from the last row
that carried the endpoint, so an agent idle on it still counts its capacity; `capacities` sums it.

Units: seconds, USD. Not thread-safe; the control plane uses it from its event loop.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from switchgear.wire.stats import SUMS, LoadRow, LoadSums, typed_sums

#: Latency histogram bucket upper bounds (s) the control plane asks agents to use: spans a
#: cached hit (ms) to a long LLM generation (minutes).
DEFAULT_LATENCY_BOUNDS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)

Key = tuple[str, str]  # (service, endpoint); endpoint "" = service-level figures

#: The most capacity one agent's report counts for an endpoint (attempts in flight): beyond
#: any real endpoint, and small enough that sums over agents stay within GetStats' uint64.
MAX_CAPACITY = 1 << 32

#: Error kinds (loadreport.proto's ErrorCount.kind) that were the caller's own mistake: agents
#: do not report them, and any that arrive (an older agent) count against nothing here, so no
#: tenant's malformed requests move an endpoint's error rate, health, weight or alerts.
CALLER_FAULT_KINDS = frozenset({"client", "context_length"})


#: One endpoint's deltas in one agent report (the wire's row, shared with the agent's reporter).
LoadDelta = LoadRow


@dataclass(frozen=True, kw_only=True)
class WindowStats(LoadSums):
    """Sums over a window for one key, and the seed's figures derived from them.

    Rates are over *finished* attempts (succeeded + failed); with none, success_rate is 1 and
    error_rate 0 (no evidence of trouble).
    """

    window_s: float
    category: str = ""
    errors: tuple[tuple[str, int], ...] = ()
    latency_buckets: tuple[int, ...] = ()
    in_flight: int = 0
    queue_length: int = 0

    @property
    def failed(self) -> int:
        return sum(count for _, count in self.errors)

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.finished if self.finished else 1.0

    @property
    def error_rate(self) -> float:
        return self.failed / self.finished if self.finished else 0.0

    @property
    def avg_latency_s(self) -> float:
        return self.latency_sum_s / self.latency_count if self.latency_count else 0.0

    @property
    def avg_success_latency_s(self) -> float:
        """Mean latency of successful attempts (fast failures do not make an endpoint look fast)."""
        if self.success_latency_count:
            return self.success_latency_sum_s / self.success_latency_count
        return self.avg_latency_s

    @property
    def cost_per_hour(self) -> float:
        return self.cost_usd * 3600.0 / self.window_s if self.window_s > 0 else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.cache_lookups if self.cache_lookups else 0.0

    @property
    def requests_per_minute(self) -> float:
        """Attempts started per minute over the window (the seed's `requests_per_minute`)."""
        return self.issued * 60.0 / self.window_s if self.window_s > 0 else 0.0

    @property
    def cost_per_request(self) -> float:
        """USD per successful attempt, i.e. what one answered call cost (the seed's
        `cost_per_request`); 0 with none. Failed attempts cost nothing, so this is the cost of a
        request that got an answer."""
        return self.cost_usd / self.succeeded if self.succeeded else 0.0

    @property
    def avg_ttft_s(self) -> float:
        return self.ttft_sum_s / self.ttft_count if self.ttft_count else 0.0

    def quantile_s(self, q: float, bounds: tuple[float, ...] = DEFAULT_LATENCY_BOUNDS_S) -> float:
        """Upper bound of the bucket holding the q-quantile (inf when it is the +Inf bucket)."""
        total = sum(self.latency_buckets)
        if not total:
            return 0.0
        rank, seen = q * total, 0
        for i, count in enumerate(self.latency_buckets):
            seen += count
            if seen >= rank:
                return bounds[i] if i < len(bounds) else math.inf
        return math.inf

    def figure(self, metric: str) -> float:
        """A metric alert rules may name (ALERT_METRICS), e.g. "avg_response_time" in ms."""
        return float((_FIGURES.get(metric) or _COLLECTED[metric])(self))


_FIGURES: dict[str, Callable[[WindowStats], float]] = {
    "request_count": lambda s: s.issued,
    "success_rate": lambda s: s.success_rate,
    "avg_response_time": lambda s: s.avg_latency_s * 1000.0,
    "error_rate": lambda s: s.error_rate,
    "cost_per_hour": lambda s: s.cost_per_hour,
    "cache_hit_rate": lambda s: s.cache_hit_rate,
    "circuit_breaker_trips": lambda s: s.breaker_trips,
    "failover_count": lambda s: s.failovers,
    "queue_length": lambda s: s.queue_length,
    "resource_utilization": lambda s: 0.0,  # needs the capacity: Monitor figures it (utilization)
}

#: The seed's EXTERNAL_SERVICE_METRICS names, in the seed's order.
SEED_METRICS = tuple(_FIGURES)

#: What the seed's coordinator collects per service besides those (`_collect_service_metrics`:
#: requests_per_minute, cost_per_request; its current_load is resource_utilization).
_COLLECTED: dict[str, Callable[[WindowStats], float]] = {
    "requests_per_minute": lambda s: s.requests_per_minute,
    "cost_per_request": lambda s: s.cost_per_request,
}
COLLECTED_METRICS = tuple(_COLLECTED)

#: Every metric an alert rule's condition may name.
ALERT_METRICS = SEED_METRICS + COLLECTED_METRICS


#: Scalar sums kept per series, in vector order (failed-by-kind counts follow them).
_SCALARS = SUMS
_N = len(_SCALARS)


def _minus(a: list[float], b: list[float]) -> list[float]:
    if len(b) < len(a):
        b = b + [0.0] * (len(a) - len(b))
    return [x - y for x, y in zip(a, b, strict=False)]


def _plus_into(total: list[float], delta: Iterable[float], offset: int = 0) -> None:
    for i, x in enumerate(delta, offset):
        if i >= len(total):
            total.extend([0.0] * (i + 1 - len(total)))
        total[i] += x


@dataclass
class _Series:
    """Cumulative sums since start, plus the cumulative sums at the start of every retained
    bucket ("marks"): a window's sums are `total - mark[first bucket in the window]`, so a
    query costs one bisect and one vector subtraction, however long the window."""

    category: str = ""
    total: list[float] = field(default_factory=lambda: [0.0] * _N)  # scalars, then failed by kind
    hist: list[float] = field(default_factory=list)
    mark_index: list[int] = field(default_factory=list)
    mark_total: list[list[float]] = field(default_factory=list)
    mark_hist: list[list[float]] = field(default_factory=list)
    first_at: float = math.inf  # when data first arrived (s, collector clock)
    last_success_at: float = -math.inf

    def add(self, index: int, d: LoadDelta, kinds: dict[str, int]) -> None:
        if not self.mark_index or self.mark_index[-1] != index:
            self.mark_index.append(index)
            self.mark_total.append(list(self.total))
            self.mark_hist.append(list(self.hist))
        _plus_into(self.total, [getattr(d, name) for name in _SCALARS])
        for kind, count in d.failed:
            if kind in CALLER_FAULT_KINDS:
                continue
            _plus_into(self.total, (count,), _N + kinds.setdefault(kind, len(kinds)))
        _plus_into(self.hist, d.latency_buckets)

    def since(self, first: int) -> tuple[list[float], list[float]] | None:
        """Sums over buckets with index >= first (None when there are none)."""
        j = bisect.bisect_left(self.mark_index, first)
        if j == len(self.mark_index):
            return None
        return _minus(self.total, self.mark_total[j]), _minus(self.hist, self.mark_hist[j])

    def prune(self, oldest: int) -> None:
        j = bisect.bisect_left(self.mark_index, oldest)
        if j:
            del self.mark_index[:j], self.mark_total[:j], self.mark_hist[:j]


def _freeze(
    v: list[float], hist: list[float], kinds: dict[str, int], window_s: float, category: str, gauges: tuple[int, int]
) -> WindowStats:
    scalars = typed_sums(dict(zip(_SCALARS, v, strict=False)))
    errors = tuple(sorted((k, round(v[_N + i])) for k, i in kinds.items() if _N + i < len(v) and round(v[_N + i])))
    return WindowStats(
        window_s=window_s, category=category, errors=errors, latency_buckets=tuple(round(x) for x in hist),
        in_flight=gauges[0], queue_length=gauges[1], **scalars,
    )


class Collector:
    def __init__(self, *, bucket_s: float = 1.0, retention_s: float = 600.0, gauge_ttl_s: float = 30.0) -> None:
        if bucket_s <= 0:
            raise ValueError("bucket_s must be positive")
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self.gauge_ttl_s = gauge_ttl_s
        self._series: dict[Key, _Series] = {}
        self._kinds: dict[str, int] = {}  # ErrorKind value -> position after the scalars
        self._gauges: dict[str, dict[Key, tuple[int, int]]] = {}  # agent -> key -> (in_flight, queue)
        self._reported_at: dict[str, float] = {}
        self._capacities: dict[str, dict[Key, int]] = {}  # agent -> key -> capacity it reported
        self._pruned_at = -1
        # fresh gauges summed per key, for (now, gauge_ttl_s) (None: a report or a departure since)
        self._summed: dict[Key, tuple[int, int]] = {}
        self._summed_for: tuple[float, float] | None = None

    def record(self, agent: str, deltas: Iterable[LoadDelta], now: float) -> None:
        index = int(now // self.bucket_s)
        gauges: dict[Key, tuple[int, int]] = {}
        capacities = self._capacities.setdefault(agent, {})
        for d in deltas:
            key = (d.service, d.endpoint)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(category=d.category)
            series.category = d.category or series.category
            series.add(index, d, self._kinds)
            if d.issued or d.succeeded:
                series.first_at = min(series.first_at, now)
            if d.succeeded:
                series.last_success_at = now
            if d.in_flight or d.queue_length:
                gauges[key] = (d.in_flight, d.queue_length)
            if d.capacity and d.endpoint:
                capacities[key] = min(d.capacity, MAX_CAPACITY)
            else:
                capacities.pop(key, None)
        self._gauges[agent] = gauges
        self._summed_for = None
        self._reported_at[agent] = now
        if index != self._pruned_at:  # once per bucket is enough
            self._pruned_at = index
            oldest = index - int(self.retention_s // self.bucket_s)
            for series in self._series.values():
                series.prune(oldest)

    def agent_gone(self, agent: str) -> None:
        self._gauges.pop(agent, None)
        self._summed_for = None
        self._reported_at.pop(agent, None)
        self._capacities.pop(agent, None)

    def keys(self) -> list[Key]:
        return sorted(self._series)

    def category(self, key: Key) -> str:
        series = self._series.get(key)
        return series.category if series else ""

    def first_data_at(self, key: Key) -> float:
        series = self._series.get(key)
        return series.first_at if series else math.inf

    def last_success_at(self, key: Key) -> float:
        series = self._series.get(key)
        return series.last_success_at if series else -math.inf

    def reporting_agents(self, window_s: float, now: float) -> int:
        return sum(1 for at in self._reported_at.values() if now - at <= window_s)

    def agent_loads(self, now: float) -> dict[str, tuple[int, int, float]]:
        """Per agent that reported within gauge_ttl_s: (in flight, queue length, when it reported)."""
        return {agent: (sum(g[0] for g in gauges.values()), sum(g[1] for g in gauges.values()), at)
                for agent, gauges in self._gauges.items()
                if now - (at := self._reported_at.get(agent, -math.inf)) <= self.gauge_ttl_s}

    def _gauge(self, key: Key, now: float) -> tuple[int, int]:
        """(in flight, queue length) of `key`, summed over the agents whose gauges are fresh.
        The sums of every key are made in one pass over the agents and kept until the next
        report or `now`: a tick asks for each endpoint, and a fleet has thousands of agents."""
        if self._summed_for != (now, self.gauge_ttl_s):
            summed: dict[Key, tuple[int, int]] = {}
            for agent, gauges in self._gauges.items():
                if gauges and now - self._reported_at.get(agent, -math.inf) <= self.gauge_ttl_s:
                    for k, (in_flight, queue) in gauges.items():
                        f, q = summed.get(k, (0, 0))
                        summed[k] = (f + in_flight, q + queue)
            self._summed, self._summed_for = summed, (now, self.gauge_ttl_s)
        return self._summed.get(key, (0, 0))

    def in_flight(self, key: Key, now: float) -> int:
        """Attempts in flight on `key`, summed over the agents whose gauges are fresh."""
        return self._gauge(key, now)[0]

    def capacities(self, now: float) -> dict[Key, tuple[int, int]]:
        """Per key: (attempts in flight, capacity) summed over the agents that reported within
        gauge_ttl_s and know its capacity; agents that do not know it count in neither sum.
        One pass over the agents' figures (a monitor tick reads every endpoint)."""
        loads: dict[Key, tuple[int, int]] = {}
        for agent, capacities in self._capacities.items():
            if not capacities or now - self._reported_at.get(agent, -math.inf) > self.gauge_ttl_s:
                continue
            gauges = self._gauges.get(agent, {})
            for key, cap in capacities.items():
                in_flight, capacity = loads.get(key, (0, 0))
                loads[key] = (in_flight + gauges.get(key, (0, 0))[0], capacity + cap)
        return loads

    def stats(self, key: Key, window_s: float, now: float, since: float = -math.inf) -> WindowStats:
        """Sums for `key` over the last `window_s` seconds (and not before `since`), to the
        bucket: buckets are counted whole from the first one starting after the window's start."""
        series = self._series.get(key)
        if series is None:
            return WindowStats(window_s=window_s)
        start = max(now - window_s, since)
        found = series.since(int(start // self.bucket_s) + 1)
        v, hist = found if found is not None else ([0.0] * _N, [])
        return _freeze(v, hist, self._kinds, window_s, series.category, self._gauge(key, now))

    def sample(self, key: Key, window_s: float, now: float, since: float = -math.inf) -> tuple[int, float, float, int]:
        """(finished attempts, error rate, mean success latency s, in flight) over the window:
        what health scoring needs, without building a WindowStats (10,000 endpoints per tick)."""
        series = self._series.get(key)
        found = series.since(int(max(now - window_s, since) // self.bucket_s) + 1) if series else None
        if found is None:
            return 0, 0.0, 0.0, self._gauge(key, now)[0]
        v = found[0]
        failed = sum(v[_N:])
        finished = v[1] + failed
        latency = v[4] / v[5] if v[5] else (v[2] / v[3] if v[3] else 0.0)
        return round(finished), (failed / finished if finished else 0.0), latency, self._gauge(key, now)[0]

    def active_services(self, window_s: float, now: float) -> set[str]:
        """Services with a series that has data in the last `window_s` seconds (a superset of
        those whose `sample` or `stats` over that window can be non-zero in its sums)."""
        first = int((now - window_s) // self.bucket_s) + 1
        return {key[0] for key, series in self._series.items() if series.mark_index and series.mark_index[-1] >= first}

    def services(self, window_s: float, now: float) -> dict[str, WindowStats]:
        """Per-service sums (endpoint and service-level series together) over the window."""
        first = int((now - window_s) // self.bucket_s) + 1
        sums: dict[str, tuple[list[float], list[float], str, list[int]]] = {}
        for key, series in self._series.items():
            found = series.since(first)
            v, hist = found if found is not None else ([0.0] * _N, [])
            total = sums.get(key[0])
            if total is None:
                total = sums[key[0]] = ([0.0] * _N, [], series.category, [0, 0])
            _plus_into(total[0], v)
            _plus_into(total[1], hist)
            in_flight, queue = self._gauge(key, now)
            total[3][0] += in_flight
            total[3][1] += queue
        return {name: _freeze(v, h, self._kinds, window_s, c, (g[0], g[1])) for name, (v, h, c, g) in sums.items()}

    def window(self, window_s: float, now: float) -> dict[Key, WindowStats]:
        return {key: self.stats(key, window_s, now) for key in self._series}

    def totals(self, now: float) -> dict[Key, WindowStats]:
        """Sums since the collector started (monotonic: Prometheus counters)."""
        return {k: _freeze(s.total, s.hist, self._kinds, 0.0, s.category, self._gauge(k, now))
                for k, s in self._series.items()}


def service_totals(rows: Mapping[Key, WindowStats]) -> dict[str, WindowStats]:
    """Per-service sums of endpoint rows and service-level ("" endpoint) rows."""
    merged: dict[str, WindowStats] = {}
    for (service, _), row in rows.items():
        merged[service] = _merge(merged[service], row) if service in merged else row
    return merged


def _merge(a: WindowStats, b: WindowStats) -> WindowStats:
    scalars = {name: getattr(a, name) + getattr(b, name) for name in _SCALARS}
    errors: dict[str, int] = dict(a.errors)
    for kind, count in b.errors:
        errors[kind] = errors.get(kind, 0) + count
    size = max(len(a.latency_buckets), len(b.latency_buckets))

    def pad(t: tuple[int, ...]) -> tuple[int, ...]:
        return t + (0,) * (size - len(t))

    return WindowStats(
        window_s=a.window_s, category=a.category or b.category, errors=tuple(sorted(errors.items())),
        latency_buckets=tuple(x + y for x, y in zip(pad(a.latency_buckets), pad(b.latency_buckets), strict=True)),
        in_flight=a.in_flight + b.in_flight, queue_length=a.queue_length + b.queue_length, **scalars,
    )
