"""Alert rules: the seed's ALERT_RULES, evaluated per service over the collector's window. Pure.

A rule is `<metric> <op> <threshold>` on one of the seed's metrics (collector.SEED_METRICS)
or what its coordinator collects besides them (collector.COLLECTED_METRICS: requests_per_minute,
cost_per_request; its `current_load` is read as resource_utilization), with a severity and an
action. Per (rule, service):
- it *fires* when the condition has held for `for_s` seconds on a window with at least
  `min_requests` attempts;
- it *recovers* when the condition is clear *with hysteresis* — for `>` the value must fall
  below threshold * (1 - hysteresis); for `<` rise above min(threshold * (1 + hysteresis),
  (1 + threshold) / 2) — and has stayed clear for `clear_for_s` seconds.

No data is not healthy (Grafana's "NoData", kept as "keep last state"). A window with fewer
than `min_requests` attempts — or, for a rate or latency metric, none at all, whatever
`min_requests` says — holds no evidence either way (`has_data`):
- a rule that is not firing does not fire on it (an empty window's 0 is not a success rate of
  0), and its `for_s` timer restarts;
- a firing alert keeps firing, with its last value and its action in place, and is marked
  `no_data_since` (one "no_data" event when that begins, an audit row and a log line from the
  monitor); its clear timer restarts, so it recovers only after `clear_for_s` of data that
  says it cleared. A dead service that stops getting traffic therefore keeps its alert.
Counts and gauges (COUNTED_METRICS: request_count, cost_per_hour, ...) are observations at
zero too: a rule on one with `min_requests: 0` is evaluated on an empty window as 0 (say,
`request_count < 1` to alert on a service nobody can reach). An alert of a service that is no
longer registered recovers at once (`registered`): nothing will ever report on it again.

Actions change the policy served in the next snapshot (`policy`), each one undone when its
alert recovers:
- enable_circuit_breaker: the breaker's failure_threshold tightened to `breaker_threshold`
  (fleet-wide: the snapshot has one breaker setting);
- switch_to_faster_service / switch_to_cheaper_service on a route (a service of two or more
  endpoints: its targets): the route's traffic moves to another target. Faster = the target
  with the lowest observed mean latency of successes over the alert window (`latency`);
  when that one holds the rule's condition itself (or none has data) the targets without
  data are preferred — untried, so not known to be slow. Cheaper = the target(s) with the
  lowest price for a call of 1,000 input and 1,000 output tokens (the target's own pricing,
  else the service's). The overlay serves the route with strategy "priority" and the chosen
  targets one priority above the rest (snapshot.ServiceOverride.prefer): every agent sends
  them the traffic, and spills to the others only when they have no healthy capacity or are
  blocked (open breaker). The faster choice holds while the alert fires and none of the
  chosen targets is itself past the threshold (`held`: the served overlay's), so traffic
  does not flap between targets as their latencies move. On a
  single-endpoint service there is no other target: the
  strategy becomes "latency" / "cost_optimized" instead. Cheaper wins over faster when both
  fire (it is the critical one);
- enable_failover: a service with no fallbacks gets every other service of its category as
  fallbacks, highest priority first.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from switchgear.controlplane.collector import ALERT_METRICS
from switchgear.controlplane.model import AlertRuleSpec, MonitoringSettings, Pricing, RegistryState, ServiceSpec
from switchgear.controlplane.snapshot import ServiceOverride

ACTIONS = ("enable_circuit_breaker", "switch_to_faster_service", "switch_to_cheaper_service", "enable_failover")
SEVERITIES = ("info", "warning", "critical")
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")


class RuleError(ValueError):
    """A rule that cannot be used; `path` names the field ("condition", "action", ...)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class AlertRule:
    name: str
    condition: str
    severity: str = "warning"
    action: str = ""
    for_s: float = 0.0
    clear_for_s: float = 30.0
    hysteresis: float = 0.2
    min_requests: int = 10

    @property
    def metric(self) -> str:
        return parse_condition(self.condition)[0]

    @property
    def op(self) -> str:
        return parse_condition(self.condition)[1]

    @property
    def threshold(self) -> float:
        return parse_condition(self.condition)[2]

    def holds(self, value: float) -> bool:
        op, t = self.op, self.threshold
        return {">": value > t, ">=": value >= t, "<": value < t, "<=": value <= t}[op]

    def cleared(self, value: float) -> bool:
        """The condition is off by the hysteresis margin."""
        t, h = self.threshold, self.hysteresis
        if self.op in (">", ">="):
            return value < t * (1.0 - h)
        return value > min(t * (1.0 + h), (1.0 + t) / 2.0) if t <= 1.0 else value > t * (1.0 + h)


