"""The per-call attempt controller: the resilience package wired into the request path.

`Resilience` holds the agent-lifetime parts (breakers, outlier ejection, retry budgets,
admission, decision counters) and syncs them with every applied snapshot. `AttemptController`
runs ONE call through them; both `invoke.Invoker` and `stream.Streamer` drive it, so unary and
streamed calls get the same breakers, ejection, budget, admission and fallbacks:

    ctl = resilience.controller(pick, call, service, snapshot, deadline, serves=...)
    won = await ctl.first_answer(try_one)   # the attempt loop, below
    if won is not None:
        attempt, value = won
        await ctl.succeeded(attempt)
        return value
    ctl.terminal  # a PRESET / QUEUE_FOR_LATER step to answer with, or None:
    raise ctl.failure()                       # CallFailed with the last error and the reason

where `first_answer` is the one attempt loop for unary calls and streams:

    while (attempt := await ctl.next()) is not None:    # pick -> breaker ticket -> admission slot
        try:
            return attempt, await try_one(attempt)   # e.g. the adapter call, within attempt.remaining_s
        except UpstreamError as exc:
            await ctl.failed(attempt, exc)    # record; retry decision, budget, backoff (sleeps)
        except BaseException:
            await ctl.abandon(attempt)        # cancelled: ticket and slot back, no outcome
            raise
    return None

A stream's `try_one` reads up to the first token; once that is out the stream must not be
retried: it calls `ctl.finish(attempt, error)` instead of `succeeded`, which records the
outcome and ends the call.

Per service of the chain (the requested one, then each SERVICE step of the fallback plan) the
loop is the package docstring's (resilience/__init__.py): endpoints refused by the gate (open
breaker, ejected, Retry-After hold) are filtered inside the scheduler; the retry decision
narrows the next pick to `decision.endpoints`; the backoff never sleeps past the deadline
(`decide` clamps it); each attempt's timeout (`Attempt.remaining_s`) is its endpoint's adaptive
attempt timeout (resilience/timeouts.py: k x its recent p99, within a floor and a ceiling per
category), never past what is left of the deadline once the admission slot is granted: a hung
endpoint costs a caller that timeout, then the call fails over. A `Shed` from admission ends
the call (it is not retried and not sent to fallbacks: that would defeat shedding).

Hedging (resilience/hedging.py): a call that opts in (`idempotent` and priority at least its
category's `hedge_min_priority`) gets, while its attempt is still outstanding past that
endpoint's p95, a second attempt on another endpoint (one retry-budget unit); `first_answer`
then returns the first answer and cancels the other attempt (its ticket and slot are given
back, its connection closed, nothing recorded against its endpoint; `discard` disposes of a
loser's value that arrived in the same instant).

Fallback, once the requested service has given up with an error that `should_fall_back`:
`resilience.fallback.plan` orders configured fallbacks, then (llm) local models, then a
preset response (service metadata `preset_response`, the exact response body), then (document)
QUEUE_FOR_LATER. The caller answers PRESET / QUEUE_FOR_LATER steps itself (`terminal`).
When the plan has nothing but its UNAVAILABLE terminal, the call fails with the requested
service's own last error (its kind keeps its gRPC/HTTP mapping: 429 stays 429).

Counters of every decision are in `Resilience.stats` (`ResilienceStats`, keyed by
(service, endpoint); "" = the service); `Resilience.counters()` is the documented accessor.
Breaker trips and admission queue lengths (on every grant and release) are also pushed to `sinks` (the agent's
`AgentMetrics` and load-report accumulator: `record_breaker_trip`, `set_queue_length`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from switchgear.adapters.base import ErrorKind, UpstreamError
from switchgear.dataplane.abandon import FirstTokenWaits, quiet
from switchgear.dataplane.convert import Call, route_timeout_s
from switchgear.dataplane.resilience import (
    Action,
    AdmissionCore,
    AdmissionSettings,
    BackoffPolicy,
    BreakerBook,
    BreakerSettings,
    BudgetSettings,
    Failure,
    FallbackSettings,
    GiveUp,
    OutlierDetector,
    OutlierSettings,
    Plan,
    ResilienceStats,
    RetryBudget,
    RetryBudgets,
    RetryState,
    Step,
    StepKind,
    Ticket,
    decide,
    plan,
    policy_for,
    settings_from_threshold,
    should_fall_back,
)
from switchgear.dataplane.resilience.admission import Grant
from switchgear.dataplane.resilience.admission_edge import Admission, Shed
from switchgear.dataplane.resilience.fallback import preset_may_answer
from switchgear.dataplane.resilience.gate import Gate
from switchgear.dataplane.resilience.hedging import HedgeSettings, hedge_delay, hedged, hedging_for, may_hedge
from switchgear.dataplane.resilience.timeouts import AttemptTimeouts, attempt_timeout, gap_timeout, timeouts_for
from switchgear.dataplane.scheduling.model import candidate_key
from switchgear.dataplane.scheduling.stats import EndpointStats, LiveStats
from switchgear.dataplane.snapshot import AgentSnapshot, EndpointView, RetrySettings, ServiceView

#: The agent's endpoint pick: pick(service, exclude=ids, call=call, settings=settings)
#: (dataplane.router.Router.pick). Availability is consulted there, once: the pick must filter
#: with `Resilience.gate.unavailable` (the Router is built with it); the controller then only
#: takes the breaker's ticket for the endpoint it was given.
Pick = Callable[..., EndpointView | None]

T = TypeVar("T")

#: What answered a fallback, as InvokeResponse.fallback_source spells it.
SOURCE_BY_STEP: Mapping[str, str] = {"fallback": "service", "local_model": "local_model",
                                     "preset": "preset_response", "queue_for_later": "task_queue"}

__all__ = ["Attempt", "AttemptController", "CallFailed", "MetricsSink", "Pick", "Resilience",
           "ResilienceSettings", "Shed"]

log = logging.getLogger(__name__)
_RUN_PLANS = 512  # services whose run plan is kept (a larger snapshot: the table starts over)
_DEADLINE_SLACK_S = 0.001  # a timer may fire this much before the deadline it was armed for


def deadline_passed(now: float, deadline: float) -> bool:
    """Whether a time limit that fired at `now` was the call's `deadline` (not an attempt's own)."""
    return now >= deadline - _DEADLINE_SLACK_S


class CallFailed(RuntimeError):
    """Every attempt failed; `error` is the last upstream failure (or a synthesized one when no
    endpoint could be tried), `service` and `endpoint` where it happened ("" when unknown).
    Re-exported by invoke.py, where callers import it from."""

    def __init__(self, error: UpstreamError, attempts: int, service: str = "", endpoint: str = "") -> None:
        super().__init__(error.message)
        self.error = error
        self.attempts = attempts
        self.service = service
        self.endpoint = endpoint


class MetricsSink(Protocol):
    """The metrics hooks the agent's collectors offer (metrics.AgentMetrics, reporter.LoadAccumulator)."""

    def record_breaker_trip(self, service: str, endpoint: str) -> None: ...

    def set_queue_length(self, service: str, length: int) -> None: ...


