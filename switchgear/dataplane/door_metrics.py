"""Request-level Prometheus families for both front doors, and the edge that feeds them.

What an SRE queries (counters since start; labels bounded, see below):

    switchgear_requests_total{door, route, status_class, tenant}   one per request, retries not counted
    switchgear_request_duration_seconds{door, route}               histogram of whole requests
    switchgear_rejections_total{door, reason}                      4xx/5xx answers by error code
    switchgear_upstream_attempts_total{service, endpoint, outcome} every attempt: success, an
                                                                    error kind, caller_error, cancelled
    switchgear_tokens_total{route, tenant, direction}              input / output, as answers said
    switchgear_token_parts_total{route, tenant, part}              parts of those: cache_read /
                                                                    cache_write (of input), reasoning
                                                                    (of output); never add to the above
    switchgear_web_searches_total{route, tenant}                   searches providers ran for answers
                                                                    (server tools), priced per search
    switchgear_cost_usd_total{route, tenant}                       USD, as answers said

(A cache hit is a request, not spend: it moves requests, not tokens or cost.)

Cardinality: `route` is a service the agent's snapshot names ("unknown" otherwise), `tenant`
a tenant id; each label keeps its first `max_routes` / `max_tenants` distinct values and
folds later ones into "other", so a flood of made-up model names or keys adds no series.
`reason` is an error code the doors choose from fixed sets (also capped). `door` is "http"
or "grpc"; `status_class` "2xx", "4xx" or "5xx" (gRPC codes map as outcome.py maps refusals).

`Edge` is what a door calls: `begin(door, request_id)` → Exchange (access_log.py), and
`finish(exchange)` records its families and writes its access-log line. Per request it is a
few dict updates and, with the access log on, one JSON line.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as PromCollector

from switchgear.dataplane import access_log
from switchgear.dataplane.access_log import Exchange
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.metrics import LATENCY_BOUNDS_S, _buckets
from switchgear.dataplane.snapshot import Holder

DEFAULT_MAX_TENANTS = 100
DEFAULT_MAX_ROUTES = 500
MAX_REASONS = 64
OTHER = "other"
#: switchgear_token_parts_total's `part` values, in access_log.Parts order.
TOKEN_PARTS = ("cache_read", "cache_write", "reasoning")
UNKNOWN = "unknown"

#: gRPC codes that are the caller's doing (status_class 4xx); the rest but OK are 5xx.
_CALLER_CODES = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED,
})


def grpc_status_class(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.OK:
        return "2xx"
    return "4xx" if code in _CALLER_CODES else "5xx"


def http_status_class(status: int) -> str:
    return f"{min(max(status // 100, 1), 5)}xx"


class Bounded:
    """A label's values: the first `limit` distinct ones kept, later ones "other"."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return OTHER