#: Metrics that are counts or gauges: an empty window observes them at 0. Every other metric
#: (rates, latencies) is a ratio over samples and has no value without one.
COUNTED_METRICS = frozenset(
    {"request_count", "cost_per_hour", "circuit_breaker_trips", "failover_count", "queue_length",
     "resource_utilization", "requests_per_minute"})
#: The seed's other names for a metric: its coordinator's `current_load` is the utilisation.
METRIC_ALIASES = MappingProxyType({"current_load": "resource_utilization"})
#: Counted metrics that have no value while the capacity they are taken over is unknown.
CAPACITY_METRICS = frozenset({"resource_utilization"})


def has_data(rule: AlertRule, figures: Mapping[str, float], requests: int) -> bool:
    """Whether a window of `requests` attempts with these `figures` is evidence for `rule`,
    either way (see the module docstring)."""
    if rule.metric in COUNTED_METRICS:
        # resource_utilization is figured only where a capacity is known: absent, no data
        return requests >= rule.min_requests and (rule.metric in figures or rule.metric not in CAPACITY_METRICS)
    return rule.metric in figures and requests >= max(1, rule.min_requests)


@functools.lru_cache(maxsize=1024)  # a rule's metric, op and threshold are read per service per tick
def parse_condition(text: str) -> tuple[str, str, float]:
    match = _CONDITION.match(text)
    if match is None:
        raise RuleError("condition", f"{text!r} is not '<metric> <op> <number>' (op: > >= < <=)")
    metric, op, number = match.groups()
    metric = METRIC_ALIASES.get(metric, metric)
    if metric not in ALERT_METRICS:
        raise RuleError("condition", f"unknown metric {metric!r} (known: {', '.join(ALERT_METRICS)})")
    return metric, op, float(number)


def check_rule(rule: AlertRule) -> None:
    parse_condition(rule.condition)
    if rule.severity not in SEVERITIES:
        raise RuleError("severity", f"{rule.severity!r} is not one of {', '.join(SEVERITIES)}")
    if rule.action and rule.action not in ACTIONS:
        raise RuleError("action", f"{rule.action!r} is not one of {', '.join(ACTIONS)}")
    if not 0.0 <= rule.hysteresis < 1.0:
        raise RuleError("hysteresis", "must be in [0, 1)")
    if rule.for_s < 0 or rule.clear_for_s < 0 or rule.min_requests < 0:
        raise RuleError("for", "durations and min_requests must not be negative")


#: The seed's ALERT_RULES, as written there (the defaults live in model.MonitoringSettings).
SEED_RULES: tuple[AlertRule, ...] = tuple(
    AlertRule(**dataclasses.asdict(spec)) for spec in MonitoringSettings().alert_rules
)


def rules_from_settings(specs: Sequence[AlertRuleSpec]) -> tuple[AlertRule, ...]:
    return tuple(AlertRule(**dataclasses.asdict(spec)) for spec in specs)


@dataclass(frozen=True)
class Alert:
    rule: AlertRule
    service: str
    value: float  # the metric when it fired, then its latest value
    fired_at: float  # wall-clock s
    recovered_at: float | None = None
    action_detail: str = ""
    no_data_since: float | None = None  # while firing: since when its window holds no evidence
    fired_version: str = ""
    recovered_version: str = ""


@dataclass(frozen=True)
class Event:
    kind: str  # "fired", "recovered", or "no_data" (a firing alert's window went empty)
    alert: Alert


@dataclass
class _Track:
    true_since: float | None = None
    clear_since: float | None = None
    alert: Alert | None = None


