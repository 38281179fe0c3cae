"""Issue 21's scheduling parts on a fake clock: a slow target off fast whichever strategy runs,
back after it recovers; no herd onto one target; slow start after a block. Pure: the real
Scheduler with LiveStats fed by attempt events of a tiny open-loop simulation."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable

import pytest

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.scheduling import Scheduler
from switchgear.dataplane.scheduling.model import Request
from switchgear.dataplane.scheduling.peers import PeerSettings, off_slow, over_cap
from switchgear.dataplane.scheduling.stats import LiveStats, StatsConfig
from tests.scheduling_helpers import Clock, cand, complete, ctx, occupy

pytestmark = pytest.mark.timeout(30)

#: endpoint -> t -> seconds to answer (None: never answers)
Latency = Callable[[str, float], float | None]
BASE = {"a": 0.04, "b": 0.06, "c": 0.08}
STRATEGIES = ("round_robin", "weighted", "least_loaded", "cost_optimized", "latency", "intelligent")


def simulate(strategy: str, latency: Latency, seconds: float, rate: float = 30.0, seed: int = 1,
             blocked: Callable[[str, float], bool] = lambda _e, _t: False) -> list[tuple[float, str]]:
    """Open loop at `rate` calls/s; every call is one attempt. Returns (time, endpoint) per pick."""
    clock = Clock(0.0)
    live = LiveStats(clock, StatsConfig())
    scheduler = Scheduler(live, random.Random(seed), unavailable=lambda k: blocked(k.split("/")[1], clock.t))
    cands = [cand(n) for n in BASE]
    ends: list[tuple[float, int, str]] = []
    picks: list[tuple[float, str]] = []
    for i in range(int(seconds * rate)):
        t = i / rate
        while ends and ends[0][0] <= t:
            end, rid, name = heapq.heappop(ends)
            clock.t = end
            live.attempt_ended(AttemptEnd(str(rid), "s", "llm", name, 1, end - starts[rid]))
        clock.t = t
        chosen = scheduler.pick(cands, Request(category="llm"), strategy, group="s")
        assert chosen is not None
        picks.append((t, chosen.endpoint))
        live.attempt_started(AttemptStart(str(i), "s", "llm", chosen.endpoint, 1, 5))
        starts[i] = t
        took = latency(chosen.endpoint, t)
        if took is not None:
            heapq.heappush(ends, (t + took, i, chosen.endpoint))
    return picks


starts: dict[int, float] = {}


def share(picks: list[tuple[float, str]], name: str, t0: float, t1: float) -> float:
    window = [e for t, e in picks if t0 <= t < t1]
    return Counter(window)[name] / max(1, len(window))


def a_slow(factor: float, start: float, end: float) -> Latency:
    def latency(name: str, t: float) -> float | None:
        slow = name == "a" and start <= t < end
        return BASE[name] * (factor if slow else 1.0)

    return latency


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_ten_times_slow_target_loses_its_share_within_2_s_and_is_back_within_10_s(strategy: str) -> None:
    picks = simulate(strategy, a_slow(10.0, 10.0, 25.0), 40.0)
    assert share(picks, "a", 12.0, 25.0) < 0.05, strategy  # off within 2 s of turning slow
    assert share(picks, "a", 12.0, 25.0) > 0.0  # ...but probed with a trickle
    back = next(t for t, e in picks if t >= 25.0 and share(picks, "a", t, t + 1.0) >= 0.15)
    assert back - 25.0 <= 10.0, (strategy, back)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_hung_target_loses_its_share_within_2_s(strategy: str) -> None:
    def latency(name: str, t: float) -> float | None:
        return None if name == "a" and t >= 10.0 else BASE[name]

    picks = simulate(strategy, latency, 20.0)
    assert share(picks, "a", 12.0, 20.0) < 0.05, strategy
    assert sum(1 for t, e in picks if e == "a" and t >= 10.0) <= 10  # calls stuck on it, all strategies


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_target_carries_more_than_70_percent_while_all_are_within_2x(strategy: str) -> None:
    picks = simulate(strategy, lambda n, t: BASE[n], 20.0)
    for name in BASE:
        assert share(picks, name, 5.0, 20.0) <= 0.72, (strategy, name)


def test_without_the_share_cap_the_argmax_strategy_herds() -> None:
    """What the cap fixes: intelligent's argmax sends nearly everything to the fastest."""
    clock = Clock(0.0)
    live = LiveStats(clock, StatsConfig(slow_start_s=0.0))
    for name, latency in BASE.items():
        complete(live, f"s/{name}", latency, n=5)
    cands = [cand(n) for n in BASE]
    herd = Scheduler(live, random.Random(1), peers=None)
    capped = Scheduler(live, random.Random(1))
    request = Request(category="llm")
    assert Counter(herd.pick(cands, request, "intelligent", group="s").endpoint for _ in range(100))["a"] == 100  # type: ignore[union-attr]
    picks = [capped.pick(cands, request, "intelligent", group="s").endpoint for _ in range(300)]  # type: ignore[union-attr]
    got = Counter(picks[100:])  # after the shares' EWMA has warmed up
    assert got["a"] <= 144 and got["b"] + got["c"] >= 56