@dataclass(frozen=True)
class ResilienceSettings:
    """Agent-side tuning. The snapshot overrides the breaker's failure threshold
    (config `circuit_breaker.failure_threshold`); the rest are the package defaults unless the
    agent is started with other values (`switchgear agent --breaker-open --ejection-time`)."""

    breaker: BreakerSettings = BreakerSettings()
    outlier: OutlierSettings = OutlierSettings()
    budget: BudgetSettings = BudgetSettings()
    admission: AdmissionSettings = AdmissionSettings()
    fallback: FallbackSettings = FallbackSettings()


class Resilience:
    """The agent-lifetime resilience state. Build once; call `apply` for every snapshot.
    Not thread-safe: the agent's event loop only."""

    def __init__(
        self,
        settings: ResilienceSettings = ResilienceSettings(),
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sinks: Sequence[MetricsSink] = (),
        stats: LiveStats | None = None,
    ) -> None:
        """`stats`: the router's per-endpoint latencies, which adaptive attempt timeouts and
        hedge delays are derived from (without them every attempt may run to the deadline and
        nothing is hedged)."""
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        self.stats = ResilienceStats()
        self.sinks = list(sinks)
        self.breakers = BreakerBook(settings.breaker, on_trip=self._tripped)
        self.outliers = OutlierDetector(settings.outlier, on_eject=self._ejected, now=clock())
        self.budgets = RetryBudgets(settings.budget)
        self.admission = Admission(AdmissionCore(settings.admission), clock, self.stats)
        self.gate = Gate(self.breakers, self.outliers, clock)
        self.live = stats
        #: attempts waiting on a first token, abandoned when their endpoint is judged silent
        self.waits = FirstTokenWaits(stats.silenced if stats is not None else (), clock)
        if stats is not None:
            stats.on_silence = self.silence_changed
            stats.while_silent = self.still_silent
        self._tuning: dict[str, tuple[AttemptTimeouts, HedgeSettings]] = {}
        # per service name: (its view, the retry settings, its endpoint ids, its backoff policy)
        self._runs: dict[str, tuple[ServiceView, RetrySettings | None, frozenset[str], BackoffPolicy]] = {}

    # --- snapshot sync ------------------------------------------------------------------

    def apply(self, snapshot: AgentSnapshot) -> None:
        """Sync with a newly applied snapshot: endpoints, limits, queue bounds, threshold."""
        pairs: set[tuple[str, str]] = set()
        for name, service in snapshot.services.items():
            ids = [e.id for e in service.endpoints]
            self.outliers.sync(name, ids)
            policy = snapshot.settings.category_policies.get(service.category)
            self.admission.configure(name, policy.max_queue_size if policy else 0,
                                     {e.id: e.max_concurrency for e in service.endpoints})
            pairs.update((name, e) for e in ids)
        self.breakers.retain(pairs)
        self.outliers.forget(snapshot.services)
        self.breakers.reconfigure(settings_from_threshold(snapshot.settings.breaker_failure_threshold,
                                                          self.settings.breaker))
        tuning = {}
        for category, p in snapshot.settings.category_policies.items():
            tuning[category] = (timeouts_for(category, p.attempt_timeout_floor_s, p.attempt_timeout_ceiling_s,
                                             p.attempt_timeout_factor), hedging_for(category, p.hedge_min_priority))
        self._tuning = tuning

    def run_plan(self, service: ServiceView, retry: RetrySettings | None) -> tuple[frozenset[str], BackoffPolicy]:
        """A service's endpoint ids and backoff policy, worked out once per view and retry settings."""
        found = self._runs.get(service.name)
        if found is None or found[0] is not service or found[1] is not retry:
            if len(self._runs) >= _RUN_PLANS:
                self._runs.clear()
            found = (service, retry, frozenset(e.id for e in service.endpoints), policy_for(service.category, retry))
            self._runs[service.name] = found
        return found[2], found[3]

    def tuning(self, category: str) -> tuple[AttemptTimeouts, HedgeSettings]:
        """The category's attempt timeouts and hedging, as the applied snapshot's policy sets them."""
        found = self._tuning.get(category)
        if found is None:
            found = self._tuning[category] = (timeouts_for(category), hedging_for(category))
        return found

    # --- reading (the documented accessor for metrics and tests) ------------------------

    def counters(self) -> dict[tuple[str, str], dict[str, int]]:
        """Every decision counter: {(service, endpoint): {"trips": n, "ejections": n, "probes",
        "throttled", "retries", "failovers", "budget_denied", "fallbacks", "sheds", "queued",
        "attempt_timeouts", "hedges", "hedge_wins", "silences"}};
        endpoint "" holds service-level decisions (fallbacks, queue sheds)."""
        return self.stats.as_dict()

    def controller(self, pick: Pick, call: Call, service: ServiceView, snapshot: AgentSnapshot, deadline: float,
                   *, serves: Callable[[ServiceView], bool] = lambda _s: True, idempotent: bool = False,
                   stream: bool = False) -> AttemptController:
        """`idempotent`: repeating the call is harmless (it may be hedged); `stream`: attempt
        timeouts bound the time to the first token."""
        return AttemptController(self, pick, call, service, snapshot, deadline, serves, idempotent, stream)

    # --- hooks ----------------------------------------------------------------------------

    def _tripped(self, service: str, endpoint: str, _now: float) -> None:
        self.stats.bump(service, endpoint, "trips")
        for sink in self.sinks:
            sink.record_breaker_trip(service, endpoint)

    def _ejected(self, service: str, endpoint: str, _now: float) -> None:
        self.stats.bump(service, endpoint, "ejections")

    def silence_changed(self, key: str, silent: bool) -> None:
        """The routing statistics judged an endpoint silent (its attempts take calls and send no
        first token: filters.not_silent), or no longer: counted, and one line each way."""
        service, _, endpoint = key.partition("/")
        if silent:
            self.stats.bump(service, endpoint, "silences")
            log.warning("service %s endpoint %s: silent (its attempts since its last first token have "
                        "sent none, against its own times to first token); new calls held back, one probe "
                        "a second, the attempts waiting on it fail over", service, endpoint)
        else:
            log.info("service %s endpoint %s: no longer silent", service, endpoint)

    def still_silent(self, key: str) -> None:
        """A pick found `key` silent: the attempts waiting on its first token fail over, once it
        has also completed no answer for QUIET_S (abandon.py: a queue still answers, a hang not)."""
        live = self.live
        if live is not None and self.waits.waiting_on(key):
            stats = live.peek(key)
            if stats is None or quiet(stats.last_sample_at, live.clock()):
                self.waits.abandon(key)

    def queue_changed(self, service: str) -> None:
        if self.sinks:
            length = self.admission.core.queue_length(service)
            for sink in self.sinks:
                sink.set_queue_length(service, length)