@dataclass
class AlertEvaluator:
    """Fires and recovers alerts; `figures[service][metric]` and `requests[service]` come from
    the collector's window at each call (a service missing from both had no reports). Times are
    the caller's clock (s)."""

    rules: Sequence[AlertRule] = SEED_RULES
    history_limit: int = 100
    _tracks: dict[tuple[str, str], _Track] = field(default_factory=dict)
    _history: list[Alert] = field(default_factory=list)

    def evaluate(
        self, now: float, figures: Mapping[str, Mapping[str, float]], requests: Mapping[str, int],
        registered: Collection[str] | None = None,
    ) -> list[Event]:
        """One evaluation. `registered`: the services that exist (None: any); a firing alert of
        any other service recovers now."""
        events: list[Event] = []
        for rule in self.rules:
            for service in sorted(set(figures) | {s for (r, s) in self._tracks if r == rule.name}):
                if registered is not None and service not in registered:
                    event = self._retire(now, rule, service)
                else:
                    event = self._step(now, rule, service, figures.get(service, {}), requests.get(service, 0))
                if event is not None:
                    events.append(event)
        return events

    def _retire(self, now: float, rule: AlertRule, service: str) -> Event | None:
        track = self._tracks.pop((rule.name, service), None)
        if track is None or track.alert is None:
            return None
        return Event("recovered", self._recover(track.alert, now))

    def _recover(self, alert: Alert, now: float) -> Alert:
        done = _replace(alert, recovered_at=now, no_data_since=None)
        self._history.insert(0, done)
        del self._history[self.history_limit:]
        return done

    def _step(self, now: float, rule: AlertRule, service: str, figures: Mapping[str, float], n: int) -> Event | None:
        track = self._tracks.setdefault((rule.name, service), _Track())
        if not has_data(rule, figures, n):
            return self._no_data(now, track)
        value = figures.get(rule.metric, 0.0)
        if track.alert is None:
            if rule.holds(value):
                track.true_since = now if track.true_since is None else track.true_since
                if now - track.true_since >= rule.for_s:
                    track.alert, track.clear_since = Alert(rule, service, value, now), None
                    return Event("fired", track.alert)
            else:
                track.true_since = None
            return None
        track.alert = _replace(track.alert, value=value, no_data_since=None)
        if rule.cleared(value):
            track.clear_since = now if track.clear_since is None else track.clear_since
            if now - track.clear_since >= rule.clear_for_s:
                done = self._recover(track.alert, now)
                track.alert = track.clear_since = track.true_since = None
                return Event("recovered", done)
        else:
            track.clear_since = None
        return None

    @staticmethod
    def _no_data(now: float, track: _Track) -> Event | None:
        """No evidence either way: nothing fires, a firing alert holds (and says so once)."""
        track.true_since = track.clear_since = None
        if track.alert is None or track.alert.no_data_since is not None:
            return None
        track.alert = _replace(track.alert, no_data_since=now)
        return Event("no_data", track.alert)

    def annotate(self, alert: Alert, **changes: str) -> None:
        """Record the action detail and versions on a firing alert or a recovered one."""
        track = self._tracks.get((alert.rule.name, alert.service))
        if track is not None and track.alert is not None and track.alert.fired_at == alert.fired_at:
            track.alert = _replace(track.alert, **changes)
        same = (alert.rule.name, alert.service, alert.fired_at)
        self._history = [
            _replace(a, **changes) if (a.rule.name, a.service, a.fired_at) == same else a for a in self._history
        ]

    def resume(self, alert: Alert) -> None:
        """Take over an alert another evaluator fired (a new leader, from the audit trail): it
        fires on here without a second "fired" event, and recovers here when it clears."""
        track = self._tracks.setdefault((alert.rule.name, alert.service), _Track())
        if track.alert is None:
            track.alert, track.true_since, track.clear_since = alert, alert.fired_at, None

    def firing(self) -> list[Alert]:
        return sorted((t.alert for t in self._tracks.values() if t.alert is not None),
                      key=lambda a: (a.fired_at, a.rule.name, a.service))

    def recovered(self, limit: int) -> list[Alert]:
        return self._history[:limit]


