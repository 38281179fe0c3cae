"""Circuit breaker: tables with an explicit clock, and a Hypothesis state machine."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.resilience.breaker import (
    BreakerBook,
    BreakerSettings,
    CircuitBreaker,
    State,
    Ticket,
    settings_from_threshold,
)

E = ErrorKind
FAST = BreakerSettings(failure_threshold=3, base_open_s=10.0, max_open_s=40.0, min_requests=4,
                       error_rate_threshold=0.5, window_s=10.0, trip_memory_s=100.0)


def run(breaker: CircuitBreaker, events: list[tuple[float, ErrorKind | None]]) -> None:
    for now, error in events:
        ticket = breaker.allow(now)
        assert ticket is not None, f"refused at {now}"
        breaker.record(now, ticket, error)


CONSECUTIVE_ONLY = replace(FAST, min_requests=1000)


@pytest.mark.parametrize(
    ("settings", "events", "state"),
    [
        (CONSECUTIVE_ONLY, [(0, E.RETRYABLE), (1, E.RETRYABLE)], State.CLOSED),
        (CONSECUTIVE_ONLY, [(0, E.RETRYABLE), (1, E.RETRYABLE), (2, E.CONNECT)], State.OPEN),
        (CONSECUTIVE_ONLY, [(0, E.TIMEOUT), (1, None), (2, E.TIMEOUT), (3, E.TIMEOUT)], State.CLOSED),  # reset
        # a caller's own mistake counts nowhere: it neither resets the run (a tenant's malformed
        # requests must not hide a failing endpoint) nor adds to it
        (CONSECUTIVE_ONLY, [(0, E.RETRYABLE), (1, E.CLIENT), (2, E.RETRYABLE), (3, E.RETRYABLE)], State.OPEN),
        (CONSECUTIVE_ONLY, [(0, E.CLIENT), (1, E.CONTEXT_LENGTH), (2, E.RETRYABLE), (3, E.RETRYABLE)], State.CLOSED),
        (FAST, [(0, E.CLIENT)] * 10, State.CLOSED),
        # ...nor dilutes the error rate: 2 failures of 4 real outcomes trip despite 10 bad requests
        (FAST, [(0, E.RETRYABLE), (1, None), (2, None), *[(2.5, E.CLIENT)] * 10, (3, E.RETRYABLE)], State.OPEN),
        # 429, auth and config neither count nor reset the run
        (CONSECUTIVE_ONLY, [(0, E.RETRYABLE), (0.5, E.AUTH), (1, E.RETRYABLE), (2, E.RETRYABLE)], State.OPEN),
        (CONSECUTIVE_ONLY, [(0, E.RETRYABLE), (0.5, E.CONFIG), (1, E.RETRYABLE), (2, E.RETRYABLE)], State.OPEN),
        (FAST, [(0, E.CONTEXT_LENGTH)] * 10, State.CLOSED),
        (FAST, [(0, E.CONFIG)] * 10, State.CLOSED),
        (FAST, [(0, E.AUTH)] * 10, State.CLOSED),
        # error rate: 2 of 4 in the window (>= 50 %, volume 4) trips without 3 in a row
        (FAST, [(0, E.RETRYABLE), (1, None), (2, E.RETRYABLE)], State.CLOSED),  # volume 3 < 4
        (FAST, [(0, E.RETRYABLE), (1, None), (2, None), (3, E.RETRYABLE)], State.OPEN),
        (FAST, [(0, None), (1, None), (2, None), (3, E.RETRYABLE)], State.CLOSED),  # 25 %
        # the same outcomes spread beyond the 10 s window do not
        (FAST, [(0, E.RETRYABLE), (6, None), (12, None), (18, E.RETRYABLE)], State.CLOSED),
    ],
)
def test_trip_conditions(settings: BreakerSettings, events: list[tuple[float, ErrorKind | None]],
                         state: State) -> None:
    breaker = CircuitBreaker(settings)
    run(breaker, events)
    assert breaker.state == state


def test_rate_limited_holds_without_tripping() -> None:
    breaker = CircuitBreaker(FAST)
    for i in range(10):
        t = breaker.allow(float(i * 10))
        assert t is not None
        breaker.record(float(i * 10), t, E.RATE_LIMITED, retry_after_s=2.0)
    assert breaker.state_at(90) is State.CLOSED and breaker.trips == 0
    assert breaker.allow(91.0) is None  # held for Retry-After
    assert breaker.hold_s(91.0) == pytest.approx(1.0)
    assert breaker.allow(92.0) is not None


@pytest.mark.parametrize(("retry_after", "free_at"), [(None, 1.0), (0.0, 0.0), (500.0, 60.0)])
def test_throttle_default_and_cap(retry_after: float | None, free_at: float) -> None:
    breaker = CircuitBreaker(FAST)
    t = breaker.allow(0.0)
    assert t is not None
    breaker.record(0.0, t, E.RATE_LIMITED, retry_after)
    assert breaker.retry_at(0.0) == pytest.approx(free_at)


def trip(breaker: CircuitBreaker, now: float) -> None:
    for _ in range(breaker.settings.failure_threshold):
        t = breaker.allow(now)
        assert t is not None
        breaker.record(now, t, E.RETRYABLE)


def test_open_then_half_open_then_closed() -> None:
    breaker = CircuitBreaker(FAST)
    trip(breaker, 0.0)
    assert breaker.allow(9.9) is None and breaker.state_at(9.9) is State.OPEN
    probe = breaker.allow(10.0)
    assert probe == Ticket(probe=True, episode=1) and breaker.state is State.HALF_OPEN
    assert breaker.allow(10.0) is None  # one probe at a time
    breaker.record(10.5, probe, None)
    assert breaker.state_at(10.5) is State.CLOSED and breaker.allow(10.5) == Ticket(probe=False, episode=1)


@pytest.mark.parametrize(
    ("failed_probes", "open_s"),
    [(0, 10.0), (1, 20.0), (2, 40.0), (3, 40.0)],  # base 10 s, doubling, capped at 40 s
)
def test_open_time_grows_on_failed_probes(failed_probes: int, open_s: float) -> None:
    breaker = CircuitBreaker(FAST)
    trip(breaker, 0.0)
    now = 0.0
    for _ in range(failed_probes):
        now = breaker.retry_at(now)
        probe = breaker.allow(now)
        assert probe is not None and probe.probe
        breaker.record(now, probe, E.TIMEOUT)
    assert breaker.retry_at(now) - now == pytest.approx(open_s)
    assert breaker.trips == 1 + failed_probes


@pytest.mark.parametrize(("retrip_after_close_s", "open_s"), [(50.0, 20.0), (150.0, 10.0)])
def test_flapping_keeps_the_longer_open_time(retrip_after_close_s: float, open_s: float) -> None:
    breaker = CircuitBreaker(FAST)
    trip(breaker, 0.0)
    probe = breaker.allow(10.0)
    assert probe is not None
    breaker.record(10.0, probe, None)
    now = 10.0 + retrip_after_close_s
    trip(breaker, now)
    assert breaker.retry_at(now) - now == pytest.approx(open_s)


def test_release_and_stale_tickets() -> None:
    breaker = CircuitBreaker(FAST)
    old = breaker.allow(0.0)  # admitted while closed, finishes after the trip
    assert old is not None
    trip(breaker, 0.0)
    probe = breaker.allow(10.0)
    assert probe is not None
    breaker.record(10.0, old, None)  # a late success proves nothing about the endpoint now
    assert breaker.state is State.HALF_OPEN
    breaker.release(probe)  # the probe never reached the endpoint
    again = breaker.allow(10.0)
    assert again is not None and again.probe


def test_several_probes_and_success_threshold() -> None:
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=1, half_open_max_probes=2, success_threshold=2))
    trip(breaker, 0.0)
    a, b = breaker.allow(5.0), breaker.allow(5.0)
    assert a and b and breaker.allow(5.0) is None
    breaker.record(5.1, a, None)
    assert breaker.state is State.HALF_OPEN
    breaker.record(5.2, b, None)
    assert breaker.state_at(5.2) is State.CLOSED


def test_late_successes_of_calls_sent_before_the_failures_do_not_hold_the_breaker_closed() -> None:
    """An endpoint that fails every new call while calls it accepted earlier still finish
    (503 on every new request; long answers in flight): those successes were sent before the
    failures, so they do not reset the consecutive count. A success sent after them does."""
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=5, min_requests=1000))
    old = [breaker.allow(0.0) for _ in range(5)]  # long calls accepted before the fault
    for i, ticket in enumerate(old):
        new = breaker.allow(1.0 + i)
        assert new is not None and ticket is not None
        breaker.record(1.0 + i + 0.01, new, ErrorKind.RETRYABLE)  # a new call fails at once...
        if breaker.state_at(1.0 + i + 0.02) is State.OPEN:
            break
        breaker.record(1.0 + i + 0.02, ticket, None)  # ...while an old one finishes fine
    assert breaker.state_at(5.5) is State.OPEN and breaker.trips == 1
    fresh = CircuitBreaker(BreakerSettings(failure_threshold=3, min_requests=1000))
    for t in (1.0, 2.0):
        ticket = fresh.allow(t)
        assert ticket is not None
        fresh.record(t, ticket, ErrorKind.RETRYABLE)
    later = fresh.allow(3.0)
    assert later is not None
    fresh.record(3.0, later, None)  # sent after the failures: the endpoint answers again
    ticket = fresh.allow(4.0)
    assert ticket is not None
    fresh.record(4.0, ticket, ErrorKind.RETRYABLE)
    assert fresh.state_at(4.0) is State.CLOSED  # the count restarted at the fresh success


def test_book_blocked_usable_and_trip_hook() -> None:
    trips: list[tuple[str, str]] = []
    book = BreakerBook(settings_from_threshold(2, FAST), on_trip=lambda s, e, now: trips.append((s, e)))
    assert book.settings.failure_threshold == 2
    assert settings_from_threshold(0).failure_threshold == 5
    for _ in range(2):
        b = book.get("llm", "a")
        t = b.allow(0.0)
        assert t is not None
        b.record(0.0, t, E.CONNECT)
    t = book.get("llm", "b").allow(0.0)
    assert t is not None
    book.get("llm", "b").record(0.0, t, E.RATE_LIMITED, 3.0)
    assert trips == [("llm", "a")]
    assert book.blocked("llm", ["a", "b", "c"], 1.0) == {"a", "b"}
    assert book.usable("llm", ["a", "b", "c"], 1.0) == {"b": pytest.approx(2.0), "c": 0.0}
    book.retain({("llm", "c")})
    assert book.blocked("llm", ["a"], 1.0) == frozenset()  # forgotten: a fresh breaker


OUTCOMES = st.sampled_from([None, *ErrorKind])


class BreakerMachine(RuleBasedStateMachine):
    """Random traffic against one breaker; checks the transition graph and the probe bound."""

    LEGAL: ClassVar[set[tuple[State, State]]] = {(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN),
             (State.HALF_OPEN, State.OPEN), (State.HALF_OPEN, State.CLOSED)}

    def __init__(self) -> None:
        super().__init__()
        self.transitions: list[tuple[State, State]] = []
        self.settings = BreakerSettings(failure_threshold=2, min_requests=3, base_open_s=1.0, max_open_s=8.0,
                                        half_open_max_probes=2, success_threshold=2, window_s=5.0)
        self.breaker = CircuitBreaker(self.settings, lambda a, b, now: self.transitions.append((a, b)))
        self.now = 0.0
        self.held: list[Ticket] = []

    @rule(dt=st.floats(min_value=0, max_value=5))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.breaker.state_at(self.now)

    @rule()
    def allow(self) -> None:
        ticket = self.breaker.allow(self.now)
        if ticket is not None:
            self.held.append(ticket)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(min_value=0), outcome=OUTCOMES, retry_after=st.none() | st.floats(0, 3))
    def finish(self, index: int, outcome: ErrorKind | None, retry_after: float | None) -> None:
        ticket = self.held.pop(index % len(self.held))
        self.breaker.record(self.now, ticket, outcome, retry_after)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(min_value=0))
    def abandon(self, index: int) -> None:
        self.breaker.release(self.held.pop(index % len(self.held)))

    @invariant()
    def probes_bounded(self) -> None:
        assert 0 <= self.breaker.probes_in_flight <= self.settings.half_open_max_probes
        if self.breaker.state is State.HALF_OPEN:
            live = [t for t in self.held if t.probe and t.episode == self.breaker._episode]
            assert len(live) <= self.settings.half_open_max_probes

    @invariant()
    def only_legal_transitions(self) -> None:
        assert set(self.transitions) <= self.LEGAL
        assert self.breaker.trips == sum(1 for _, b in self.transitions if b is State.OPEN)

    @invariant()
    def open_refuses(self) -> None:
        if self.breaker.state is State.OPEN:
            assert self.breaker.allow(self.now) is None


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = hsettings(max_examples=150, stateful_step_count=60, deadline=None)
