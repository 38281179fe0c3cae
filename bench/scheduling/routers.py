"""The contenders: Switchgear's seven strategies and the baselines, behind one interface.

Switchgear's strategies run as in the agent: `Scheduler.pick` over candidates with
`LiveStats` fed by attempt events, under the seed config's llm policy bounds
(min_success_rate 0.95) — and, in scenarios that ask for them (`Scenario.breakers`), with the
agent's circuit breakers in front (`Breakers`). The baselines get no policy bounds (they are
not Switchgear):

- simple_shuffle: LiteLLM's default — a uniformly random deployment (weights when given).
- litellm_latency: LiteLLM's latency-based routing — per deployment the mean of the last 10
  samples of latency / completion tokens; a timeout counts as 1000 s; a deployment with no
  samples counts as 0 (tried first); a random pick among those within `buffer` (50%, the docs'
  example) of the lowest.
- litellm_least_busy: LiteLLM's least-busy routing — fewest in-flight requests (no notion of
  capacity or speed), a random one among ties.
- litellm_cost: LiteLLM's lowest-cost routing — the lowest input + output price per token (no
  latency or health bound; it has TPM/RPM limits, which this pool does not set).
- seed_intelligent: the seed's sample `_calculate_service_score` with its constants
  (1 - load, 1 - rt/10000 ms, success rate, 1 - cost/0.01 USD) and weight tables, max() pick.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence

from bench.scheduling.sim import SERVICE
from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.events import AttemptEnd, AttemptStart, FirstToken
from switchgear.dataplane.resilience.breaker import CircuitBreaker, Ticket
from switchgear.dataplane.scheduling import STRATEGIES, LiveStats, Scheduler, Strategy
from switchgear.dataplane.scheduling.model import Bounds, Candidate, Context, Request
from switchgear.dataplane.scheduling.pickers import random_weighted
from switchgear.dataplane.scheduling.scorers import clamp, seed_weights

POLICY_BOUNDS = Bounds(min_success_rate=0.95)  # the seed config's llm_services policy


class SchedulerRouter:
    """A named strategy run by the real Scheduler."""

    def __init__(self, name: str, stats: LiveStats, scheduler: Scheduler, bounds: Bounds) -> None:
        self.name = name
        self.stats = stats
        self.scheduler = scheduler
        self.bounds = bounds

    def pick(self, cands: Sequence[Candidate], request: Request, exclude: set[str]) -> Candidate | None:
        return self.scheduler.pick(cands, request, self.name, group=SERVICE, bounds=self.bounds, exclude=exclude)

    def attempt_started(self, event: AttemptStart) -> None:
        self.stats.attempt_started(event)

    def first_token(self, event: FirstToken) -> None:
        self.stats.first_token(event)

    def attempt_ended(self, event: AttemptEnd) -> None:
        self.stats.attempt_ended(event)


class Breakers:
    """The agent's per-endpoint circuit breakers (resilience/breaker.py, default settings) in
    front of a router: an endpoint whose breaker refuses is unavailable to the scheduler, as
    the agent's resilience engine makes it; every attempt holds a ticket and records its
    outcome. Only Switchgear's strategies get them (the baselines keep their own rules)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.book: dict[str, CircuitBreaker] = {}
        self.tickets: dict[tuple[str, int], tuple[CircuitBreaker, Ticket]] = {}

    def blocked(self, key: str) -> bool:
        breaker = self.book.get(key)
        return breaker is not None and not breaker.would_allow(self.clock())

    def started(self, event: AttemptStart) -> None:
        breaker = self.book.setdefault(f"{event.service}/{event.endpoint}", CircuitBreaker())
        ticket = breaker.allow(self.clock())
        if ticket is not None:
            self.tickets[(event.request_id, event.attempt)] = (breaker, ticket)

    def ended(self, event: AttemptEnd) -> None:
        held = self.tickets.pop((event.request_id, event.attempt), None)
        if held is None:
            return
        breaker, ticket = held
        if event.cancelled:
            breaker.release(ticket)
        else:
            breaker.record(self.clock(), ticket, event.error)


