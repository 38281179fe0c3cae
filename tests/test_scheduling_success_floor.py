"""The success-rate floor (filters.min_success, stats.EndpointStats.below) is a test, not a
point estimate: one random failure among few samples does not disqualify an endpoint, failures
improbable at the floor do, and a streak of fast failures still does at once."""

from __future__ import annotations

import math

import pytest

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.scheduling import filters
from switchgear.dataplane.scheduling.model import Bounds
from switchgear.dataplane.scheduling.stats import FAILING, LiveStats, failures_tail
from tests.scheduling_helpers import Clock, cand, complete, ctx, names, stats

A, B = cand("a"), cand("b")
LLM = Bounds(min_success_rate=0.95)


def kept(live: LiveStats) -> list[str]:
    return names(filters.min_success((A, B), ctx(live, bounds=LLM)))


@pytest.mark.parametrize(("k", "n", "q"), [(1, 1, 0.05), (2, 2, 0.05), (3, 9, 0.05), (2, 10, 0.05),
                                          (16, 300, 0.05), (5, 40, 0.01), (0, 5, 0.05), (7, 6, 0.05)])
def test_failures_tail_is_the_binomial_upper_tail(k: int, n: int, q: float) -> None:
    exact = sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k, n + 1))
    assert failures_tail(k, n, q) == pytest.approx(exact, rel=1e-6, abs=1e-15)


def test_one_failure_in_a_fresh_window_does_not_disqualify() -> None:
    """Back from being blocked (its window starts afresh), an endpoint's first answer is one
    of the random failures every provider has: a rate of 1/2 on the point estimate, which
    kept it out for the window's 30 s."""
    clock = Clock()
    live = stats(clock)
    complete(live, "s/a", 0.5, n=100)
    live.unblocked("s/a", clock())
    complete(live, "s/a", 0.5, error=ErrorKind.RETRYABLE)
    assert live.get("s/a").success_rate(clock()) == pytest.approx(0.5)
    assert kept(live) == ["a", "b"]
    complete(live, "s/a", 0.5, n=20)
    clock.t += 1.0
    complete(live, "s/a", 0.5, error=ErrorKind.RETRYABLE)  # 2 of 22: a rate of 21/23 reads 0.91
    assert live.get("s/a").success_rate(clock()) < LLM.min_success_rate
    assert kept(live) == ["a", "b"]


def test_failures_improbable_at_the_floor_disqualify() -> None:
    clock = Clock()
    live = stats(clock)
    for _ in range(3):  # 3 failures in 9, none two in a row: P = 0.008 at a true rate of 0.95
        complete(live, "s/a", 0.5, n=2)
        clock.t += 0.1
        complete(live, "s/a", 0.5, error=ErrorKind.RETRYABLE)
    assert live.get("s/a").failing < FAILING
    assert kept(live) == ["b"]


def test_a_streak_of_fast_failures_still_disqualifies_as_soon_as_the_rate_drops() -> None:
    """A provider that starts failing every new call (a 503 each) is judged on the point
    estimate, as before: 200 successes then 10 failures read 201/211 >= 0.95, 11 read below."""
    clock = Clock()
    live = stats(clock)
    complete(live, "s/a", 0.5, n=200)
    clock.t += 0.1
    complete(live, "s/a", 0.01, error=ErrorKind.RETRYABLE, n=10)
    assert kept(live) == ["a", "b"]
    complete(live, "s/a", 0.01, error=ErrorKind.RETRYABLE)
    assert kept(live) == ["b"]
