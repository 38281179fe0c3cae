"""Per-endpoint circuit breaker: closed -> open -> half-open -> closed. Pure; time is a parameter.

State machine (every transition goes through `_to`, which calls `on_transition`):

    CLOSED    --trip-->            OPEN        trip = `failure_threshold` consecutive FAILUREs, or
                                               error rate >= `error_rate_threshold` over the last
                                               `window_s` with at least `min_requests` outcomes
    OPEN      --open time passed-> HALF_OPEN   (lazily, on the next look at the state)
    HALF_OPEN --probe FAILURE-->   OPEN        with a longer open time (level + 1)
    HALF_OPEN --`success_threshold` probe SUCCESSes--> CLOSED

There is no CLOSED -> HALF_OPEN edge: half-open is reachable only from open.

Open time (s) after the k-th consecutive trip (k = `level`, 1-based):

    open_s(k) = min(max_open_s, base_open_s * multiplier ** (k - 1))

`level` grows on a failed probe and on a trip within `trip_memory_s` of the last close (a
flapping endpoint), and falls back to 1 for a trip after a long healthy spell.

Half-open admits at most `half_open_max_probes` concurrent probes; `allow` hands out a
`Ticket` and the caller must give it back through `record` (or `release` when the attempt
ended without an outcome, e.g. it was shed or cancelled). Only probe tickets of the current
half-open episode move a half-open breaker; late outcomes of calls admitted while closed do
not close it (they prove nothing about the endpoint *now*).

Likewise, a success is evidence as of when its attempt was *sent* (`Ticket.sent_at`): it
resets the consecutive-failure count only if no failed attempt was sent after it. So when an
endpoint starts failing every new call while calls it accepted earlier still finish (a 503 on
every new request; a long LLM answer takes seconds), those late successes do not keep its
breaker from tripping.

RATE_LIMITED (THROTTLED, see `signals`) never trips: it holds the endpoint out of `allow`
until the provider's Retry-After (or `throttle_default_s`, capped at `throttle_max_s`) has
passed, in any state. Any other failure that carries a Retry-After (a 503 saying when to come
back) holds the endpoint the same way, on top of counting as a failure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.resilience.signals import Signal, signal_of
from switchgear.wire.lean import lean


class State(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSettings:
    """Seconds for times; rates in [0, 1]. Defaults suit a handful of calls per second."""

    failure_threshold: int = 5  # consecutive failures; config circuit_breaker.failure_threshold
    error_rate_threshold: float = 0.5
    window_s: float = 30.0
    min_requests: int = 20  # outcomes in the window before the rate may trip
    buckets: int = 10  # the window is kept as this many time buckets
    base_open_s: float = 5.0
    multiplier: float = 2.0
    max_open_s: float = 300.0
    trip_memory_s: float = 60.0
    half_open_max_probes: int = 1
    success_threshold: int = 1  # probe successes that close it
    throttle_default_s: float = 1.0  # a 429 without Retry-After
    throttle_max_s: float = 60.0

    def open_s(self, level: int) -> float:
        """min(max_open_s, base_open_s * multiplier ** (level - 1)), level >= 1."""
        return min(self.max_open_s, self.base_open_s * self.multiplier ** max(0, level - 1))


@lean
@dataclass(frozen=True)
class Ticket:
    """Permission for one attempt. `probe` is True for a half-open probe; `episode` ties it
    to the half-open episode that issued it."""

    probe: bool
    episode: int
    sent_at: float = field(default=float("-inf"), compare=False)


Transition = Callable[[State, State, float], None]


class _Window:
    """Success/failure counts over the last `window_s`, in `buckets` time buckets.

    rate = failures / (successes + failures) over buckets whose start > now - window_s.
    """

    def __init__(self, window_s: float, buckets: int) -> None:
        self._width = window_s / max(1, buckets)
        self._window_s = window_s
        self._buckets: deque[list[float]] = deque()  # [start, successes, failures]

    def add(self, now: float, failed: bool) -> None:
        start = now - (now % self._width)
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append([start, 0.0, 0.0])
        self._buckets[-1][2 if failed else 1] += 1
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + self._width <= now - self._window_s:
            self._buckets.popleft()

    def counts(self, now: float) -> tuple[int, int]:
        """(total, failures) within the window."""
        self._prune(now)
        ok = sum(b[1] for b in self._buckets)
        bad = sum(b[2] for b in self._buckets)
        return int(ok + bad), int(bad)

    def clear(self) -> None:
        self._buckets.clear()


class CircuitBreaker:
    """One endpoint's breaker. Not thread-safe (event-loop use). See the module docstring."""

    def __init__(self, settings: BreakerSettings = BreakerSettings(), on_transition: Transition | None = None) -> None:
        self.settings = settings
        self._on_transition = on_transition
        self._state = State.CLOSED
        self._window = _Window(settings.window_s, settings.buckets)
        self._consecutive = 0
        self._failure_sent_at = float("-inf")  # the latest sent_at of a failed attempt
        self._level = 0
        self._open_until = 0.0
        self._closed_at = float("-inf")
        self._episode = 0
        self._probes = 0  # probes in flight in this half-open episode
        self._probe_successes = 0
        self._throttled_until = float("-inf")
        self.trips = 0

    # --- reading -------------------------------------------------------------------------

    def state_at(self, now: float) -> State:
        """The state at `now`; an elapsed open time becomes HALF_OPEN here."""
        if self._state is State.OPEN and now >= self._open_until:
            self._episode += 1
            self._probes = 0
            self._probe_successes = 0
            self._to(State.HALF_OPEN, now)
        return self._state

    @property
    def state(self) -> State:
        """The state as of the last call that took a time; prefer `state_at(now)`."""
        return self._state

    @property
    def probes_in_flight(self) -> int:
        return self._probes if self._state is State.HALF_OPEN else 0

    def retry_at(self, now: float) -> float:
        """When `allow` may next say yes (now if it would now); a hint for Retry-After."""
        state = self.state_at(now)
        at = self._open_until if state is State.OPEN else now
        return max(at, self._throttled_until, now)

    def would_allow(self, now: float) -> bool:
        """Whether `allow(now)` would hand out a ticket. No side effects besides the lazy
        OPEN -> HALF_OPEN step. Use it to build the scheduler's `blocked` set."""
        if now < self._throttled_until:
            return False
        state = self.state_at(now)
        if state is State.OPEN:
            return False
        return state is State.CLOSED or self._probes < self.settings.half_open_max_probes

    def hold_s(self, now: float) -> float | None:
        """Seconds until this endpoint may be called when only a Retry-After holds it (0 =
        now); None when the breaker itself refuses (open, or half-open with every probe out).
        """
        state = self.state_at(now)
        if state is State.OPEN or (state is State.HALF_OPEN and self._probes >= self.settings.half_open_max_probes):
            return None
        return max(0.0, self._throttled_until - now)

    # --- acting --------------------------------------------------------------------------

    def allow(self, now: float) -> Ticket | None:
        """A ticket for one attempt, or None when the endpoint must not be called now."""
        return self.take(now) if self.would_allow(now) else None

    def take(self, now: float) -> Ticket:
        """The ticket for an attempt that availability was already decided for: the request
        path asks once, in the router's pick (`Gate.unavailable`), and then takes its ticket
        here without asking again. A half-open breaker counts the probe."""
        if self.state_at(now) is State.HALF_OPEN:
            self._probes += 1
            return Ticket(probe=True, episode=self._episode, sent_at=now)
        return Ticket(probe=False, episode=self._episode, sent_at=now)

    def release(self, ticket: Ticket) -> None:
        """Give a ticket back without an outcome (the attempt never reached the endpoint)."""
        if self._is_live_probe(ticket):
            self._probes -= 1

    def record(self, now: float, ticket: Ticket, error: ErrorKind | None, retry_after_s: float | None = None) -> None:
        """Record an attempt's outcome; `error` is None for a success."""
        signal = signal_of(error)
        if signal is Signal.THROTTLED or (error is not None and retry_after_s is not None):
            self._throttle(now, retry_after_s)
        state = self.state_at(now)
        if state is State.HALF_OPEN:
            self._record_probe(now, ticket, signal)
        elif state is State.CLOSED and signal in (Signal.SUCCESS, Signal.FAILURE):
            self._record_closed(now, signal is Signal.FAILURE, ticket.sent_at)

    def _throttle(self, now: float, retry_after_s: float | None) -> None:
        hold = self.settings.throttle_default_s if retry_after_s is None else max(0.0, retry_after_s)
        self._throttled_until = max(self._throttled_until, now + min(hold, self.settings.throttle_max_s))

    def _record_probe(self, now: float, ticket: Ticket, signal: Signal) -> None:
        if not self._is_live_probe(ticket):
            return
        self._probes -= 1
        if signal is Signal.FAILURE:
            self._trip(now, self._level + 1)
        elif signal is Signal.SUCCESS:
            self._probe_successes += 1
            if self._probe_successes >= self.settings.success_threshold:
                self._close(now)

    def _record_closed(self, now: float, failed: bool, sent_at: float) -> None:
        self._window.add(now, failed)
        if failed:
            self._consecutive += 1
            self._failure_sent_at = max(self._failure_sent_at, sent_at)
        elif sent_at >= self._failure_sent_at:  # older than a failure: says nothing about now
            self._consecutive = 0
        if failed and (self._consecutive >= self.settings.failure_threshold or self._rate_exceeded(now)):
            recent = now - self._closed_at < self.settings.trip_memory_s
            self._trip(now, self._level + 1 if recent else 1)

    def _rate_exceeded(self, now: float) -> bool:
        total, failures = self._window.counts(now)
        return total >= self.settings.min_requests and failures >= self.settings.error_rate_threshold * total

    def _is_live_probe(self, ticket: Ticket) -> bool:
        return ticket.probe and self._state is State.HALF_OPEN and ticket.episode == self._episode and self._probes > 0

    def _trip(self, now: float, level: int) -> None:
        self._level = level
        self._open_until = now + self.settings.open_s(level)
        self._consecutive = 0
        self._failure_sent_at = float("-inf")
        self._window.clear()
        self.trips += 1
        self._to(State.OPEN, now)

    def _close(self, now: float) -> None:
        self._closed_at = now
        self._consecutive = 0
        self._failure_sent_at = float("-inf")
        self._window.clear()
        self._to(State.CLOSED, now)

    def _to(self, state: State, now: float) -> None:
        before, self._state = self._state, state
        if self._on_transition is not None:
            self._on_transition(before, state, now)