class GuardedRouter(SchedulerRouter):
    """A Switchgear strategy with the agent's breakers (`Breakers`)."""

    def __init__(self, name: str, stats: LiveStats, scheduler: Scheduler, bounds: Bounds, breakers: Breakers) -> None:
        super().__init__(name, stats, scheduler, bounds)
        self.breakers = breakers

    def attempt_started(self, event: AttemptStart) -> None:
        self.breakers.started(event)
        super().attempt_started(event)

    def attempt_ended(self, event: AttemptEnd) -> None:
        self.breakers.ended(event)
        super().attempt_ended(event)


def seed_constant_score(cands: Sequence[Candidate], ctx: Context) -> list[float]:
    """The seed's sample score with its fixed constants, fed the same live numbers."""
    weights = seed_weights(ctx.request)
    out = []
    for c in cands:
        s = ctx.stats.get(c.key)
        load = s.in_flight / c.max_concurrency if c.max_concurrency else 0.0
        rt_ms = (s.mean_latency.value if s.mean_latency.value is not None else 1.0) * 1000.0
        cost = s.cost_usd if s.cost_usd is not None else 0.001
        total = (max(0.0, 1 - load) * weights["load"]
                 + max(0.0, 1 - min(rt_ms / 10000, 1)) * weights["latency"]
                 + s.success_rate(ctx.now) * weights["success"]
                 + max(0.0, 1 - min(cost / 0.01, 1)) * weights["cost"])
        out.append(clamp(total))
    return out


def first_max(cands: Sequence[Candidate], scores: Sequence[float] | None, ctx: Context) -> Candidate:
    """Python's max(): the first of the highest scores."""
    assert scores is not None
    return cands[max(range(len(cands)), key=scores.__getitem__)]


def fewest_in_flight(cands: Sequence[Candidate], scores: Sequence[float] | None, ctx: Context) -> Candidate:
    """LiteLLM least-busy: the fewest in-flight requests; a random one among ties."""
    counts = [ctx.stats.get(c.key).in_flight for c in cands]
    low = min(counts)
    return ctx.rng.choice([c for c, n in zip(cands, counts, strict=True) if n == low])


def lowest_token_price(cands: Sequence[Candidate], scores: Sequence[float] | None, ctx: Context) -> Candidate:
    """LiteLLM lowest-cost: the lowest input + output price per token, the first among ties."""
    return min(cands, key=lambda c: c.pricing.input_cost_per_1k_tokens + c.pricing.output_cost_per_1k_tokens)


BASELINE_STRATEGIES = {
    "simple_shuffle": Strategy("simple_shuffle", random_weighted),
    "litellm_least_busy": Strategy("litellm_least_busy", fewest_in_flight),
    "litellm_cost": Strategy("litellm_cost", lowest_token_price),
    "seed_intelligent": Strategy("seed_intelligent", first_max, scorer=seed_constant_score),
}


class LiteLLMLatency:
    """LiteLLM's lowest-latency routing, as its router_strategy/lowest_latency.py does it."""

    name = "litellm_latency"

    def __init__(self, clock: object, rng: random.Random, buffer: float = 0.5, window: int = 10) -> None:
        self.rng = rng
        self.buffer = buffer
        self.samples: dict[str, deque[float]] = {}
        self.window = window

    def pick(self, cands: Sequence[Candidate], request: Request, exclude: set[str]) -> Candidate | None:
        pool = [c for c in cands if c.key not in exclude]
        if not pool:
            return None
        means = []
        for c in pool:
            d = self.samples.get(c.key)
            means.append(sum(d) / len(d) if d else 0.0)
        low = min(means)
        near = [c for c, m in zip(pool, means, strict=True) if m <= low + self.buffer * low]
        return self.rng.choice(near)

    def attempt_started(self, event: AttemptStart) -> None:
        pass

    def first_token(self, event: FirstToken) -> None:
        pass

    def attempt_ended(self, event: AttemptEnd) -> None:
        key = f"{event.service}/{event.endpoint}"
        d = self.samples.setdefault(key, deque(maxlen=self.window))
        if event.error is None:
            d.append(event.latency_s / max(1, event.usage.output_tokens))
        elif event.error is ErrorKind.TIMEOUT:
            d.append(1000.0)


