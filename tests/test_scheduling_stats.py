"""LiveStats: the per-endpoint numbers every attempt feeds, and what they make of them."""

from __future__ import annotations

import math

import pytest

from switchgear.adapters.base import ErrorKind, TokenUsage
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.scheduling.model import Request
from switchgear.dataplane.scheduling.stats import FAILING as STREAK
from switchgear.dataplane.scheduling.stats import OVERDUE, LiveStats, PeakEwma, StatsConfig, SuccessWindow
from tests.scheduling_helpers import Clock, complete, occupy, stats


def test_peak_ewma_jumps_up_at_once_and_decays_down_with_time() -> None:
    e = PeakEwma(decay_s=10.0)
    e.update(1.0, 0.0)
    e.update(5.0, 1.0)
    assert e.value == 5.0
    e.update(1.0, 11.0)  # 10 s later: weight of the old value e^-1
    assert e.value == pytest.approx(5.0 * math.exp(-1) + 1.0 * (1 - math.exp(-1)))


@pytest.mark.parametrize(
    ("events", "now", "rate"),
    [
        ([], 0.0, 1.0),
        ([(True, 0.0)] * 9, 1.0, 1.0),
        ([(True, 0.0)] * 8 + [(False, 0.0)] * 2, 1.0, 9 / 11),
        ([(False, 0.0)] * 5, 31.0, 1.0),  # older than the 30 s window: forgotten
        ([(False, 0.0)] * 5 + [(True, 20.0)] * 4, 33.0, 5 / 5),
    ],
)
def test_success_window(events: list[tuple[bool, float]], now: float, rate: float) -> None:
    w = SuccessWindow(30.0, 6)
    for ok, t in events:
        w.record(ok, t)
    assert w.rate(now) == pytest.approx(rate)


def test_attempt_events_drive_in_flight_latency_and_success() -> None:
    clock = Clock()
    live = stats(clock)
    live.attempt_started(AttemptStart("r1", "chat", "llm", "a", 1, 5))
    live.attempt_started(AttemptStart("r2", "chat", "llm", "a", 1, 5))
    assert live.get("chat/a").in_flight == 2
    clock.t += 0.4
    live.attempt_ended(AttemptEnd("r1", "chat", "llm", "a", 1, 0.4, None, TokenUsage(10, 20), 0.002))
    live.attempt_ended(AttemptEnd("r2", "chat", "llm", "a", 1, 0.1, ErrorKind.RETRYABLE))
    s = live.get("chat/a")
    assert s.in_flight == 0
    assert s.latency.value == 0.4 and s.mean_latency.value == 0.4  # the fast failure is no latency sample
    assert s.per_token.value == pytest.approx(0.02)
    assert s.success_rate(clock()) == pytest.approx(2 / 3)
    assert s.cost_usd == 0.002 and (s.completed, s.failed) == (1, 1)


@pytest.mark.parametrize(
    ("kind", "counts"), [(ErrorKind.CLIENT, False), (ErrorKind.CONTEXT_LENGTH, False), (ErrorKind.CONNECT, True),
                         (ErrorKind.RATE_LIMITED, True), (ErrorKind.TIMEOUT, True), (ErrorKind.AUTH, True)],
)
def test_only_endpoint_faults_count_against_an_endpoint(kind: ErrorKind, counts: bool) -> None:
    live = stats()
    complete(live, "s/a", 0.2, error=kind)
    assert (live.get("s/a").success_rate(live.clock()) < 1.0) is counts


def test_a_timeout_is_a_latency_sample_other_failures_are_not() -> None:
    live = stats()
    complete(live, "s/a", 0.002, error=ErrorKind.CONNECT)
    assert live.get("s/a").latency.value is None
    complete(live, "s/a", 30.0, error=ErrorKind.TIMEOUT)
    assert live.get("s/a").latency.value == 30.0


def test_expected_latency_per_token_ttft_and_whole_request() -> None:
    live = stats()
    complete(live, "s/a", 2.0, tokens=100, ttft_s=0.5)
    s = live.get("s/a")
    assert s.expected_latency(Request(stream=True, output_tokens=10), 0.0) == 0.5
    assert s.expected_latency(Request(output_tokens=200), 0.0) == pytest.approx(0.5 + 0.015 * 200)
    assert s.expected_latency(Request(), 0.0) == 2.0
    assert live.get("s/b").expected_latency(Request(), 0.0) is None


def test_stall_factor_sees_a_black_hole_before_any_timeout() -> None:
    clock = Clock()
    live = stats(clock)
    complete(live, "s/a", 1.0, n=10)
    s = live.get("s/a")
    occupy(live, "s/a", 8)
    assert s.stall_factor(clock(), 1.0) == 1.0
    clock.t += 2.0  # 8 in flight at ~1 s each, no answer for 2 s: 8 x 2 / (1 x 4) = 4
    assert s.stall_factor(clock(), 1.0) == pytest.approx(4.0)
    clock.t += OVERDUE * 1.0 - 2.0 + 0.01
    assert s.overdue(clock()) == 8
    assert s.success_rate(clock()) == pytest.approx(11 / 19)


