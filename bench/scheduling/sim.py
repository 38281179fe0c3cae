"""A discrete-event simulation of one agent in front of a pool of upstream instances.

Virtual clock, one heap of events, no threads, no sockets. The agent side is the real thing:
candidates, `LiveStats` (fed the very `AttemptStart` / `AttemptEnd` events the request path
emits) and the `Scheduler` with the strategies from `switchgear.dataplane.scheduling`. What
is simulated is the world around it:

- each instance serves `capacity` requests at once and queues up to `queue_limit` more in
  FIFO order; beyond that it answers 503 at once (overloaded);
- service time = (ttft + s/token x output tokens) x slowdown(t) x lognormal(0, jitter);
- with `stream_upstream` (the product's setting of that name: the agent streams whole answers
  from the upstream), the first token comes at start of service + ttft x slowdown(t) x the
  same lognormal draw — one draw, since a slow moment of an upstream slows its first token
  and its tokens alike — and the router is told (`FirstToken`, then `AttemptEnd` with
  `ttft_s` from the attempt's start, queue wait included, and `unary`);
- with probability error(t) an attempt fails fast (a 5xx after 20 ms);
- while down(t) the instance black-holes: new attempts never answer nor send a first token
  (and, with `partition`, neither do the ones it was serving);
- the agent retries like `dataplane/invoke.py`: on a retryable failure, the next untried
  endpoint picked by the same strategy, at most `max_retries` more, all within the call's
  deadline; an attempt still outstanding at the deadline fails the call (TIMEOUT), exactly as
  the agent's `asyncio.timeout(remaining)` does;
- with `stream_upstream` and a router with `LiveStats` (`stats`), an attempt also has the
  product's first-token attempt timeout (`attempt_timeout` with the llm defaults over the
  endpoint's `recent_ttft`: clamp(4 x p99, 5 s, ceiling), the ceiling until 20 are known):
  without a first token by then it is that endpoint's TIMEOUT and the call fails over; and
  when the router finds an endpoint silent at a pick (`LiveStats.while_silent`) and it has
  completed no answer for QUIET_S, the attempts waiting on its first token fail over at once
  (dataplane/abandon.py) — except those sent while it was already judged silent (the probes),
  which keep their timeout.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from switchgear.adapters.base import ErrorKind, TokenUsage
from switchgear.dataplane.abandon import quiet
from switchgear.dataplane.events import AttemptEnd, AttemptStart, FirstToken
from switchgear.dataplane.resilience.timeouts import attempt_timeout
from switchgear.dataplane.scheduling.model import Candidate, Request
from switchgear.dataplane.scheduling.stats import LiveStats
from switchgear.dataplane.snapshot import Pricing
from switchgear.wire.attempt_policy import timeouts_for

SERVICE = "pool"
_LLM_TIMEOUTS = timeouts_for("llm")  # the product's defaults (no policy overrides)


def constant(value: float) -> Callable[[float], float]:
    return lambda t: value


def never(t: float) -> bool:
    return False


UNCHANGED = constant(1.0)


@dataclass(frozen=True)
class InstanceSpec:
    """One upstream instance. Prices in USD per 1k tokens; times in seconds."""

    name: str
    ttft_s: float
    per_token_s: float
    capacity: int
    queue_limit: int
    error_rate: float = 0.0
    input_price: float = 0.0
    output_price: float = 0.0
    jitter: float = 0.25
    weight: int = 1
    priority: int = 0
    slowdown: Callable[[float], float] = UNCHANGED
    error: Callable[[float], float] | None = None  # overrides error_rate when set
    down: Callable[[float], bool] = never
    partition: bool = False  # while down, calls already in service never answer either

    def candidate(self, input_price: float | None = None, output_price: float | None = None) -> Candidate:
        return Candidate(
            key=f"{SERVICE}/{self.name}", service=SERVICE, endpoint=self.name, weight=float(self.weight),
            tier=(0, self.priority), max_concurrency=self.capacity,
            pricing=Pricing(
                input_cost_per_1k_tokens=self.input_price if input_price is None else input_price,
                output_cost_per_1k_tokens=self.output_price if output_price is None else output_price,
            ),
        )


@dataclass(frozen=True)
class PriceChange:
    at_s: float
    instance: str
    input_price: float
    output_price: float


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    instances: tuple[InstanceSpec, ...]
    rate: Callable[[float], float]  # arrivals per second at time t
    peak_rate: float  # an upper bound of rate(t), for thinning
    duration_s: float = 180.0
    deadline_s: float = 30.0  # the agent's default_timeout
    max_retries: int = 3
    max_tokens: int = 400  # what requests ask for (the estimate); actual output is below it
    price_changes: tuple[PriceChange, ...] = ()
    marks: tuple[tuple[float, str], ...] = ()  # annotations for the plot
    contenders: tuple[str, ...] = ()  # the strategies this scenario compares; () = all of them
    fault: tuple[float, float, str] | None = None  # (from s, to s, instance): measured in picks
    breakers: bool = False  # Switchgear's strategies behind the agent's circuit breakers


class Router(Protocol):
    """What the simulation needs of a strategy: pick, and be told of attempts."""

    def pick(self, cands: Sequence[Candidate], request: Request, exclude: set[str]) -> Candidate | None: ...

    def attempt_started(self, event: AttemptStart) -> None: ...

    def first_token(self, event: FirstToken) -> None: ...

    def attempt_ended(self, event: AttemptEnd) -> None: ...


@dataclass
class CallRecord:
    arrival: float
    ok: bool
    latency_s: float
    cost_usd: float
    attempts: int


@dataclass
class _Call:
    id: str
    arrival: float
    deadline: float
    input_tokens: int
    output_tokens: int
    request: Request
    tried: set[str] = field(default_factory=set)
    attempts: int = 0
    attempt_start: float = 0.0
    current: str = ""  # key of the outstanding attempt ("" when none)
    done: bool = False


@dataclass
class _Job:
    call: _Call
    attempt: int
    key: str
    ttft_s: float | None = None  # from the attempt's start, once its first token came


class _Instance:
    def __init__(self, spec: InstanceSpec, sim: Simulation, rng: random.Random) -> None:
        self.spec = spec
        self.sim = sim
        self.rng = rng
        self.busy = 0
        self.queue: deque[_Job] = deque()

    def submit(self, job: _Job) -> None:
        now = self.sim.now
        spec = self.spec
        if spec.down(now):
            return  # black hole: never answers
        rate = spec.error(now) if spec.error is not None else spec.error_rate
        if self.rng.random() < rate:
            self.sim.at(now + 0.02, self.sim.failed, job, ErrorKind.RETRYABLE)
        elif self.busy < spec.capacity:
            self._start(job)
        elif len(self.queue) < spec.queue_limit:
            self.queue.append(job)
        else:
            self.sim.at(now + 0.005, self.sim.failed, job, ErrorKind.RETRYABLE)  # 503 overloaded

    def _start(self, job: _Job) -> None:
        now = self.sim.now
        spec = self.spec
        self.busy += 1
        base = spec.ttft_s + spec.per_token_s * job.call.output_tokens
        scale = spec.slowdown(now) * math.exp(self.rng.gauss(0.0, spec.jitter))
        if self.sim.stream_upstream:
            self.sim.at(now + spec.ttft_s * scale, self._first_token, job)
        self.sim.at(now + base * scale, self._finish, job)

    def _first_token(self, job: _Job) -> None:
        if self.spec.partition and self.spec.down(self.sim.now):
            return  # lost with the network
        self.sim.first_token(job)

    def _finish(self, job: _Job) -> None:
        if self.spec.partition and self.spec.down(self.sim.now):
            return  # the answer is lost with the network; the slot stays taken
        self.busy -= 1
        self.sim.succeeded(job)
        if self.queue:
            self._start(self.queue.popleft())


class Simulation:
    """One scenario, one strategy. `run()` returns every call's record."""

    def __init__(self, scenario: Scenario, seed: int = 1, router: Router | None = None,
                 stream_upstream: bool = False) -> None:
        self.scenario = scenario
        self.stream_upstream = stream_upstream
        self.router: Router = router  # type: ignore[assignment]  # set before run()
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[..., None], tuple[object, ...]]] = []
        self._seq = 0
        self.instances = {
            s.name: _Instance(s, self, random.Random(f"{seed}/{s.name}")) for s in scenario.instances
        }
        self.candidates = tuple(s.candidate() for s in scenario.instances)
        self.records: list[CallRecord] = []
        self.picks: list[tuple[float, str]] = []  # (time, instance) of every attempt
        self._workload = random.Random(f"{seed}/workload")  # same arrivals for every strategy
        self._stats: LiveStats | None = None  # the router's, with stream_upstream (first-token timeouts)
        self._waiting: dict[str, dict[str, _Job]] = {}  # key -> call id -> attempt awaiting its first token

    def at(self, t: float, fn: Callable[..., None], *args: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn, args))

    def run(self) -> list[CallRecord]:
        sc = self.scenario
        for change in sc.price_changes:
            self.at(change.at_s, self._reprice, change)
        self._schedule_arrivals()
        stats = getattr(self.router, "stats", None)
        if self.stream_upstream and isinstance(stats, LiveStats):
            self._stats = stats
            stats.while_silent = self._still_silent
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            self.now = t
            fn(*args)
        return self.records

    def clock(self) -> float:
        return self.now

    def _schedule_arrivals(self) -> None:
        sc, rng = self.scenario, self._workload
        t, n = 0.0, 0
        while True:  # a non-homogeneous Poisson process by thinning
            t += rng.expovariate(sc.peak_rate)
            if t >= sc.duration_s:
                return
            if rng.random() * sc.peak_rate > sc.rate(t):
                continue
            n += 1
            prompt = rng.randint(200, 2000)
            output = rng.randint(50, sc.max_tokens)
            kind = rng.random()  # the request mix: 20% high priority, 30% premium, 50% standard
            priority, user = (9, "standard") if kind < 0.2 else (5, "premium") if kind < 0.5 else (5, "standard")
            self.at(t, self._arrive, f"r{n}", prompt, output, priority, user)

    def _reprice(self, change: PriceChange) -> None:
        specs = {s.name: s for s in self.scenario.instances}
        self.candidates = tuple(
            specs[c.endpoint].candidate(change.input_price, change.output_price) if c.endpoint == change.instance else c
            for c in self.candidates
        )

    def _arrive(self, request_id: str, input_tokens: int, output_tokens: int, priority: int, user: str) -> None:
        sc = self.scenario
        request = Request(category="llm", priority=priority, user_type=user,
                          input_tokens=input_tokens, output_tokens=sc.max_tokens)
        call = _Call(request_id, self.now, self.now + sc.deadline_s, input_tokens, output_tokens, request)
        self.at(call.deadline, self._deadline, call)
        self._attempt(call)

    def _attempt(self, call: _Call) -> None:
        if call.attempts > self.scenario.max_retries or self.now >= call.deadline:
            self._finish(call, ok=False)
            return
        chosen = self.router.pick(self.candidates, call.request, call.tried)
        if chosen is None:
            self._finish(call, ok=False)
            return
        call.attempts += 1
        self.picks.append((self.now, chosen.endpoint))
        call.tried.add(chosen.key)
        call.current = chosen.key
        call.attempt_start = self.now
        self.router.attempt_started(AttemptStart(call.id, SERVICE, "llm", chosen.endpoint, call.attempts, 5,
                                                 streamed=self.stream_upstream))
        job = _Job(call, call.attempts, chosen.key)
        stats = self._stats
        if stats is not None:  # the product's first-token attempt timeout, and abandonment (docstring)
            live = stats.get(chosen.key)
            limit = attempt_timeout(_LLM_TIMEOUTS, live.recent_ttft.quantile(0.99), live.recent_ttft.count)
            if self.now + limit < call.deadline:
                self.at(self.now + limit, self._no_first_token, job)
            if chosen.key not in stats.silenced:  # (one sent while judged silent is a probe)
                self._waiting.setdefault(chosen.key, {})[call.id] = job
        self.instances[chosen.endpoint].submit(job)

    def _no_first_token(self, job: _Job) -> None:
        if job.ttft_s is None:
            self._unwait(job)
            self.failed(job, ErrorKind.TIMEOUT)

    def _still_silent(self, key: str) -> None:
        """A pick found `key` silent: its waiting attempts fail over (after this pick) once it has
        also completed no answer for QUIET_S (as attempts.Resilience.still_silent)."""
        stats = self._stats
        if key in self._waiting and stats is not None and quiet(stats.get(key).last_sample_at, self.now):
            for job in self._waiting.pop(key).values():
                self.at(self.now, self._no_first_token, job)

    def _unwait(self, job: _Job) -> None:
        waiting = self._waiting.get(job.key)
        if waiting is not None and waiting.get(job.call.id) is job:
            del waiting[job.call.id]

    def _live(self, job: _Job) -> bool:
        return not job.call.done and job.call.attempts == job.attempt

    def _ended(self, job: _Job, error: ErrorKind | None, cost: float = 0.0) -> None:
        call = job.call
        usage = TokenUsage(call.input_tokens, call.output_tokens) if error is None else TokenUsage()
        endpoint = job.key.split("/", 1)[1]
        self.router.attempt_ended(AttemptEnd(call.id, SERVICE, "llm", endpoint, job.attempt,
                                             self.now - call.attempt_start, error, usage, cost,
                                             job.ttft_s, unary=self.stream_upstream))
        call.current = ""

    def first_token(self, job: _Job) -> None:
        if not self._live(job):
            return
        job.ttft_s = self.now - job.call.attempt_start
        self._unwait(job)
        self.router.first_token(FirstToken(job.call.id, SERVICE, job.key.split("/", 1)[1], job.attempt, job.ttft_s))

    def succeeded(self, job: _Job) -> None:
        if not self._live(job):
            return
        self._unwait(job)
        call = job.call
        price = next(c.pricing for c in self.candidates if c.key == job.key)
        cost = price.cost(call.input_tokens, call.output_tokens)
        self._ended(job, None, cost)
        self._finish(call, ok=True, cost=cost)

    def failed(self, job: _Job, kind: ErrorKind) -> None:
        if not self._live(job):
            return
        self._unwait(job)
        self._ended(job, kind)
        self._attempt(job.call)

    def _deadline(self, call: _Call) -> None:
        if call.done:
            return
        if call.current:
            self._ended(_Job(call, call.attempts, call.current), ErrorKind.TIMEOUT)
        self._finish(call, ok=False)

    def _finish(self, call: _Call, ok: bool, cost: float = 0.0) -> None:
        if call.done:
            return
        call.done = True
        self.records.append(CallRecord(call.arrival, ok, self.now - call.arrival, cost, call.attempts))