class BreakerBook:
    """The agent's breakers, one per (service, endpoint id), created on first use.

    Endpoint ids are unique within a service, so the pair survives snapshot swaps; `retain`
    drops breakers of endpoints that left the snapshot. `on_trip(service, endpoint, now)` is
    called on every transition into OPEN (for `ResilienceStats`).
    """

    def __init__(
        self,
        settings: BreakerSettings = BreakerSettings(),
        on_trip: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_trip = on_trip
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}

    def get(self, service: str, endpoint: str) -> CircuitBreaker:
        key = (service, endpoint)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = CircuitBreaker(self.settings, self._hook(service, endpoint))
        return breaker

    def _hook(self, service: str, endpoint: str) -> Transition | None:
        on_trip = self._on_trip
        if on_trip is None:
            return None

        def transition(_before: State, after: State, now: float) -> None:
            if after is State.OPEN:
                on_trip(service, endpoint, now)

        return transition

    def blocked(self, service: str, endpoint_ids: Iterable[str], now: float) -> frozenset[str]:
        """The endpoints of `service` whose breaker would refuse an attempt at `now`."""
        return frozenset(e for e in endpoint_ids if not self.get(service, e).would_allow(now))

    def usable(self, service: str, endpoint_ids: Iterable[str], now: float) -> dict[str, float]:
        """{endpoint: hold_s} for the endpoints whose breaker does not refuse (see
        `CircuitBreaker.hold_s`); the input to `retry.RetryState.usable`."""
        holds = {e: self.get(service, e).hold_s(now) for e in endpoint_ids}
        return {e: h for e, h in holds.items() if h is not None}

    def retain(self, keys: set[tuple[str, str]]) -> None:
        """Forget breakers whose (service, endpoint) is no longer in the snapshot."""
        for key in [k for k in self._breakers if k not in keys]:
            del self._breakers[key]

    def reconfigure(self, settings: BreakerSettings) -> None:
        """Apply new settings to every breaker, keeping its state. Thresholds and times take
        effect at the next decision; a live breaker keeps its window's bucket geometry."""
        self.settings = settings
        for breaker in self._breakers.values():
            breaker.settings = settings


def settings_from_threshold(failure_threshold: int, base: BreakerSettings = BreakerSettings()) -> BreakerSettings:
    """BreakerSettings with the config's `circuit_breaker.failure_threshold` (0 = default)."""
    return replace(base, failure_threshold=failure_threshold or base.failure_threshold)