@dataclass(eq=False)
class Attempt:
    """One granted attempt: the endpoint to call, how long it may take (`remaining_s`: its
    adaptive attempt timeout or, when sooner, the call's deadline minus now, after admission;
    for a stream, until its first token), its 1-based number within the call, and `source`
    ("" for the requested service, else the fallback source). `capped`: `remaining_s` is the
    attempt timeout, not the deadline (an expiry is then the endpoint's TIMEOUT, and the call
    may go on elsewhere)."""

    service: ServiceView
    endpoint: EndpointView
    number: int
    remaining_s: float
    source: str
    ticket: Ticket
    grant: Grant | None  # the admission slot; None once given back
    capped: bool = False

    @property
    def fallback(self) -> bool:
        return bool(self.source)


@dataclass
class _ServiceRun:
    """One service's share of a call: what the retry decision knows about it."""

    service: ServiceView
    source: str
    policy: BackoffPolicy
    budget: RetryBudget
    ids: frozenset[str]
    allowed: set[str]
    tried: set[str] = field(default_factory=set)
    failures: int = 0
    previous_delay_s: float = 0.0
    last: UpstreamError | None = None
    reason: str = ""
    done: bool = False


class AttemptController:
    """One call's attempts across its service and fallback chain (module docstring)."""

    def __init__(self, resilience: Resilience, pick: Pick, call: Call, service: ServiceView,
                 snapshot: AgentSnapshot, deadline: float, serves: Callable[[ServiceView], bool],
                 idempotent: bool = False, stream: bool = False) -> None:
        self._r = resilience
        self._pick = pick
        self.call = call
        self.snapshot = snapshot
        self.deadline = deadline
        self._serves = serves
        self.attempts = 0
        self.terminal: Step | None = None
        self._first: _ServiceRun = self._start(service, "")
        self._run: _ServiceRun | None = self._first
        self._steps: list[Step] | None = None  # the fallback plan, once the requested service gave up
        self._chain: list[str] = [service.name]
        self._unavailable = ""
        self._last: UpstreamError | None = None  # the latest failure anywhere in the chain
        self._last_at: tuple[str, str] = (service.name, "")  # (service, endpoint) of that failure
        self._ended = False
        self._stream = stream
        self._timeouts, hedging = resilience.tuning(service.category)
        self._hedging = hedging if resilience.live is not None and hedged(hedging, call.priority, idempotent) else None
        self._hedges = 0

    def callers_deadline(self, service: ServiceView) -> bool:
        """Whether the call's deadline is one its caller chose, shorter than `service`'s own."""
        return 0 < self.call.timeout_s < route_timeout_s(service, self.snapshot.settings)

    def callers_timeout(self, service: ServiceView, kind: ErrorKind | None) -> bool:
        """Whether a failure is the caller's own deadline running out (a TIMEOUT once a deadline
        the caller shortened has passed): like a caller that went away, it says nothing about
        the endpoint, so no breaker, ejection, load report or health counts it (a tenant's
        20 ms deadlines against a 100 ms upstream took the route away from every tenant)."""
        return (kind is ErrorKind.TIMEOUT and deadline_passed(self._r.clock(), self.deadline)
                and self.callers_deadline(service))

    # --- the loop -------------------------------------------------------------------------

    async def next(self) -> Attempt | None:
        """The next attempt (ticket and admission slot held), or None when the call is over:
        then answer with `terminal` if set, else raise `failure()`. Raises `Shed`."""
        while self._run is not None and not self._ended:
            attempt = await self._next_in(self._run)
            if attempt is not None:
                return attempt
            self._advance()
        return None

    async def first_answer(self, try_one: Callable[[Attempt], Awaitable[T]],
                           discard: Callable[[T], Awaitable[None]] | None = None) -> tuple[Attempt, T] | None:
        """Run `try_one` on each attempt until one returns: (that attempt, its value), still
        open (end it with `succeeded`, `finish` or `abandon`). An UpstreamError is recorded and
        decided by `failed`; anything else gives the attempt back (`abandon`) and propagates.
        None when the call is over: then answer with `terminal`, or raise `failure()`.
        A hedged call may run two attempts at once (module docstring); `discard` closes the value
        of one that answered in the same instant as the winner."""
        while (attempt := await self.next()) is not None:
            delay = self._hedge_delay(attempt)
            if delay is not None:
                won = await self._race(attempt, delay, try_one, discard)
                if won is not None:
                    return won
                continue
            try:
                return attempt, await try_one(attempt)
            except UpstreamError as exc:
                await self.failed(attempt, exc)
            except BaseException:
                await self.abandon(attempt)
                raise
        return None

    @property
    def gap_timeout_s(self) -> float:
        """Seconds a committed stream may go without a chunk (resilience/timeouts.gap_timeout)."""
        return gap_timeout(self._timeouts, None)

    def stream_gap_s(self, attempt: Attempt) -> float:
        """`gap_timeout_s` for this attempt's endpoint (its peak seconds per token counted)."""
        stats = self._stats_of(attempt.service, attempt.endpoint)
        return gap_timeout(self._timeouts, stats.per_token.value if stats is not None else None)

    def first_token_s(self, attempt: Attempt) -> float:
        """A whole-answer attempt streamed from its upstream (dataplane/assemble.py): how long it
        may wait for its first token — the stream path's attempt timeout, from the endpoint's
        recent times to first token — and never longer than the attempt itself may take."""
        stats = self._stats_of(attempt.service, attempt.endpoint)
        if stats is None:
            return attempt.remaining_s
        limit = attempt_timeout(self._timeouts, stats.recent_ttft.quantile(0.99), stats.recent_ttft.count)
        return min(limit, attempt.remaining_s)

    async def succeeded(self, attempt: Attempt) -> None:
        await self._outcome(attempt, None)
        self._ended = True

    async def finish(self, attempt: Attempt, error: UpstreamError | None) -> None:
        """Record a committed attempt's outcome (a stream after its first token) and end the call."""
        await self._outcome(attempt, error)
        self._ended = True

    async def abandon(self, attempt: Attempt) -> None:
        """The attempt ended without an outcome (cancelled): give its ticket and slot back."""
        self._r.breakers.get(attempt.service.name, attempt.endpoint.id).release(attempt.ticket)
        await self._release(attempt)
        self._ended = True

    async def failed(self, attempt: Attempt, error: UpstreamError) -> None:
        """Record the failure and decide: another endpoint or the same after a backoff (slept
        here, never past the deadline), or give this service up (`next` then walks the
        fallback plan)."""
        run = await self._note_failure(attempt, error)
        r, name, endpoint = self._r, attempt.service.name, attempt.endpoint.id
        now = r.clock()
        state = RetryState(run.failures, self.deadline - now, r.gate.usable(name, run.ids, now), run.tried,
                           run.budget.available(now), run.previous_delay_s)
        d = decide(Failure(endpoint, error.kind, error.retry_after_s), state, run.policy, r.rng)
        if d.action is Action.GIVE_UP:
            if d.give_up is GiveUp.BUDGET:
                r.stats.bump(name, endpoint, "budget_denied")
            run.done, run.reason = True, d.reason
            return
        run.budget.spend(now, d.cost)
        r.stats.bump(name, endpoint, "failovers" if d.new_endpoint else "retries")
        if d.delay_s > 0:
            await asyncio.sleep(d.delay_s)
            run.previous_delay_s = d.delay_s
        run.allowed = set(d.endpoints)

    async def _note_failure(self, attempt: Attempt, error: UpstreamError) -> _ServiceRun:
        """Record a failed attempt against its endpoint and the call, without deciding."""
        await self._outcome(attempt, error)
        run = self._run
        assert run is not None and run.service is attempt.service
        name, endpoint = attempt.service.name, attempt.endpoint.id
        if attempt.capped and error.kind is ErrorKind.TIMEOUT:
            self._r.stats.bump(name, endpoint, "attempt_timeouts")
        run.last = self._last = error
        self._last_at = (name, endpoint)
        run.failures += 1
        run.tried.add(endpoint)
        return run

    # --- hedging ----------------------------------------------------------------------------

    def _hedge_delay(self, attempt: Attempt) -> float | None:
        """Seconds after which `attempt` gets a hedge, or None (not hedged)."""
        if self._hedging is None or self._hedges >= self._hedging.max_hedges or len(attempt.service.endpoints) < 2:
            return None
        stats = self._stats_of(attempt.service, attempt.endpoint)
        if stats is None:
            return None
        recent = stats.recent_ttft if self._stream else stats.recent
        delay = hedge_delay(self._hedging, recent.quantile(0.95), recent.count)
        if stats.slow:  # a probe of an endpoint far slower than its peers: hedge at theirs
            delay = min(delay or attempt.remaining_s, self._peers_p95(attempt) or attempt.remaining_s)
        return delay if delay is not None and delay < attempt.remaining_s else None

    def _peers_p95(self, attempt: Attempt) -> float | None:
        """The lowest p95 among the service's other endpoints with enough answers to know it."""
        hedging, best = self._hedging, None
        assert hedging is not None
        for e in attempt.service.endpoints:
            stats = self._stats_of(attempt.service, e) if e is not attempt.endpoint else None
            if stats is not None:
                recent = stats.recent_ttft if self._stream else stats.recent
                p95 = hedge_delay(hedging, recent.quantile(0.95), recent.count)
                best = p95 if best is None or (p95 is not None and p95 < best) else best
        return best

    async def _race(self, first: Attempt, delay: float, try_one: Callable[[Attempt], Awaitable[T]],
                    discard: Callable[[T], Awaitable[None]] | None) -> tuple[Attempt, T] | None:
        """Run `first`; past `delay` also a hedge; the first answer wins, the other is cancelled.
        None when every attempt of the race failed (the last one was decided by `failed`)."""
        running: dict[asyncio.Future[T], Attempt] = {asyncio.ensure_future(try_one(first)): first}
        wait: float | None = delay
        try:
            while running:
                done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    wait = None
                    hedge = await self._hedge(first)
                    if hedge is not None:
                        running[asyncio.ensure_future(try_one(hedge))] = hedge
                    continue
                for task in done:
                    attempt = running.pop(task)
                    error = task.exception() if not task.cancelled() else asyncio.CancelledError()
                    if error is None:
                        if attempt is not first:
                            self._r.stats.bump(attempt.service.name, attempt.endpoint.id, "hedge_wins")
                        await self._lose(running, discard)
                        return attempt, task.result()
                    if not isinstance(error, UpstreamError):
                        await self._give_back(attempt)
                        raise error
                    if running:
                        await self._note_failure(attempt, error)  # the other attempt may still answer
                    else:
                        await self.failed(attempt, error)
            return None
        except BaseException:
            await self._lose(running, discard)
            self._ended = True
            raise

    async def _hedge(self, first: Attempt) -> Attempt | None:
        """The hedge of `first` (ticket and slot held; one budget unit spent), or None when no
        other endpoint may take it now (module docstring of resilience/hedging.py)."""
        run, r, hedging = self._run, self._r, self._hedging
        assert run is not None and hedging is not None
        now = r.clock()
        if not may_hedge(hedging, self._hedges, run.budget.available(now), len(run.allowed) > 1, self.deadline - now):
            return None
        attempt = await self._next_in(run, busy=first.endpoint.id)
        if attempt is None:
            return None
        self._hedges += 1
        run.budget.spend(now, 1.0)
        r.stats.bump(first.service.name, first.endpoint.id, "hedges")
        return attempt

    async def _lose(self, running: dict[asyncio.Future[T], Attempt],
                    discard: Callable[[T], Awaitable[None]] | None) -> None:
        """Cancel the attempts still in `running` (their connections close), dispose of values
        that arrived in the same instant, and give every loser's ticket and slot back: a lost
        race is no outcome for its endpoint."""
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        for task, attempt in running.items():
            if not task.cancelled() and task.exception() is None and discard is not None:
                with contextlib.suppress(Exception):
                    await discard(task.result())
            await self._give_back(attempt)
        running.clear()

    async def _give_back(self, attempt: Attempt) -> None:
        self._r.breakers.get(attempt.service.name, attempt.endpoint.id).release(attempt.ticket)
        await self._release(attempt)

    def _stats_of(self, service: ServiceView, endpoint: EndpointView) -> EndpointStats | None:
        live = self._r.live
        if live is None:
            return None
        return live.get(candidate_key(service.name, endpoint.id))

    def _attempt_timeout(self, service: ServiceView, endpoint: EndpointView) -> float:
        """The endpoint's adaptive attempt timeout for this call (resilience/timeouts.py)."""
        policy = self._timeouts
        stats = self._stats_of(service, endpoint)
        if stats is None:
            return policy.ceiling_s
        if self._stream:
            return attempt_timeout(policy, stats.recent_ttft.quantile(0.99), stats.recent_ttft.count)
        expected = None
        per_token = stats.per_token.value
        if per_token is not None:  # a call that asks for more tokens than usual may take longer
            payload = self.call.payload
            asked = payload.get("max_completion_tokens") or payload.get("max_tokens")
            if isinstance(asked, int) and asked > 0:
                expected = (stats.ttft.value or 0.0) + per_token * asked
        return attempt_timeout(policy, stats.recent.quantile(0.99), stats.recent.count, expected)

    # --- results --------------------------------------------------------------------------

    @property
    def fallback_source(self) -> str:
        """What is answering now: "" (the requested service), "service", "local_model",
        "preset_response" or "task_queue"."""
        if self.terminal is not None:
            return SOURCE_BY_STEP.get(self.terminal.source, self.terminal.source)
        return self._run.source if self._run is not None else ""

    @property
    def last_error(self) -> UpstreamError:
        """The latest failure in the chain (or why nothing could be tried)."""
        return self._last or self._nothing_usable(self._first)

    def failure(self) -> CallFailed:
        """The CallFailed to raise once `next` returned None without a terminal step.

        No fallback tried: the requested service's own last error (its kind keeps its
        mapping), with the give-up reason. Fallbacks tried: UNAVAILABLE naming the chain
        (DEADLINE_EXCEEDED when the last error was a timeout)."""
        first = self._first
        if len(self._chain) == 1:
            error = first.last or self._nothing_usable(first)
            if first.reason and error is first.last and error.kind.retryable:
                error = _with_message(error, f"{error.message} (gave up: {first.reason})")
            return CallFailed(error, self.attempts, *self._last_at)
        last = self._last
        chain = " -> ".join(self._chain)
        detail = f"; last error {last.kind.value}: {last.message}" if last else ""
        reason = f"; {self._unavailable}" if self._unavailable else ""
        kind = ErrorKind.TIMEOUT if last is not None and last.kind is ErrorKind.TIMEOUT else ErrorKind.RETRYABLE
        return CallFailed(UpstreamError(kind, f"fallback chain {chain} exhausted{detail}{reason}"), self.attempts,
                          *self._last_at)

    def failure_as(self, error: UpstreamError) -> CallFailed:
        """A CallFailed with `error` instead of the chain's own, placed where the last failure was."""
        return CallFailed(error, self.attempts, *self._last_at)

    # --- internals ------------------------------------------------------------------------

    def _start(self, service: ServiceView, source: str) -> _ServiceRun:
        ids, policy = self._r.run_plan(service, self.snapshot.settings.retry)
        budget = self._r.budgets.get(service.name)
        budget.record_request(self._r.clock())
        if self.call.max_retries is not None:  # the caller's own count (checked within the policy's)
            policy = dataclasses.replace(policy, max_retries=self.call.max_retries)
        return _ServiceRun(service, source, policy, budget, ids, set(ids))

    async def _next_in(self, run: _ServiceRun, busy: str = "") -> Attempt | None:
        """The next attempt of `run`. `busy`: an endpoint with an attempt of this call still
        outstanding (a hedge goes elsewhere, never queues for a slot and never ends the run)."""
        r, name = self._r, run.service.name
        if run.done:
            return None
        now = r.clock()
        if self.deadline - now <= 0:
            run.done, run.reason = True, "deadline reached"
            if run.last is None:
                run.last = UpstreamError(ErrorKind.TIMEOUT, "deadline exceeded before any attempt")
                self._last = self._last or run.last
            return None
        # (the usual first pick excludes nothing: skip building a set for it)
        exclude: Collection[str] = run.ids - run.allowed if run.allowed != run.ids else ()
        if busy:
            exclude = {*exclude, *run.tried, busy}
        endpoint = self._pick(run.service, exclude=exclude, call=self.call, settings=self.snapshot.settings)
        if busy and (endpoint is None or not r.admission.core.has_room(name, endpoint.id)):
            return None
        if endpoint is None:
            run.done = True
            run.reason = run.reason or "no usable endpoint"
            return None
        ticket = r.breakers.get(name, endpoint.id).take(now)
        if ticket.probe:
            r.stats.bump(name, endpoint.id, "probes")
        try:
            grant = await r.admission.acquire(name, endpoint.id, self.call.priority, self.deadline)
        except BaseException:
            r.breakers.get(name, endpoint.id).release(ticket)
            r.queue_changed(name)
            raise
        r.queue_changed(name)
        self.attempts += 1
        left = self.deadline - r.clock()
        limit = self._attempt_timeout(run.service, endpoint)
        return Attempt(run.service, endpoint, self.attempts, min(left, limit), run.source, ticket, grant,
                       capped=limit < left)

    async def _outcome(self, attempt: Attempt, error: UpstreamError | None) -> None:
        await self._release(attempt)
        r, name, endpoint = self._r, attempt.service.name, attempt.endpoint.id
        now = r.clock()
        kind = error.kind if error is not None else None
        if self.callers_timeout(attempt.service, kind):  # no outcome: the ticket back, as `abandon`
            r.breakers.get(name, endpoint).release(attempt.ticket)
            return
        r.breakers.get(name, endpoint).record(now, attempt.ticket, kind, error.retry_after_s if error else None)
        r.outliers.record(now, name, endpoint, kind)
        if kind is ErrorKind.RATE_LIMITED:
            r.stats.bump(name, endpoint, "throttled")

    async def _release(self, attempt: Attempt) -> None:
        if attempt.grant is not None:
            self._r.admission.release(attempt.grant)
            attempt.grant = None
        self._r.queue_changed(attempt.service.name)

    def _advance(self) -> None:
        """The current service gave up: move to the next step of the fallback plan."""
        if self._steps is None:
            kind = self._first.last.kind if self._first.last is not None else None
            self._steps = list(self._plan().fallbacks) if should_fall_back(kind) else []
        self._run = None
        while self._steps and self.deadline - self._r.clock() > 0:
            step = self._steps.pop(0)
            if step.kind is StepKind.UNAVAILABLE:
                self._unavailable = step.reason
                return
            if not preset_may_answer(step, self._last.kind if self._last is not None else None):
                continue  # a category preset does not hide a missing secret or a rejected key
            self._r.stats.bump(self.call.service, "", "fallbacks")
            if step.kind is StepKind.SERVICE:
                service = self.snapshot.services[step.service]
                self._chain.append(service.name)
                self._run = self._start(service, SOURCE_BY_STEP.get(step.source, "service"))
                return
            self.terminal = step  # PRESET or QUEUE_FOR_LATER: the caller answers
            return

    def _plan(self) -> Plan:
        r, services = self._r, self.snapshot.services
        now = r.clock()

        def usable(name: str) -> bool:
            svc = services.get(name)
            return svc is not None and bool(r.gate.usable(name, [e.id for e in svc.endpoints], now))

        settings = r.settings.fallback
        presets = self.snapshot.settings.preset_responses  # the config's, over the agent's own
        if presets:
            settings = dataclasses.replace(settings, preset_responses={**settings.preset_responses, **presets})
        return plan(self.call.service, services, settings, serves=self._serves, usable=usable,
                    metadata={n: s.metadata for n, s in services.items()})

    def _nothing_usable(self, run: _ServiceRun) -> UpstreamError:
        """No endpoint could be tried: every breaker open / endpoint ejected (or none left)."""
        now = self._r.clock()
        waits = [self._r.breakers.get(run.service.name, e).retry_at(now) - now for e in run.ids]
        retry_after = min(waits) if waits else None
        return UpstreamError(
            ErrorKind.RETRYABLE,
            f"service {run.service.name!r}: no usable endpoint (circuit breakers open or endpoints ejected)",
            retry_after_s=retry_after if retry_after else None,
        )


def _with_message(error: UpstreamError, message: str) -> UpstreamError:
    return UpstreamError(error.kind, message, status=error.status, retry_after_s=error.retry_after_s, body=error.body)