def _replace(alert: Alert, **changes: object) -> Alert:
    return dataclasses.replace(alert, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Policy:
    """What firing alerts change in the served snapshot, and why (one line per alert)."""

    services: tuple[tuple[str, ServiceOverride], ...] = ()
    breaker_failure_threshold: int = 0
    details: tuple[tuple[tuple[str, str], str], ...] = ()  # ((rule, service), detail)

    def detail(self, rule: str, service: str) -> str:
        return dict(self.details).get((rule, service), "")


#: Observed mean latency (s) of one endpoint's successes over the alert window; None: no data.
LatencyFn = Callable[[str, str], "float | None"]


def _no_latency(service: str, endpoint: str) -> float | None:
    return None


def typical_price(p: Pricing) -> float:
    """USD for a call of 1,000 input and 1,000 output tokens (how targets are compared)."""
    in_price = p.input_cost_per_1k_tokens or p.cost_per_1k_tokens
    out_price = p.output_cost_per_1k_tokens or p.cost_per_1k_tokens
    return p.cost_per_request + in_price + out_price


def switch_targets(action: str, spec: ServiceSpec, rule: AlertRule, latency: LatencyFn) -> tuple[tuple[str, ...], str]:
    """The targets a switch action moves `spec`'s traffic to, and why (module docstring)."""
    ids = [e.id for e in spec.endpoints]
    if action == "switch_to_cheaper_service":
        prices = {e.id: typical_price(e.pricing or spec.pricing) for e in spec.endpoints}
        low = min(prices.values())
        chosen = tuple(i for i in ids if prices[i] <= low * (1 + 1e-9) + 1e-12)
        return chosen, f"cheapest at {low:.6g} USD per 1k+1k tokens"
    seen = {i: v for i in ids if (v := latency(spec.name, i)) is not None}
    if seen:
        best = min(seen, key=lambda i: (seen[i], i))
        slow = rule.metric == "avg_response_time" and rule.holds(seen[best] * 1000.0)
        if not slow:
            return (best,), f"fastest observed at {seen[best] * 1000.0:.0f} ms"
    untried = tuple(i for i in ids if i not in seen)
    if untried:
        return untried, "no observed target is fast enough; targets without data" if seen else "no data yet"
    return (), "every target is as slow"


def _still_fast(held: tuple[str, ...], spec: ServiceSpec, rule: AlertRule, latency: LatencyFn) -> bool:
    """Whether the targets the route was switched to are still targets, and none of them is
    now observed past the rule's threshold itself (then the choice is made again)."""
    if not held or not set(held) <= {e.id for e in spec.endpoints}:
        return False
    if rule.metric != "avg_response_time":
        return True
    return not any((v := latency(spec.name, i)) is not None and rule.holds(v * 1000.0) for i in held)


def policy(firing: Sequence[Alert], state: RegistryState, *, breaker_threshold: int = 2,
           latency: LatencyFn = _no_latency, held: Mapping[str, tuple[str, ...]] | None = None) -> Policy:
    """The policy adjustments for the firing alerts, over the registry `state`; `latency` is
    the observed latency of each target, for switch_to_faster_service; `held`: the targets
    each route's traffic was switched to in the served overlay (kept while still targets)."""
    strategies: dict[str, str] = {}
    prefer: dict[str, tuple[str, ...]] = {}
    fallbacks: dict[str, tuple[str, ...]] = {}
    details: dict[tuple[str, str], str] = {}
    breaker = 0
    configured = state.settings.circuit_breaker.failure_threshold
    for alert in sorted(firing, key=lambda a: SEVERITIES.index(a.rule.severity)):
        spec = state.service(alert.service)
        key = (alert.rule.name, alert.service)
        if spec is None:
            continue
        action = alert.rule.action
        if action == "enable_circuit_breaker":
            breaker = min(configured, breaker_threshold)
            details[key] = f"circuit_breaker.failure_threshold {configured} -> {breaker}"
        elif action in ("switch_to_faster_service", "switch_to_cheaper_service") and len(spec.endpoints) > 1:
            before = (held or {}).get(alert.service, ())
            if action == "switch_to_faster_service" and _still_fast(before, spec, alert.rule, latency) \
                    and alert.service not in prefer:
                chosen, why = before, "held while the alert fires"
            else:
                chosen, why = switch_targets(action, spec, alert.rule, latency)
            if not chosen:
                details[key] = f"services[{alert.service}]: no target to switch to ({why})"
                continue
            strategies[alert.service] = "priority"  # critical rules come last and win
            prefer[alert.service] = chosen
            details[key] = (f"services[{alert.service}] traffic -> {list(chosen)} ({why}); strategy "
                            f"{spec.strategy or '(policy default)'} -> priority")
        elif action in ("switch_to_faster_service", "switch_to_cheaper_service"):
            wanted = "latency" if action == "switch_to_faster_service" else "cost_optimized"
            strategies[alert.service] = wanted  # critical rules come last and win
            prefer.pop(alert.service, None)
            details[key] = f"services[{alert.service}].strategy {spec.strategy or '(policy default)'} -> {wanted}"
        elif action == "enable_failover":
            if spec.fallbacks:
                details[key] = f"services[{alert.service}].fallbacks already {list(spec.fallbacks)}"
                continue
            others = sorted(
                (s for s in state.services if s.category == spec.category and s.name != spec.name),
                key=lambda s: (-s.priority, s.name),
            )
            fallbacks[alert.service] = tuple(s.name for s in others)
            details[key] = (f"services[{alert.service}].fallbacks [] -> {list(fallbacks[alert.service])}"
                            if others else f"no other {spec.category.value} service to fail over to")
    names = sorted(set(strategies) | set(fallbacks))
    return Policy(
        services=tuple((n, ServiceOverride(strategies.get(n, ""), fallbacks.get(n), prefer.get(n, ())))
                       for n in names),
        breaker_failure_threshold=breaker if breaker and breaker != configured else 0,
        details=tuple(sorted(details.items())),
    )