class DoorMetrics(PromCollector):
    """The families above; also an AttemptObserver (attempt outcomes, and the current
    exchange's attempt count and endpoint). Updated on the event loop, read by scrapes."""

    after_answer = True  # counts only: a success reaches it after the answer (events.AttemptObserver)

    def __init__(self, *, max_tenants: int = DEFAULT_MAX_TENANTS, max_routes: int = DEFAULT_MAX_ROUTES) -> None:
        if max_tenants < 1 or max_routes < 1:
            raise ValueError("max_tenants and max_routes must be at least 1")
        self._tenant = Bounded(max_tenants)
        self._route = Bounded(max_routes)
        self._reason = Bounded(MAX_REASONS)
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.durations: dict[tuple[str, str], list[float]] = {}  # bucket counts..., then the sum
        self.rejections: dict[tuple[str, str], int] = {}
        self.attempts: dict[tuple[str, str, str], int] = {}
        self.tokens: dict[tuple[str, str, str], int] = {}
        self.token_parts: dict[tuple[str, str, str], int] = {}
        self.web_searches: dict[tuple[str, str], int] = {}
        self.cost: dict[tuple[str, str], float] = {}

    # AttemptObserver
    def attempt_started(self, event: AttemptStart) -> None:
        exchange = access_log.current()
        if exchange is not None:
            exchange.attempts += 1
            exchange.endpoint = event.endpoint

    def attempt_ended(self, event: AttemptEnd) -> None:
        exchange = access_log.current()
        if exchange is not None:
            exchange.upstream_s += event.latency_s
        if event.cancelled:
            outcome = "cancelled"
        elif event.error is None:
            outcome = "success"
        else:
            outcome = "caller_error" if event.error.caller_fault else event.error.value
        key = (event.service, event.endpoint, outcome)
        self.attempts[key] = self.attempts.get(key, 0) + 1

    def record(self, exchange: Exchange) -> None:
        route = self._route(exchange.route or UNKNOWN)
        tenant = self._tenant(exchange.tenant) if exchange.tenant else ""
        key = (exchange.door, route, exchange.status_class, tenant)
        self.requests[key] = self.requests.get(key, 0) + 1
        duration = self.durations.get((exchange.door, route))
        if duration is None:
            duration = self.durations[(exchange.door, route)] = [0.0] * (len(LATENCY_BOUNDS_S) + 2)
        duration[bisect.bisect_left(LATENCY_BOUNDS_S, exchange.latency_s)] += 1
        duration[-1] += exchange.latency_s
        if exchange.reason:
            rkey = (exchange.door, self._reason(exchange.reason))
            self.rejections[rkey] = self.rejections.get(rkey, 0) + 1
        if not exchange.cached and (exchange.input_tokens or exchange.output_tokens or exchange.cost_usd):
            for direction, count in (("input", exchange.input_tokens), ("output", exchange.output_tokens)):
                tkey = (route, tenant, direction)
                self.tokens[tkey] = self.tokens.get(tkey, 0) + count
            *token_parts, searches = exchange.parts
            for part, count in zip(TOKEN_PARTS, token_parts, strict=True):
                if count:
                    pkey = (route, tenant, part)
                    self.token_parts[pkey] = self.token_parts.get(pkey, 0) + count
            ckey = (route, tenant)
            if searches:
                self.web_searches[ckey] = self.web_searches.get(ckey, 0) + searches
            self.cost[ckey] = self.cost.get(ckey, 0.0) + exchange.cost_usd

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily("switchgear_requests", "Requests answered by a front door (a retried "
                                       "request counts once)", labels=("door", "route", "status_class", "tenant"))
        for request_labels, count in sorted(self.requests.items()):
            requests.add_metric(list(request_labels), float(count))
        yield requests
        durations = HistogramMetricFamily("switchgear_request_duration_seconds",
                                          "Whole-request latency at the front door", labels=("door", "route"))
        for (door, route), row in sorted(self.durations.items()):
            durations.add_metric([door, route], _buckets([int(c) for c in row[:-1]], LATENCY_BOUNDS_S), row[-1])
        yield durations
        rejections = CounterMetricFamily("switchgear_rejections", "Requests answered with an error, by reason",
                                         labels=("door", "reason"))
        for rejection_labels, count in sorted(self.rejections.items()):
            rejections.add_metric(list(rejection_labels), float(count))
        yield rejections
        attempts = CounterMetricFamily("switchgear_upstream_attempts", "Upstream attempts by outcome",
                                       labels=("service", "endpoint", "outcome"))
        for attempt_labels, count in sorted(self.attempts.items()):
            attempts.add_metric(list(attempt_labels), float(count))
        yield attempts
        tokens = CounterMetricFamily("switchgear_tokens", "Tokens answers reported, by direction",
                                     labels=("route", "tenant", "direction"))
        for token_labels, count in sorted(self.tokens.items()):
            tokens.add_metric(list(token_labels), float(count))
        yield tokens
        parts = CounterMetricFamily("switchgear_token_parts", "Parts of the tokens answers reported: cache reads "
                                    "and writes of input, reasoning of output", labels=("route", "tenant", "part"))
        for part_labels, count in sorted(self.token_parts.items()):
            parts.add_metric(list(part_labels), float(count))
        yield parts
        searched = CounterMetricFamily("switchgear_web_searches", "Web searches providers ran for answers (server "
                                       "tools), priced per search", labels=("route", "tenant"))
        for search_labels, count in sorted(self.web_searches.items()):
            searched.add_metric(list(search_labels), float(count))
        yield searched
        cost = CounterMetricFamily("switchgear_cost_usd", "USD answers cost", labels=("route", "tenant"))
        for cost_labels, usd in sorted(self.cost.items()):
            cost.add_metric(list(cost_labels), usd)
        yield cost


class Edge:
    """What each door calls per request (see the module docstring). `holder` tells which
    routes are real (only those become label values); `overhead` is told each request's time
    minus its upstream attempts' (AgentMetrics.record_overhead)."""

    def __init__(self, metrics: DoorMetrics, holder: Holder,
                 overhead: Callable[[float], None] = lambda seconds: None) -> None:
        self.metrics = metrics
        self._holder = holder
        self._overhead = overhead

    def begin(self, door: str, request_id: str) -> Exchange:
        return Exchange(door, request_id)

    def route(self, exchange: Exchange, service: str) -> None:
        """Names the exchange's route when the snapshot knows the service."""
        snapshot = self._holder.current
        if snapshot is not None and service in snapshot.services:
            exchange.route = service

    def finish(self, exchange: Exchange) -> None:
        exchange.close()
        self._overhead(max(0.0, exchange.latency_s - exchange.upstream_s))
        self.metrics.record(exchange)
        access_log.write(exchange)