class LiteLLMCooldown:
    """A LiteLLM strategy with the LiteLLM router's cooldowns, as its documentation and
    router_utils/cooldown_handlers.py describe the defaults: a deployment whose failures in
    the current minute exceed 50 % of its calls (with at least 5 calls) — or that answers a
    timeout or a 429 — is left out of every pick for 5 s. With every deployment cooling down
    the pick is made among all (LiteLLM would refuse the call instead)."""

    def __init__(self, name: str, inner: SchedulerRouter, clock: Callable[[], float],
                 cooldown_s: float = 5.0, threshold: float = 0.5, minimum: int = 5) -> None:
        self.name = name
        self.inner = inner
        self.clock = clock
        self.cooldown_s, self.threshold, self.minimum = cooldown_s, threshold, minimum
        self.minute: dict[str, tuple[int, int, int]] = {}  # key -> (minute, successes, failures)
        self.cooled: dict[str, float] = {}

    def pick(self, cands: Sequence[Candidate], request: Request, exclude: set[str]) -> Candidate | None:
        now = self.clock()
        cold = {k for k, until in self.cooled.items() if until > now}
        pool = [c for c in cands if c.key not in cold]
        return self.inner.pick(pool or cands, request, exclude)

    def attempt_started(self, event: AttemptStart) -> None:
        self.inner.attempt_started(event)

    def first_token(self, event: FirstToken) -> None:
        pass  # LiteLLM's router has no notion of a first token

    def attempt_ended(self, event: AttemptEnd) -> None:
        self.inner.attempt_ended(event)
        if event.cancelled:
            return
        now = self.clock()
        key = f"{event.service}/{event.endpoint}"
        minute, ok, bad = self.minute.get(key, (int(now // 60), 0, 0))
        if minute != int(now // 60):
            minute, ok, bad = int(now // 60), 0, 0
        ok, bad = ok + (event.error is None), bad + (event.error is not None)
        self.minute[key] = (minute, ok, bad)
        if event.error in (ErrorKind.TIMEOUT, ErrorKind.RATE_LIMITED) or (
                event.error is not None and ok + bad >= self.minimum and bad / (ok + bad) > self.threshold):
            self.cooled[key] = now + self.cooldown_s


COOLDOWN_BASELINES = {"litellm_cost+cooldown": "litellm_cost", "simple_shuffle+cooldown": "simple_shuffle"}

OURS = tuple(STRATEGIES)
#: A Switchgear strategy's name with this suffix runs with the llm policy's `stream_upstream`
#: on: every whole-answer call is streamed from its upstream, so first tokens reach routing
#: (Simulation's `stream_upstream`) and the first-token silence test (filters.not_silent) runs.
STREAM = "+stream"


def streamed(name: str) -> tuple[str, bool]:
    """(the strategy's own name, whether it streams from the upstream)."""
    return (name[: -len(STREAM)], True) if name.endswith(STREAM) and name[: -len(STREAM)] in OURS else (name, False)


def is_ours(name: str) -> bool:
    """A Switchgear strategy, streamed from the upstream or not."""
    return streamed(name)[0] in OURS


BASELINES = ("litellm_latency", "litellm_least_busy", "litellm_cost", "simple_shuffle", "seed_intelligent")
ALL = OURS + BASELINES


def make_router(name: str, clock: object, seed: int,
                breakers: bool = False) -> SchedulerRouter | LiteLLMLatency | LiteLLMCooldown:
    """`breakers`: Switchgear's strategies get the agent's circuit breakers (`Breakers`).
    A `STREAM` suffix is the simulation's business (`Simulation.stream_upstream`); the
    strategy is the same."""
    name = streamed(name)[0]
    if name in COOLDOWN_BASELINES:
        inner = make_router(COOLDOWN_BASELINES[name], clock, seed)
        assert isinstance(inner, SchedulerRouter)
        return LiteLLMCooldown(name, inner, clock)  # type: ignore[arg-type]
    rng = random.Random(f"{seed}/{name}")
    if name == "litellm_latency":
        return LiteLLMLatency(clock, rng)
    stats = LiveStats(clock)  # type: ignore[arg-type]
    if name in BASELINE_STRATEGIES:
        # other routers: as they are (no peer stages, no load shifting)
        scheduler = Scheduler(stats, rng, strategies=BASELINE_STRATEGIES, peers=None, shift=None, silence=False)
        return SchedulerRouter(name, stats, scheduler, Bounds())
    if not breakers:
        return SchedulerRouter(name, stats, Scheduler(stats, rng), POLICY_BOUNDS)
    book = Breakers(clock)  # type: ignore[arg-type]
    return GuardedRouter(name, stats, Scheduler(stats, rng, unavailable=book.blocked), POLICY_BOUNDS, book)