def test_a_target_back_from_a_block_ramps_up_instead_of_taking_its_share_at_once() -> None:
    picks = simulate("weighted", lambda n, t: BASE[n], 25.0, blocked=lambda e, t: e == "b" and 5.0 <= t < 10.0)
    assert share(picks, "b", 6.0, 10.0) == 0.0
    first, later = share(picks, "b", 10.0, 11.0), share(picks, "b", 16.0, 25.0)
    assert 0.0 < first < 0.2 and later > 0.28  # ramped: ~10 % at once, its full third after 5 s


def test_slow_start_restarts_on_unblock() -> None:
    clock = Clock(100.0)
    live = LiveStats(clock, StatsConfig(slow_start_s=10.0, slow_start_min=0.1, recovery_ramp_s=5.0))
    live.get("s/a", 0.0)
    assert live.slow_start("s/a", 100.0) == 1.0
    live.unblocked("s/a", 100.0)
    assert live.slow_start("s/a", 100.0) == pytest.approx(0.1)
    assert live.slow_start("s/a", 102.5) == pytest.approx(0.5) and live.slow_start("s/a", 105.0) == 1.0


def test_off_slow_never_empties_and_probes_one_at_a_time() -> None:
    clock = Clock(10.0)
    live = LiveStats(clock, StatsConfig(slow_start_s=0.0))
    complete(live, "s/a", 1.0, n=3)
    complete(live, "s/b", 0.05, n=3)
    complete(live, "s/c", 0.05, n=3)
    cands = [cand("a"), cand("b"), cand("c")]
    stage = off_slow(PeerSettings(probe_interval_s=0.0))  # always probe, to see the one-at-a-time rule
    assert [c.endpoint for c in stage(cands, ctx(live))] == ["a"]  # the probe
    occupy(live, "s/a", 1)
    assert [c.endpoint for c in stage(cands, ctx(live))] == ["b", "c"]  # a probe is out: no second
    assert [c.endpoint for c in off_slow()(cands[:1], ctx(live))] == ["a"]  # alone: kept


def test_jitter_on_a_fast_pool_is_not_a_slow_peer_but_a_slow_one_is() -> None:
    """A 2 ms endpoint caught by a 10 ms stall on a busy host is 6x its peers but only 10 ms
    off: under the slow margin (50 ms), it stays in the pick. 200 ms is slow."""
    clock = Clock(10.0)
    live = LiveStats(clock, StatsConfig(slow_start_s=0.0))
    complete(live, "s/a", 0.012, n=3)
    complete(live, "s/b", 0.002, n=3)
    complete(live, "s/c", 0.002, n=3)
    cands = [cand("a"), cand("b"), cand("c")]
    stage = off_slow(PeerSettings(probe_interval_s=60.0))
    assert [c.endpoint for c in stage(cands, ctx(live))] == ["a", "b", "c"]
    assert not live.get("s/a").slow
    complete(live, "s/a", 0.2, n=6)
    assert [c.endpoint for c in stage(cands, ctx(live))] == ["a"]  # judged slow: its first probe
    assert live.get("s/a").slow
    occupy(live, "s/a", 1)
    assert [c.endpoint for c in stage(cands, ctx(live))] == ["b", "c"]