def test_slow_start_ramps_linearly_from_the_floor() -> None:
    clock = Clock(0.0)
    live = LiveStats(clock, StatsConfig(slow_start_s=10.0, slow_start_min=0.1))
    live.get("s/a")
    ramp = []
    for t in (0.0, 0.5, 5.0, 10.0, 60.0):
        clock.t = t
        ramp.append(live.slow_start("s/a", t))
    assert ramp == pytest.approx([0.1, 0.1, 0.5, 1.0, 1.0])


def test_stats_survive_a_snapshot_swap_for_endpoints_that_persist() -> None:
    live = stats()
    complete(live, "chat/a", 0.3)
    complete(live, "chat/b", 0.3)
    live.retain({"chat/a", "chat/c"})
    assert live.known("chat/a") and not live.known("chat/b")
    assert live.get("chat/a").latency.value == 0.3


def _start(live: LiveStats, key: str, rid: str) -> None:
    service, endpoint = key.split("/", 1)
    live.attempt_started(AttemptStart(rid, service, "llm", endpoint, 1, 5))


def _end(live: LiveStats, key: str, rid: str, latency_s: float, error: ErrorKind | None = None) -> None:
    service, endpoint = key.split("/", 1)
    live.attempt_ended(AttemptEnd(rid, service, "llm", endpoint, 1, latency_s, error, TokenUsage(10, 10)))


def test_late_successes_after_a_failure_streak_are_held_until_a_newer_attempt_succeeds() -> None:
    """A provider that answers 503 to every new call while the calls it took before keep
    finishing: those late successes must not lift its rate back over the bound; the first
    success of a call sent after the streak releases them (the streak was noise)."""
    clock = Clock()
    live = stats(clock)
    for i in range(10):  # in service before the fault
        _start(live, "s/a", f"old{i}")
    clock.t += 0.1
    for i in range(STREAK):  # the fault: every new call fails at once
        _start(live, "s/a", f"new{i}")
        _end(live, "s/a", f"new{i}", 0.01, ErrorKind.RETRYABLE)
    clock.t += 1.0
    for i in range(10):
        _end(live, "s/a", f"old{i}", 1.1)
    s = live.get("s/a")
    assert s.window.counts(clock()) == (0, STREAK)  # held, not counted
    assert s.held == 10 and s.failing_now()
    _start(live, "s/a", "probe")
    assert not s.failing_now()  # a newer attempt is in flight: it will tell
    clock.t += 0.5
    _end(live, "s/a", "probe", 0.5)
    assert s.window.counts(clock()) == (11, STREAK) and s.held == 0 and s.failing == 0


def test_a_failure_or_two_among_calls_in_service_holds_nothing() -> None:
    clock = Clock()
    live = stats(clock)
    for i in range(5):
        _start(live, "s/a", f"old{i}")
    for i in range(STREAK - 1):
        _start(live, "s/a", f"bad{i}")
        _end(live, "s/a", f"bad{i}", 0.01, ErrorKind.RETRYABLE)
    for i in range(5):
        _end(live, "s/a", f"old{i}", 1.0)
    s = live.get("s/a")
    assert s.window.counts(clock()) == (5, STREAK - 1) and s.held == 0 and not s.failing_now()


def test_held_successes_older_than_the_window_are_dropped_not_released() -> None:
    clock = Clock()
    live = stats(clock)
    _start(live, "s/a", "old")
    for i in range(STREAK):
        _start(live, "s/a", f"bad{i}")
        _end(live, "s/a", f"bad{i}", 0.01, ErrorKind.RETRYABLE)
    _end(live, "s/a", "old", 1.0)
    clock.t += live.config.window_s + 1
    complete(live, "s/a", 0.2)
    assert live.get("s/a").window.counts(clock()) == (1, 0)


def test_failures_of_attempts_sent_before_a_success_start_no_streak() -> None:
    """By send time: long calls that time out after a newer call already succeeded say nothing
    about what the endpoint does with new calls; they count against its rate, not as a streak."""
    clock = Clock()
    live = stats(clock)
    for i in range(STREAK):  # long calls in service
        _start(live, "s/a", f"long{i}")
    clock.t += 0.5
    _start(live, "s/a", "short")
    clock.t += 0.1
    _end(live, "s/a", "short", 0.1)
    clock.t += 5.0
    for i in range(STREAK):
        _end(live, "s/a", f"long{i}", 5.6, ErrorKind.TIMEOUT)
    s = live.get("s/a")
    assert s.window.counts(clock()) == (1, STREAK)  # they still count against its rate
    assert s.failing == 0 and not s.failing_now()
    _start(live, "s/a", "after")  # a failure sent after the success does extend a streak
    _end(live, "s/a", "after", 0.01, ErrorKind.RETRYABLE)
    assert s.failing == 1
