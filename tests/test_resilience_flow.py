"""The parts composed the way the package docstring tells invoke.py to compose them.

A pure simulation: a fake clock, scripted upstream outcomes per endpoint, no sockets. It
checks the seams (blocked sets, tickets, budget, decisions, fallback plan, stats), not the
real invoker, which the lead wires up.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from switchgear.adapters.base import ErrorKind, UpstreamError
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.resilience import (
    Action,
    BreakerBook,
    BreakerSettings,
    Failure,
    OutlierDetector,
    OutlierSettings,
    ResilienceStats,
    RetryBudgets,
    RetryState,
    StepKind,
    decide,
    plan,
    policy_for,
    should_fall_back,
)
from switchgear.dataplane.resilience.gate import Gate
from switchgear.dataplane.resilience.observer import OutlierObserver
from switchgear.dataplane.resilience.stats import COUNTER_NAMES
from switchgear.dataplane.snapshot import EndpointView, Pricing, RetrySettings, ServiceView

Outcome = Callable[[float], UpstreamError | None]


def fails(kind: ErrorKind, retry_after: float | None = None) -> Outcome:
    return lambda now: UpstreamError(kind, kind.value, retry_after_s=retry_after)


def ok(now: float) -> None:
    return None


@dataclass
class World:
    services: dict[str, ServiceView]
    upstream: dict[str, Outcome]
    now: float = 0.0
    stats: ResilienceStats = field(default_factory=ResilienceStats)
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.breakers = BreakerBook(BreakerSettings(failure_threshold=3),
                                    on_trip=lambda s, e, now: self.stats.bump(s, e, "trips"))
        self.outliers = OutlierDetector(OutlierSettings(consecutive_5xx=100),
                                        on_eject=lambda s, e, now: self.stats.bump(s, e, "ejections"))
        for name, svc in self.services.items():
            self.outliers.sync(name, [e.id for e in svc.endpoints])
        self.gate = Gate(self.breakers, self.outliers, lambda: self.now)
        self.budgets = RetryBudgets()
        self.rng = random.Random(1)

    def usable(self, name: str) -> dict[str, float]:
        return self.gate.usable(name, [e.id for e in self.services[name].endpoints], self.now)

    def pick(self, name: str, exclude: set[str]) -> str | None:
        """Stand-in for the scheduler: the first endpoint neither excluded nor unavailable."""
        return next((e.id for e in self.services[name].endpoints
                     if f"{name}/{e.id}" not in exclude and not self.gate.unavailable(f"{name}/{e.id}")), None)

    def call_service(self, name: str, deadline: float) -> tuple[str | None, ErrorKind | None]:
        svc = self.services[name]
        ids = {e.id for e in svc.endpoints}
        policy = policy_for(svc.category, RetrySettings())
        budget = self.budgets.get(name)
        budget.record_request(self.now)
        allowed, tried, attempts, prev = set(ids), set[str](), 0, 0.0
        last: ErrorKind | None = None
        while True:
            endpoint = self.pick(name, {f"{name}/{e}" for e in ids - allowed})
            if endpoint is None:
                return None, last
            breaker = self.breakers.get(name, endpoint)
            ticket = breaker.allow(self.now)
            assert ticket is not None, "filtered before picking, so allow cannot refuse"
            error = self.upstream[endpoint](self.now)
            self.log.append(f"{endpoint}:{error.kind.value if error else 'ok'}")
            breaker.record(self.now, ticket, error.kind if error else None, error.retry_after_s if error else None)
            observer = OutlierObserver(self.outliers, lambda: self.now)
            observer.attempt_started(AttemptStart("r", name, svc.category, endpoint, attempts + 1, 5))
            observer.attempt_ended(AttemptEnd("r", name, svc.category, endpoint, attempts + 1, 0.1,
                                              error.kind if error else None))
            if error is None:
                return endpoint, None
            last = error.kind
            attempts += 1
            tried.add(endpoint)
            state = RetryState(attempts, deadline - self.now, self.usable(name), tried,
                               budget.available(self.now), prev)
            d = decide(Failure(endpoint, error.kind, error.retry_after_s), state, policy, self.rng)
            if d.action is Action.GIVE_UP:
                if d.give_up is not None and d.give_up.value == "retry_budget":
                    self.stats.bump(name, endpoint, "budget_denied")
                return None, last
            assert budget.spend(self.now, d.cost)
            self.stats.bump(name, endpoint, "failovers" if d.new_endpoint else "retries")
            self.now += d.delay_s
            prev = d.delay_s or prev
            allowed = set(d.endpoints)

    def invoke(self, name: str, timeout: float = 10.0) -> str:
        deadline = self.now + timeout
        endpoint, error = self.call_service(name, deadline)
        if endpoint is not None:
            return endpoint
        if not should_fall_back(error):
            return f"failed:{error}"
        p = plan(name, self.services, usable=lambda n: bool(self.usable(n)))
        for step in p.fallbacks:
            self.stats.bump(name, "", "fallbacks")
            if step.kind is StepKind.SERVICE:
                endpoint, error = self.call_service(step.service, deadline)
                if endpoint is not None:
                    return endpoint
            else:
                return str(step.kind.value)
        return "unavailable"


def llm(name: str, *endpoint_ids: str, url: str = "https://api.example.com", fallbacks: tuple[str, ...] = (),
        free: bool = False) -> ServiceView:
    return ServiceView(name, "llm", "openai", tuple(EndpointView(e, url) for e in endpoint_ids),
                       pricing=Pricing() if free else Pricing(cost_per_1k_tokens=0.01), fallbacks=fallbacks)


def test_connect_failures_fail_over_for_free_then_the_breaker_blocks_the_endpoint() -> None:
    w = World({"gpt": llm("gpt", "a", "b")}, {"a": fails(ErrorKind.CONNECT), "b": ok})
    results = [w.invoke("gpt") for _ in range(5)]
    assert results == ["b"] * 5
    assert w.log == ["a:connect", "b:ok"] * 3 + ["b:ok"] * 2  # tripped after 3, then filtered out
    assert w.stats.counters("gpt", "a").trips == 1 and w.stats.counters("gpt", "a").failovers == 3
    assert w.budgets.get("gpt").available(w.now) == pytest.approx(30 + 0.2 * 5)  # connect failovers are free


def test_rate_limit_moves_traffic_for_retry_after_without_tripping() -> None:
    w = World({"gpt": llm("gpt", "a", "b")}, {"a": fails(ErrorKind.RATE_LIMITED, 2.0), "b": ok})
    assert w.invoke("gpt") == "b"
    w.now += 1.0
    assert w.invoke("gpt") == "b"
    assert w.log == ["a:rate_limited", "b:ok", "b:ok"]  # a held for 2 s
    w.now += 1.0
    w.invoke("gpt")
    assert w.log[-2:] == ["a:rate_limited", "b:ok"] and w.stats.total("trips") == 0


def test_single_endpoint_retries_after_backoff_and_gives_up_on_attempts() -> None:
    w = World({"gpt": llm("gpt", "a")}, {"a": fails(ErrorKind.RETRYABLE)})
    assert w.invoke("gpt") == "unavailable"
    assert w.log == ["a:retryable"] * 3  # the 3rd failure trips the breaker: no usable endpoint left
    assert 0 < w.now <= 0.2 + 0.4  # two jittered backoffs, llm defaults
    assert w.stats.counters("gpt", "a").retries == 2


def test_fallback_to_the_configured_service_then_a_local_model() -> None:
    services = {
        "gpt": llm("gpt", "a", fallbacks=("claude",)),
        "claude": llm("claude", "c"),
        "llama": llm("llama", "l", url="http://local-llm:8080", free=True),
    }
    w = World(services, {"a": fails(ErrorKind.CONNECT), "c": fails(ErrorKind.TIMEOUT), "l": ok})
    assert w.invoke("gpt") == "l"
    # a is retried after backoff until its breaker trips; a timeout is not retried on the same endpoint
    assert w.log == ["a:connect"] * 3 + ["c:timeout", "l:ok"]
    assert w.stats.counters("gpt").fallbacks == 2


def test_client_errors_do_not_fall_back() -> None:
    w = World({"gpt": llm("gpt", "a", "b")}, {"a": fails(ErrorKind.CLIENT), "b": ok})
    assert w.invoke("gpt") == "failed:ErrorKind.CLIENT"
    assert w.log == ["a:client"]


def test_stats_registry() -> None:
    stats = ResilienceStats()
    for name in COUNTER_NAMES:
        stats.bump("s", "e", name)
    stats.bump("s", "", "fallbacks", 2)
    assert stats.as_dict()[("s", "e")] == dict.fromkeys(COUNTER_NAMES, 1)
    assert stats.total("fallbacks") == 3
    with pytest.raises(KeyError):
        stats.bump("s", "e", "nope")


def test_gate_is_the_schedulers_unavailable_predicate() -> None:
    now = [0.0]
    breakers = BreakerBook(BreakerSettings(failure_threshold=1))
    outliers = OutlierDetector(OutlierSettings(consecutive_5xx=1))
    outliers.sync("svc", ["a", "b", "c", "d"])
    gate = Gate(breakers, outliers, lambda: now[0])
    t = breakers.get("svc", "a").allow(0.0)
    assert t is not None
    breakers.get("svc", "a").record(0.0, t, ErrorKind.RETRYABLE)  # open
    t = breakers.get("svc", "b").allow(0.0)
    assert t is not None
    breakers.get("svc", "b").record(0.0, t, ErrorKind.RATE_LIMITED, 2.0)  # held 2 s
    outliers.record(0.0, "svc", "c", ErrorKind.CONNECT)  # ejected
    assert [k for k in ("svc/a", "svc/b", "svc/c", "svc/d") if gate.unavailable(k)] == ["svc/a", "svc/b", "svc/c"]
    assert gate.usable("svc", ["a", "b", "c", "d"], 1.0) == {"b": pytest.approx(1.0), "d": 0.0}
    now[0] = 2.0
    assert not gate.unavailable("svc/b")