def test_the_share_cap_respects_weights_tiers_and_prices() -> None:
    live = LiveStats(Clock(10.0), StatsConfig(slow_start_s=0.0))
    cands = [cand("a", weight=9.0), cand("b", weight=1.0)]
    c = ctx(live)
    c.memory["shares"] = {"s/a": 0.85, "s/b": 0.15}  # under its weighted share (0.9): kept
    assert over_cap()(cands, c) == set()
    c.memory["shares"] = {"s/a": 0.95, "s/b": 0.05}
    assert over_cap()(cands, c) == {"s/a"}
    c.memory["shares"] = {"s/a": 0.95, "s/b": 0.05}
    assert over_cap()([cand("a"), cand("b", tier=(0, 1))], c) == set()  # another tier: no peer
    assert over_cap()([cand("a"), cand("b", price=0.01)], c) == set()  # another price: no peer


def test_a_peer_disqualified_by_a_stale_success_window_still_gets_share_back() -> None:
    """The issue's herd: cost_optimized asks 95 % success over 30 s, so b — recovered from a
    burst of 500s — stayed out while c was down and a took 99 %."""
    clock = Clock(100.0)
    live = LiveStats(clock, StatsConfig(slow_start_s=0.0))
    for name in BASE:
        complete(live, f"s/{name}", BASE[name], n=30)
    complete(live, "s/b", 0.06, error=ErrorKind.RETRYABLE, n=20)  # b's burst of 500s, now over
    scheduler = Scheduler(live, random.Random(1), unavailable=lambda k: k == "s/c")  # c refuses
    cands = [cand(n) for n in BASE]
    picks = []
    for _ in range(300):
        clock.t += 1 / 30
        chosen = scheduler.pick(cands, Request(category="llm", input_tokens=10), "cost_optimized", group="s")
        assert chosen is not None
        picks.append(chosen.endpoint)
        complete(live, chosen.key, BASE[chosen.endpoint])
    got = Counter(picks[100:])
    assert got["a"] <= 0.72 * 200 and got["b"] >= 0.28 * 200, got


def test_attempts_abandoned_three_times_in_a_row_count_as_a_stall() -> None:
    """A hedged-away endpoint never answers: its lost races must make it look stalled, while
    a healthy endpoint's occasional lost race (an answer follows) says nothing."""
    clock = Clock(10.0)
    live = LiveStats(clock, StatsConfig(slow_start_s=0.0))
    complete(live, "s/a", 0.05, n=3)

    def abandon(rid: str) -> None:
        live.attempt_started(AttemptStart(rid, "s", "llm", "a", 1, 5))
        clock.t += 0.1
        live.attempt_ended(AttemptEnd(rid, "s", "llm", "a", 1, 0.1, cancelled=True))

    abandon("r1")
    abandon("r2")
    assert live.get("s/a").stall_factor(clock.t, 0.05) == 1.0  # two lost races: nothing yet
    abandon("r3")
    assert live.get("s/a").stall_factor(clock.t, 0.05) == pytest.approx(0.3 / 0.05)  # since the first
    assert live.get("s/a").in_flight == 0 and live.get("s/a").failed == 0  # no failure, no in-flight leak
    complete(live, "s/a", 0.05)
    assert live.get("s/a").stall_factor(clock.t, 0.05) == 1.0  # it answered: forgotten


def test_an_endpoint_back_from_a_block_starts_with_a_fresh_success_window() -> None:
    clock = Clock(100.0)
    live = LiveStats(clock, StatsConfig())
    complete(live, "s/c", 0.05, error=ErrorKind.CONNECT, n=10)
    assert live.get("s/c").success_rate(clock.t) < 0.2
    live.unblocked("s/c", clock.t)  # its breaker closed after a good probe
    assert live.get("s/c").success_rate(clock.t) == 1.0
