"""The health feedback loop: collector windows -> health scores + alert rules -> overlay.

Every `tick_s` the monitor scores each endpoint over `monitoring.health_window_s`, evaluates
the alert rules per service over `monitoring.alert_window_s`, and turns both into the
registry's overlay (weights, health states, policy actions). The registry makes a new
snapshot version only when the overlay really changed; health-only changes are published at
most once per `health_debounce_s` (alert firings and recoveries go out at once). Every alert
action and recovery is an audit row; so is every health-driven version (one row, listing the
endpoints whose state or weight bucket changed).

`tick()` is synchronous and takes its times from the injected clocks, so tests drive it
without sockets; `run()` is the loop, and also runs the active probes. In `run()` the
evaluation stays on the event loop (it reads the collector, which load reports change there)
and only its store writes go to the store's thread (`tick_async`), so a slow store delays the
next evaluation, never the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from switchgear.controlplane import alerts as al
from switchgear.controlplane import health as hl
from switchgear.controlplane.collector import ALERT_METRICS, Collector, Key, WindowStats, service_totals
from switchgear.controlplane.model import EndpointSpec, MonitoringSettings, RegistryState, ServiceSpec
from switchgear.controlplane.probes import Prober
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.snapshot import EndpointOverride, Overlay, Snapshot
from switchgear.controlplane.store import AuditEntry, Change

log = logging.getLogger("switchgear.controlplane.monitor")


@dataclass(frozen=True)
class EndpointRow:
    """One row of GetStats: windowed figures plus what the monitor decided."""

    service: str
    endpoint: str  # "" = the service's totals
    category: str
    stats: WindowStats
    health: str
    weight: int
    utilization: float | None  # in flight over `capacity`; None when the capacity is unknown
    capacity: int = 0


@dataclass(frozen=True)
class _Decision:
    """What one evaluation decided to publish (Monitor._decide), for the store to commit."""

    now: float
    events: list[al.Event]
    policy: al.Policy
    overlay: Overlay
    new_overlay: bool  # differs from the overlay served when it was decided
    health_changed: bool
    changes: list[Change]


class Monitor:
    def __init__(
        self,
        registry: Registry,
        collector: Collector,
        *,
        prober: Prober | None = None,
        params: hl.HealthParams | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        overrides: dict[str, float] | None = None,
    ) -> None:
        self._registry = registry
        self._overrides = dict(overrides or {})
        self._collector = collector
        self._prober = prober
        self._clock = clock
        self._wall = wall
        base = params or hl.HealthParams()
        self._scorer = hl.HealthScorer(base)
        self._rules_source: tuple[object, ...] = ()
        self._alerts = al.AlertEvaluator(())
        self._verdicts: dict[tuple[str, str], hl.Verdict] = {}
        self._input_cache: dict[tuple[str, str], tuple[EndpointSpec, hl.EndpointInput]] = {}
        self._published: dict[tuple[str, str], hl.Verdict] = {}
        self._last_health_publish = -math.inf
        self._hold_until = -math.inf
        self.versions_published = 0

    @property
    def settings(self) -> MonitoringSettings:
        """The config's monitoring settings with the process's overrides (flags) over them."""
        configured = self._registry.state.settings.monitoring
        return dataclasses.replace(configured, **self._overrides) if self._overrides else configured  # type: ignore[arg-type]

    @property
    def evaluator(self) -> al.AlertEvaluator:
        return self._alerts

    def _sync_rules(self) -> None:
        specs = self.settings.alert_rules
        if specs != self._rules_source:  # a config change replaced the rules: keep matching tracks
            self._rules_source = specs
            self._alerts.rules = al.rules_from_settings(specs)

    def _inputs(self, state: RegistryState) -> list[hl.EndpointInput]:
        """The scorer's inputs; an endpoint whose spec and probe failures did not change keeps
        last tick's object (the scorer compares a quiet service's inputs by identity first)."""
        failures = self._prober.failures if self._prober else (lambda s, e: 0)
        cache = self._input_cache
        out: list[hl.EndpointInput] = []
        for s in state.services:
            for e in s.endpoints:
                failed = failures(s.name, e.id)
                key = (s.name, e.id)
                kept = cache.get(key)
                if kept is None or kept[0] is not e or kept[1].probe_failures != failed:
                    kept = cache[key] = (e, hl.EndpointInput(s.name, e.id, e.weight, e.max_concurrency, failed))
                out.append(kept[1])
        if len(cache) != len(out):
            self._input_cache = {(i.service, i.endpoint): cache[(i.service, i.endpoint)] for i in out}
        return out

    def _sample(self, now: float, window_s: float) -> hl.SampleFn:
        def sample(service: str, endpoint: str, since: float) -> hl.Sample:
            return hl.Sample(*self._collector.sample((service, endpoint), window_s, now, since))

        return sample

    def _endpoint_overrides(self, state: RegistryState) -> tuple[tuple[str, EndpointOverride], ...]:
        """Overrides only for services the scoring differentiates (or that have a sick endpoint)."""
        top = self._scorer.params.weight_buckets
        out: list[tuple[str, EndpointOverride]] = []
        marked = {key[0] for key, v in self._verdicts.items() if v.bucket != top or v.state != hl.HEALTHY}
        for spec in state.services:
            if spec.name not in marked:
                continue  # every verdict it has is healthy in the top bucket (checked below again)
            verdicts = [self._verdicts.get((spec.name, e.id)) for e in spec.endpoints]
            if all(v is None or (v.state == hl.HEALTHY and v.bucket == top) for v in verdicts):
                continue
            for e, v in zip(spec.endpoints, verdicts, strict=True):
                v = v or hl.Verdict(hl.HEALTHY, e.weight * top, top)
                out.append((f"{spec.name}/{e.id}", EndpointOverride(v.weight, v.state)))
        return tuple(sorted(out))

    def resume_alerts(self, entries: Sequence[AuditEntry]) -> int:
        """Adopt the alerts still firing by the audit trail (newest first, as the store lists
        it): a replica taking the lead carries on the last leader's alerts instead of firing
        them again (a duplicate audit row) or dropping their actions without a recovery row."""
        self._alerts, self._rules_source = al.AlertEvaluator(()), ()  # nothing left from an earlier reign
        self._sync_rules()
        rules = {r.name: r for r in self._alerts.rules}
        decided: set[tuple[str, str]] = set()
        resumed = 0
        for entry in entries:
            kind, _, name = entry.action.partition(":")
            if kind not in ("alert_fired", "alert_recovered") or (name, entry.target) in decided:
                continue
            decided.add((name, entry.target))
            if kind == "alert_fired" and name in rules:
                self._alerts.resume(al.Alert(rules[name], entry.target, 0.0, entry.at,
                                             action_detail=entry.detail, fired_version=entry.version))
                resumed += 1
        return resumed

    def hold(self, seconds: float) -> None:
        """Evaluate nothing for `seconds`: a replica that just took the lead keeps the overlay the
        last leader published until its own windows hold every agent's reports, rather than
        judging the fleet on a second of data (no flapping weights, no alert re-fired)."""
        self._hold_until = self._clock() + seconds

    def tick(self) -> Snapshot | None:
        """One evaluation; returns the new snapshot when one was published. Synchronous, store
        writes included: for tests and start-up; `run` uses `tick_async`."""
        decision = self._decide()
        if decision is None:
            return None
        return self._settle(decision, *self._commit(decision))

    async def tick_async(self) -> Snapshot | None:
        """`tick`, with its store writes on the store's thread: deciding reads the collector,
        which load reports change on the loop, so it stays on the loop; only the commit moves."""
        decision = self._decide()
        if decision is None:
            return None
        published, version = await self._registry.call(lambda: self._commit(decision))
        return self._settle(decision, published, version)

    def _decide(self) -> _Decision | None:
        """Score, evaluate the rules, and say what to publish (None: nothing to do this tick)."""
        now, wall = self._clock(), self._wall()
        if now < self._hold_until:
            return None
        state = self._registry.state
        settings = self.settings
        self._sync_rules()
        self._scorer.params = _with_threshold(self._scorer.params, state.settings.service_discovery.failover_threshold)
        self._verdicts = self._scorer.evaluate(
            now, self._inputs(state), self._sample(now, settings.health_window_s),
            lambda s, e: self._collector.first_data_at((s, e)),
            self._collector.active_services(settings.health_window_s, now).__contains__,
        )
        totals = self._collector.services(settings.alert_window_s, now)
        figures = {name: {m: row.figure(m) for m in _METRICS} for name, row in totals.items()}
        loads = self._collector.capacities(now)
        specs = {spec.name: spec for spec in state.services} if figures else {}  # not state.service: O(n) each
        for name in figures:
            spec = specs.get(name)
            ratio = utilization(self._service_load(spec, loads, now)) if spec else None
            if ratio is not None:  # unknown capacity: no data for the rule, not "0 % busy"
                figures[name]["resource_utilization"] = ratio
        events = self._alerts.evaluate(wall, figures, {n: r.issued for n, r in totals.items()},
                                       registered={s.name for s in state.services})
        current = self._registry.snapshot.overlay
        policy = al.policy(self._alerts.firing(), state, breaker_threshold=settings.breaker_threshold,
                           latency=self._latency(now, settings.alert_window_s),
                           held={n: o.prefer for n, o in current.services if o.prefer})
        overlay = Overlay(self._endpoint_overrides(state), policy.services, policy.breaker_failure_threshold)
        health_changed = overlay.endpoints != current.endpoints
        if not events and not health_changed and overlay == current:
            return None
        if not events and overlay.services == current.services and \
                overlay.breaker_failure_threshold == current.breaker_failure_threshold and \
                now - self._last_health_publish < settings.health_debounce_s:
            return None  # a health-only change inside the debounce: the next tick publishes it
        changes = [self._alert_change(e, policy) for e in events]
        if health_changed:
            changes.append(Change("health-monitor", "health_update", "*", _describe(self._published, self._verdicts)))
        return _Decision(now, events, policy, overlay, overlay != current, health_changed, changes)

    def _commit(self, decision: _Decision) -> tuple[Snapshot | None, str]:
        """The decision's store writes (the registry's, on whichever thread runs them): the new
        overlay as a version, or the audit rows alone; and the version then served."""
        published = self._registry.set_overlay(decision.overlay, decision.changes) if decision.new_overlay else None
        if published is None:
            for change in decision.changes:
                self._registry.record(change)
        return published, self._registry.snapshot.version

    def _settle(self, decision: _Decision, published: Snapshot | None, version: str) -> Snapshot | None:
        if published is not None:
            self.versions_published += 1
            if decision.health_changed:
                self._last_health_publish = decision.now
                self._published = dict(self._verdicts)
        for event in decision.events:
            if event.kind == "no_data":
                log.warning("alert %s for %s: no data in its window; it keeps firing and its action stays (%s)",
                            event.alert.rule.name, event.alert.service, event.alert.rule.action or "no action")
                continue
            field = "fired_version" if event.kind == "fired" else "recovered_version"
            self._alerts.annotate(event.alert, **{field: version, "action_detail": decision.policy.detail(
                event.alert.rule.name, event.alert.service) or event.alert.action_detail})
            log.warning("alert %s %s for %s (%s = %.4g): %s", event.alert.rule.name, event.kind,
                        event.alert.service, event.alert.rule.metric, event.alert.value, event.alert.rule.action)
        return published

    def _alert_change(self, event: al.Event, policy: al.Policy) -> Change:
        a = event.alert
        if event.kind == "fired":
            detail = (f"{a.rule.condition} (value {a.value:.4g}, severity {a.rule.severity}): "
                      f"{a.rule.action or 'no action'}: {policy.detail(a.rule.name, a.service) or 'nothing to change'}")
            return Change("alerts", f"alert_fired:{a.rule.name}", a.service, detail)
        if event.kind == "no_data":
            return Change("alerts", f"alert_no_data:{a.rule.name}", a.service,
                          f"{a.rule.condition}: no data in the window (last value {a.value:.4g}); "
                          f"still firing, {a.rule.action or 'no action'} kept")
        return Change("alerts", f"alert_recovered:{a.rule.name}", a.service,
                      f"{a.rule.condition} cleared (value {a.value:.4g}): {a.rule.action or 'no action'} reverted")

    def _latency(self, now: float, window_s: float) -> al.LatencyFn:
        """Observed mean latency (s) of an endpoint's successes over the window; None: none."""
        def latency(service: str, endpoint: str) -> float | None:
            finished, error_rate, mean_s, _ = self._collector.sample((service, endpoint), window_s, now)
            return mean_s if finished and error_rate < 1.0 else None

        return latency

    def _endpoint_load(self, service: str, endpoint: EndpointSpec, loads: Mapping[Key, tuple[int, int]],
                       now: float) -> tuple[int, int]:
        """(in flight, capacity) of an endpoint: the agents' reported capacities (each its
        max_concurrency, else the one it learned) and their in-flight; with none, the configured
        max_concurrency over every agent's in-flight; (0, 0) when the capacity is unknown."""
        key = (service, endpoint.id)
        in_flight, capacity = loads.get(key, (0, 0))  # Collector.capacities
        if capacity:
            return in_flight, capacity
        if endpoint.max_concurrency:
            return self._collector.in_flight(key, now), endpoint.max_concurrency
        return 0, 0

    def _service_load(self, spec: ServiceSpec, loads: Mapping[Key, tuple[int, int]], now: float) -> tuple[int, int]:
        """(in flight, capacity) summed over the service's endpoints of known capacity."""
        parts = [self._endpoint_load(spec.name, e, loads, now) for e in spec.endpoints]
        return sum(f for f, _ in parts), sum(c for _, c in parts)

    def reporting_agents(self, window_s: float) -> int:
        return self._collector.reporting_agents(window_s, self._clock())

    def agent_loads(self) -> dict[str, tuple[int, int, float]]:
        """Per recently reporting agent: (in flight, queue length, wall-clock time of its last report)."""
        now, wall = self._clock(), self._wall()
        return {agent: (flight, queue, wall - (now - at))
                for agent, (flight, queue, at) in self._collector.agent_loads(now).items()}

    def totals(self) -> dict[tuple[str, str], WindowStats]:
        """Per-endpoint sums since start, plus per-service rows under endpoint "" (counters)."""
        data = self._collector.totals(self._clock())
        per_service = service_totals(data)
        return {**{k: v for k, v in data.items() if k[1]}, **{(n, ""): v for n, v in per_service.items()}}

    def rows(self, window_s: float | None = None, service: str = "") -> list[EndpointRow]:
        """GetStats rows: every registered endpoint (zeros when it has no data), then totals."""
        now = self._clock()
        window = window_s or self.settings.alert_window_s
        state = self._registry.state
        served = self._registry.snapshot.overlay
        data = self._collector.window(window, now)
        loads = self._collector.capacities(now)
        by_service: dict[str, dict[tuple[str, str], WindowStats]] = {}
        for key, st in data.items():
            by_service.setdefault(key[0], {})[key] = st
        rows: list[EndpointRow] = []
        for spec in state.services:
            if service and spec.name != service:
                continue
            for e in spec.endpoints:
                st = data.get((spec.name, e.id), WindowStats(window_s=window, category=spec.category.value))
                override = served.endpoint(spec.name, e.id)
                load = self._endpoint_load(spec.name, e, loads, now)
                rows.append(EndpointRow(spec.name, e.id, spec.category.value, st,
                                        override.health if override else hl.HEALTHY,
                                        override.weight if override else e.weight, utilization(load), load[1]))
            empty = WindowStats(window_s=window, category=spec.category.value)
            total = service_totals(by_service.get(spec.name, {})).get(spec.name, empty)
            load = self._service_load(spec, loads, now)
            rows.append(EndpointRow(spec.name, "", spec.category.value, total, "", 0, utilization(load), load[1]))
        return rows

    async def run(self, stop: asyncio.Event, tick_s: float | None = None) -> None:
        """Tick until `stop`: every `tick_s`, or by default every half report interval (0.1 to
        1 s: data changes no faster; a tick over 10,000 endpoints costs ~10 ms of CPU when they are
        idle, ~0.35 s when all of them have data)."""
        probing: asyncio.Task[int] | None = None
        while not stop.is_set():
            every = tick_s or min(1.0, max(0.1, self.settings.report_interval_s / 2))
            try:
                await self.tick_async()
            except Exception:  # the loop must survive a bad evaluation; the next tick retries
                log.exception("health evaluation failed")
            if self._prober is not None and (probing is None or probing.done()):
                sd = self._registry.state.settings.service_discovery
                timeout = self._registry.state.settings.health_check_timeout_s
                probing = asyncio.ensure_future(
                    self._prober.run_due(self._registry.state.services, sd.health_check_interval_s, timeout))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)
        if probing is not None:
            probing.cancel()


_METRICS = tuple(m for m in ALERT_METRICS if m != "resource_utilization")


def utilization(load: tuple[int, int]) -> float | None:
    """resource_utilization of an (in flight, capacity) pair: in-flight over capacity; None
    when the capacity is unknown (0): no sample, which alert rules treat as no data."""
    in_flight, capacity = load
    return in_flight / capacity if capacity else None


def _with_threshold(params: hl.HealthParams, threshold: int) -> hl.HealthParams:
    if params.failover_threshold == threshold:
        return params
    return dataclasses.replace(params, failover_threshold=threshold)


def _describe(before: dict[tuple[str, str], hl.Verdict], after: dict[tuple[str, str], hl.Verdict]) -> str:
    parts = []
    for key in sorted(after):
        old, new = before.get(key), after[key]
        if old is None or (old.state, old.bucket) != (new.state, new.bucket):
            was = f"{old.state}/{old.weight}" if old else "new"
            why = f" ({new.reason})" if new.reason else ""
            parts.append(f"{key[0]}/{key[1]} {was} -> {new.state}/{new.weight}{why}")
    return "; ".join(parts)[:2000] or "weights re-published"
