"""The first-token silence test (stats.EndpointStats.silence, filters.not_silent), on a fake clock.

`Upstream` is a small model of one provider fed to the real LiveStats: it serves `capacity`
streamed attempts at once (FIFO queue beyond that), each sending its first token `ttft` after
its service starts and ending `latency` after it; a hung provider takes attempts and never
sends anything. Events are delivered in time order as the clock advances.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable

import pytest

from switchgear.adapters.base import ErrorKind, TokenUsage
from switchgear.dataplane.events import AttemptEnd, AttemptStart, FirstToken
from switchgear.dataplane.scheduling import filters
from switchgear.dataplane.scheduling.model import Candidate
from switchgear.dataplane.scheduling.stats import SILENT_SAMPLES, LiveStats
from tests.scheduling_helpers import Clock, cand, ctx, names, stats

Event = tuple[float, int, Callable[[], None]]


class World:
    """The fake clock and the time-ordered events of every `Upstream` on it."""

    def __init__(self) -> None:
        self.clock = Clock(1000.0)
        self.live = stats(self.clock)
        self.events: list[Event] = []
        self.seq = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn))

    def advance(self, to: float) -> None:
        while self.events and self.events[0][0] <= to:
            t, _, fn = heapq.heappop(self.events)
            self.clock.t = t
            fn()
        self.clock.t = to

    def held_back(self, cands: list[Candidate], key: str) -> bool:
        """`key` left out of the pick, or only sent a probe."""
        kept = filters.not_silent(cands, ctx(self.live))
        return key not in [c.key for c in kept] or (len(kept) == 1 and len(cands) > 1)


class Upstream:
    def __init__(self, world: World, name: str, capacity: int = 10_000, seed: int = 0) -> None:
        self.w = world
        self.name = name
        self.key = f"s/{name}"
        self.capacity = capacity
        self.busy = 0
        self.queue: deque[tuple[str, float]] = deque()
        self.rng = random.Random(seed)
        self.hung = False
        self.ttft_s = 0.6  # x lognormal(0, 0.25), as bench/scheduling's providers
        self.per_answer_s = 1.2  # the rest of a whole answer after its first token
        self.n = 0
        self.ttft: dict[str, float] = {}  # each attempt's time to first token, for its AttemptEnd

    def call(self) -> str:
        """One streamed attempt sent now."""
        self.n += 1
        rid = f"{self.name}-{self.n}"
        self.w.live.attempt_started(AttemptStart(rid, "s", "llm", self.name, 1, 5, streamed=True))
        if self.hung:
            return rid
        if self.busy < self.capacity:
            self._serve(rid, self.w.clock.t)
        else:
            self.queue.append((rid, self.w.clock.t))
        return rid

    def _serve(self, rid: str, sent: float) -> None:
        self.busy += 1
        now = self.w.clock.t
        jitter = math.exp(self.rng.gauss(0.0, 0.25))
        first, whole = self.ttft_s * jitter, (self.ttft_s + self.per_answer_s) * jitter
        self.w.at(now + first, lambda: self.first_token(rid, sent))
        self.w.at(now + whole, lambda: self._end(rid, sent))

    def first_token(self, rid: str, sent: float) -> None:
        self.ttft[rid] = self.w.clock.t - sent
        self.w.live.first_token(FirstToken(rid, "s", self.name, 1, self.ttft[rid]))

    def _end(self, rid: str, sent: float) -> None:
        now = self.w.clock.t
        self.w.live.attempt_ended(AttemptEnd(rid, "s", "llm", self.name, 1, now - sent, None, TokenUsage(100, 100),
                                             0.0, self.ttft.pop(rid, None), unary=True))
        self.busy -= 1
        if self.queue:
            self._serve(*self.queue.popleft())


def upstream(world: World, name: str, **kw: object) -> Upstream:
    return Upstream(world, name, **kw)  # type: ignore[arg-type]


def traffic(world: World, ups: list[Upstream], seconds: float, rate: float,
            route: Callable[[], Upstream] | None = None, each: Callable[[float], None] | None = None) -> None:
    """`rate` calls a second for `seconds`, each to `route()` (default: the first upstream)."""
    step = 1.0 / rate
    end = world.clock.t + seconds
    while world.clock.t + step <= end + 1e-9:
        world.advance(world.clock.t + step)
        (route() if route else ups[0]).call()
        if each is not None:
            each(world.clock.t)


def warmed(seed: int = 0, **kw: object) -> tuple[World, Upstream, Upstream, list[Candidate]]:
    """`cheap` and `mid`, each with 64 first-token samples of a healthy spell."""
    world = World()
    cheap, mid = upstream(world, "cheap", seed=seed, **kw), upstream(world, "mid", seed=seed + 1)
    for up in (cheap, mid):
        traffic(world, [up], 6.4, 10.0)
    world.advance(world.clock.t + 5.0)
    assert world.live.get(cheap.key).recent_ttft.count >= 64
    return world, cheap, mid, [cand("cheap"), cand("mid")]


@pytest.mark.parametrize("seed", range(5))
def test_a_hung_endpoint_is_held_back_within_its_first_token_p99_and_a_little(seed: int) -> None:
    """Nine calls a second to a provider that takes them and sends nothing: held back ~1.0-1.1 s
    in, where its first-token p99 is 1.0-1.15 s."""
    world, cheap, _, cands = warmed(seed)
    p99 = world.live.get(cheap.key).recent_ttft.quantile(0.99)
    assert p99 is not None
    cheap.hung = True
    hung_at = world.clock.t
    seen: list[float] = []
    traffic(world, [cheap], 3.0, 9.0,
            each=lambda now: seen.append(now) if not seen and world.held_back(cands, cheap.key) else None)
    assert seen, "never held back"
    assert seen[0] - hung_at <= p99 + 0.5, (seen[0] - hung_at, p99)
    assert seen[0] - hung_at >= 0.3  # no attempt's silence is improbable before its first token is due


def test_a_slow_but_alive_endpoint_is_never_held_back() -> None:
    """Whole answers five times slower than learned (many attempts in flight), first tokens on
    time: alive, so never silent."""
    world, cheap, _, cands = warmed()
    cheap.per_answer_s = 6.0
    held: list[float] = []
    traffic(world, [cheap], 30.0, 9.0, each=lambda now: held.append(now) if world.held_back(cands, cheap.key) else None)
    assert world.live.get(cheap.key).in_flight > 30
    assert held == []


def test_it_clears_on_a_first_token_and_when_the_silent_attempts_end_and_a_callers_errors_do_not_count() -> None:
    world, cheap, _, cands = warmed()
    cheap.hung = True
    traffic(world, [cheap], 2.0, 9.0)
    stats = world.live.get(cheap.key)
    assert world.held_back(cands, cheap.key) and stats.silent(world.clock.t)
    # the newest silent attempt sends its first token: alive as of then, clear at once
    newest = next(reversed(stats.awaiting_first))
    world.live.first_token(FirstToken(newest[0], "s", "cheap", newest[1], 1.9))
    assert not stats.silent(world.clock.t) and not world.held_back(cands, cheap.key)
    # silent again as the next ones wait (longer now: its pace of first tokens, read over its
    # latest FIRST_PACE, is now slow — one token in seconds); then they all end with the
    # caller's own error
    traffic(world, [cheap], 8.0, 9.0)
    assert stats.silent(world.clock.t)
    window, samples = stats.window.counts(world.clock.t), stats.recent_ttft.count
    for rid, attempt in list(stats.awaiting_first):
        world.live.attempt_ended(AttemptEnd(rid, "s", "llm", "cheap", attempt, 1.0, ErrorKind.CLIENT))
    assert not stats.awaiting_first and not stats.silent(world.clock.t)
    assert stats.window.counts(world.clock.t) == window and stats.recent_ttft.count == samples


def test_no_first_token_data_means_no_judgement() -> None:
    clock = Clock()
    live: LiveStats = stats(clock)
    cands = [cand("a"), cand("b")]
    # attempts that report no first token (plain unary calls): never awaiting one
    for i in range(200):
        live.attempt_started(AttemptStart(f"u{i}", "s", "llm", "a", 1, 5))
    clock.t += 60.0
    assert not live.get("s/a").awaiting_first
    assert names(filters.not_silent(cands, ctx(live))) == ["a", "b"]
    # streamed attempts, but fewer first-token samples than SILENT_SAMPLES
    for i in range(SILENT_SAMPLES - 1):
        live.attempt_started(AttemptStart(f"w{i}", "s", "llm", "b", 1, 5, streamed=True))
        live.first_token(FirstToken(f"w{i}", "s", "b", 1, 0.5))
        live.attempt_ended(AttemptEnd(f"w{i}", "s", "llm", "b", 1, 1.0, ttft_s=0.5, unary=True))
    for i in range(50):
        live.attempt_started(AttemptStart(f"h{i}", "s", "llm", "b", 1, 5, streamed=True))
    clock.t += 60.0
    assert live.get("s/b").silence(clock.t) == 1.0
    assert names(filters.not_silent(cands, ctx(live))) == ["a", "b"]


def test_a_silent_endpoint_gets_one_probe_a_second_and_a_recovered_one_comes_back() -> None:
    world, cheap, mid, cands = warmed()
    live = world.live
    per_second: dict[int, int] = {}

    def route() -> Upstream:
        kept = filters.not_silent(cands, ctx(live))
        up = cheap if kept[0].key == cheap.key else mid
        if up is cheap:
            second = int(world.clock.t - start)
            per_second[second] = per_second.get(second, 0) + 1
        return up

    cheap.hung = True
    start = world.clock.t
    traffic(world, [cheap, mid], 10.0, 10.0, route=route)
    late = {s: n for s, n in per_second.items() if s >= 2}
    assert late and max(late.values()) <= 1  # after the first second or two: probes only, one a second at most
    assert sum(late.values()) >= 5  # and they keep coming
    cheap.hung = False
    healed = world.clock.t
    per_second.clear()
    start = healed
    traffic(world, [cheap, mid], 5.0, 10.0, route=route)
    back = [s for s, n in sorted(per_second.items()) if n >= 5]
    assert back and back[0] <= 2, per_second  # a probe after the heal sends its first token: back at once


def test_a_queue_on_a_healthy_endpoint_honestly() -> None:
    """A burst that queues on a healthy endpoint: the queued attempts wait past their learned
    first-token times, and a product over them alone would read improbable (an earlier version
    held a sustained queue back from 0.8 s on, at nearly every pick). But a FIFO queue keeps
    sending first tokens at its service rate, and the test is bounded by that pace
    (exp(-rate x seconds since the latest first token)): a short queue is never judged, a
    sustained overload only now and then (a gap between first tokens ~7 times the usual: 2 of
    120 picks here), and not once it drains."""
    world, cheap, _, cands = warmed(capacity=20)
    held: list[float] = []
    longest = [0]

    def each(now: float) -> None:
        longest[0] = max(longest[0], len(cheap.queue))
        if world.held_back(cands, cheap.key):
            held.append(now)

    # 12 calls a second for 3 s: ~1.8 s x 12 = 22 wanted in service, 20 served: a short queue
    traffic(world, [cheap], 3.0, 12.0, each=each)
    assert longest[0] >= 1 and held == []
    # 30 calls a second for 4 s against ~11 a second served: the queue wait grows past a second
    traffic(world, [cheap], 4.0, 30.0, each=each)
    assert len(cheap.queue) > 50 and len(held) <= 120 // 20
    world.advance(world.clock.t + 30.0)  # drained
    assert not world.live.get(cheap.key).awaiting_first and not world.held_back(cands, cheap.key)


def test_each_judgement_is_told_once_when_it_begins_and_once_when_it_ends() -> None:
    """LiveStats.on_silence (the agent counts `silences` and logs a line) hears transitions, not
    every held pick."""
    world, cheap, _, cands = warmed()
    told: list[tuple[str, bool]] = []
    world.live.on_silence = lambda key, silent: told.append((key, silent))
    cheap.hung = True
    traffic(world, [cheap], 3.0, 9.0, each=lambda now: world.held_back(cands, cheap.key))
    assert told == [(cheap.key, True)]  # ~18 held picks, one judgement
    stats = world.live.get(cheap.key)
    newest = next(reversed(stats.awaiting_first))
    world.live.first_token(FirstToken(newest[0], "s", "cheap", newest[1], 2.9))
    for _ in range(3):
        assert not world.held_back(cands, cheap.key)
    assert told == [(cheap.key, True), (cheap.key, False)]
