"""The control plane's /metrics: the fleet's figures, aggregated from every agent's load reports.

Families (labels service, endpoint, category; one series per endpoint): the seed's
EXTERNAL_SERVICE_METRICS, each named `switchgear_<seed name>` — request_count (counter, attempts
since start), success_rate, error_rate, avg_response_time (ms, the seed's unit), cost_per_hour
(USD), cache_hit_rate, circuit_breaker_trips (counter), failover_count (counter), queue_length,
resource_utilization (gauges over the monitoring window); and what the seed's coordinator
collects besides, requests_per_minute and cost_per_request (USD per successful attempt), gauges
over the same window. A service's totals are in their own families, `switchgear_service_<seed
name>` (labels service, category), so `sum by (service)` over an endpoint family counts each
attempt once. Plus the loop's own state: switchgear_endpoint_weight, switchgear_endpoint_health
(1 for the current state label), switchgear_alert_firing, switchgear_alert_no_data (1 while a
firing alert's window is empty), switchgear_snapshot_seq, switchgear_agents_connected,
switchgear_load_reports (counter), switchgear_tasks_purged (counter: rows the task retention
purge deleted, by kind) and, for replicas, switchgear_controlplane_leader / _leader_epoch.

Everything is computed at scrape time from the collector (no per-request work here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector as PromCollector

from switchgear import metrics_http
from switchgear.controlplane.monitor import Monitor

LABELS = ("service", "endpoint", "category")
SERVICE_LABELS = ("service", "category")
STATES = ("healthy", "degraded", "ejected", "draining")


class ControlPlaneMetrics(PromCollector):
    def __init__(
        self, monitor: Monitor, *, seq: Callable[[], int], agents: Callable[[], int], reports: Callable[[], int],
        leader: Callable[[], int] = lambda: 1, purged: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self._leader = leader
        self._purged = purged
        self._monitor = monitor
        self._seq = seq
        self._agents = agents
        self._reports = reports

    def collect(self) -> Iterator[Any]:
        rows = self._monitor.rows()
        window = f" over the last {self._monitor.settings.alert_window_s:g} s"
        counters = {
            "request_count": ("Upstream attempts started (all agents, since the control plane started)", "issued"),
            "circuit_breaker_trips": ("Circuit breaker openings reported by agents", "breaker_trips"),
            "failover_count": ("Attempts that were a retry or failover onto this endpoint", "failovers"),
        }
        totals = self._monitor.totals()
        for name, (text, attr) in counters.items():
            family = CounterMetricFamily(f"switchgear_{name}", text, labels=LABELS)
            service = CounterMetricFamily(f"switchgear_service_{name}", f"{text}: the service's total",
                                          labels=SERVICE_LABELS)
            for key, st in totals.items():
                if key[1]:
                    family.add_metric([key[0], key[1], st.category], float(getattr(st, attr)))
                else:
                    service.add_metric([key[0], st.category], float(getattr(st, attr)))
            yield family
            yield service
        gauges: dict[str, tuple[str, Callable[[Any], float | None]]] = {
            "success_rate": ("Successful share of finished attempts" + window, lambda r: r.stats.success_rate),
            "error_rate": ("Failed share of finished attempts" + window, lambda r: r.stats.error_rate),
            "avg_response_time": ("Mean attempt latency in milliseconds" + window,
                                  lambda r: r.stats.avg_latency_s * 1e3),
            "cost_per_hour": ("USD spent" + window + ", scaled to one hour", lambda r: r.stats.cost_per_hour),
            "cache_hit_rate": ("Cache hits over lookups" + window, lambda r: r.stats.cache_hit_rate),
            "queue_length": ("Requests waiting for admission (sum over agents)", lambda r: r.stats.queue_length),
            "resource_utilization": ("In-flight attempts over capacity: max_concurrency when set, else the "
                                     "capacity agents learned (sums over agents); no sample while unknown",
                                     lambda r: r.utilization),
            "in_flight": ("Attempts in flight (sum over agents)", lambda r: r.stats.in_flight),
            "requests_per_minute": ("Attempts started per minute" + window, lambda r: r.stats.requests_per_minute),
            "cost_per_request": ("USD per successful attempt" + window, lambda r: r.stats.cost_per_request),
        }
        for name, (text, value) in gauges.items():
            gauge = GaugeMetricFamily(f"switchgear_{name}", text, labels=LABELS)
            service_gauge = GaugeMetricFamily(f"switchgear_service_{name}", f"{text}: the service's total",
                                              labels=SERVICE_LABELS)
            for row in rows:
                figure = value(row)
                if figure is None:  # resource_utilization of unknown capacity: no sample, not 0
                    continue
                if row.endpoint:
                    gauge.add_metric([row.service, row.endpoint, row.category], float(figure))
                else:
                    service_gauge.add_metric([row.service, row.category], float(figure))
            yield gauge
            yield service_gauge
        weight = GaugeMetricFamily("switchgear_endpoint_weight", "Weight served to agents", labels=LABELS)
        health = GaugeMetricFamily("switchgear_endpoint_health", "1 for the endpoint's served health state",
                                   labels=(*LABELS, "state"))
        for row in rows:
            if row.endpoint:
                weight.add_metric([row.service, row.endpoint, row.category], float(row.weight))
                for state in STATES:
                    health.add_metric([row.service, row.endpoint, row.category, state], float(row.health == state))
        yield weight
        yield health
        firing = GaugeMetricFamily("switchgear_alert_firing", "1 while an alert rule fires for a service",
                                   labels=("rule", "service", "severity", "action"))
        for alert in self._monitor.evaluator.firing():
            firing.add_metric([alert.rule.name, alert.service, alert.rule.severity, alert.rule.action], 1.0)
        yield firing
        no_data = GaugeMetricFamily("switchgear_alert_no_data",
                                    "1 while a firing alert's window holds no data (it keeps firing)",
                                    labels=("rule", "service", "severity", "action"))
        for alert in self._monitor.evaluator.firing():
            if alert.no_data_since is not None:
                no_data.add_metric([alert.rule.name, alert.service, alert.rule.severity, alert.rule.action], 1.0)
        yield no_data
        yield GaugeMetricFamily("switchgear_snapshot_seq", "Counter part of the served snapshot version",
                                value=self._seq())
        yield GaugeMetricFamily("switchgear_agents_connected", "Agents with an open snapshot stream",
                                value=self._agents())
        yield CounterMetricFamily("switchgear_load_reports", "Load reports received", value=self._reports())
        purged = CounterMetricFamily(
            "switchgear_tasks_purged",
            "Rows the task retention purge deleted in this process (kind: tasks, attempts, blobs, blob_bytes)",
            labels=("kind",))
        for kind, count in self._purged().items():
            purged.add_metric([kind], float(count))
        yield purged
        epoch = self._leader()
        yield GaugeMetricFamily("switchgear_controlplane_leader",
                                "1 while this replica leads (health scoring, alerts, task dispatch)",
                                value=int(epoch > 0))
        yield GaugeMetricFamily("switchgear_controlplane_leader_epoch",
                                "The election epoch this replica leads in (0 when it does not)", value=epoch)


def serve_metrics(collector: PromCollector, listen: str) -> tuple[Any, str]:
    """Serve /metrics on `listen` ("host:port", port 0 picks one) in a daemon thread.

    Returns (server, bound address); call `server.shutdown()` to stop it.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return metrics_http.serve(registry, listen)
