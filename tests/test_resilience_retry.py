"""Backoff, Retry-After, the retry decision and the retry budget: tables, explicit clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.resilience.backoff import BackoffPolicy, policy_for
from switchgear.dataplane.resilience.budget import BudgetSettings, RetryBudget, RetryBudgets
from switchgear.dataplane.resilience.retry import Action, Failure, GiveUp, RetryState, decide
from switchgear.dataplane.snapshot import RetrySettings

E = ErrorKind


class Top(random.Random):
    """uniform(a, b) -> b: the jitter's upper bound, to make delays exact in tables."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize(
    ("strategy", "retry", "ceiling"),
    [
        ("exponential", 1, 0.2), ("exponential", 2, 0.4), ("exponential", 4, 1.6), ("exponential", 5, 2.0),
        ("exponential", 500, 2.0),  # no overflow
        ("linear", 1, 0.2), ("linear", 3, pytest.approx(0.6)), ("linear", 20, 2.0),
        ("fixed", 1, 0.2), ("fixed", 9, 0.2),
    ],
)
def test_backoff_ceiling(strategy: str, retry: int, ceiling: float) -> None:
    assert BackoffPolicy(strategy, 0.2, 2.0).ceiling(retry) == ceiling


def test_full_jitter_is_bounded_by_the_ceiling() -> None:
    policy = BackoffPolicy("exponential", 0.2, 2.0, jitter="full")
    rng = random.Random(7)
    delays = [policy.delay(3, rng) for _ in range(200)]
    assert all(0 <= d <= 0.8 for d in delays) and max(delays) > 0.6 and min(delays) < 0.2
    assert policy.delay(3, Top()) == pytest.approx(0.8)
    assert BackoffPolicy(jitter="none").delay(2, rng) == pytest.approx(0.4)


@given(prev=st.floats(0, 10), seed=st.integers(0, 2**32))
def test_decorrelated_jitter_stays_within_base_and_cap(prev: float, seed: int) -> None:
    policy = BackoffPolicy("exponential", 0.2, 2.0, jitter="decorrelated")
    assert 0.2 <= policy.delay(1, random.Random(seed), prev) <= 2.0


@pytest.mark.parametrize(
    ("category", "configured", "expected"),
    [
        ("llm", None, BackoffPolicy("exponential", 0.2, 2.0)),
        ("llm", RetrySettings(), BackoffPolicy("exponential", 0.2, 2.0, max_retries=3)),  # delays not set
        # The seed's values equal no default of ours any more: written, they apply as written.
        ("llm", RetrySettings(3, "exponential", 1.0, 30.0), BackoffPolicy("exponential", 1.0, 30.0, max_retries=3)),
        ("llm", RetrySettings(3, "exponential", 0.5, 0.0), BackoffPolicy("exponential", 0.5, 2.0, max_retries=3)),
        ("llm", RetrySettings(3, "exponential", 5.0, 0.0), BackoffPolicy("exponential", 5.0, 5.0, max_retries=3)),
        ("document", RetrySettings(3, "fixed", 0.0, 4.0), BackoffPolicy("fixed", 1.0, 4.0, max_retries=3)),
        ("embedding", RetrySettings(max_retries=1), BackoffPolicy("exponential", 0.1, 1.0, max_retries=1)),
        ("document", None, BackoffPolicy("exponential", 1.0, 10.0)),
        ("llm", RetrySettings(2, "linear", 0.5, 4.0), BackoffPolicy("linear", 0.5, 4.0, max_retries=2)),
        ("llm", RetrySettings(2, "bogus", 0.5, 0.1), BackoffPolicy("exponential", 0.5, 0.5, max_retries=2)),
        ("unknown", None, BackoffPolicy("exponential", 0.2, 2.0)),
    ],
)
def test_policy_for(category: str, configured: RetrySettings | None, expected: BackoffPolicy) -> None:
    assert policy_for(category, configured) == expected


P = BackoffPolicy("exponential", 0.2, 2.0, jitter="none", max_retries=3)


def state(attempts: int = 1, remaining: float = 10.0, usable: dict[str, float] | None = None,
          tried: tuple[str, ...] = ("a",), budget: float = 100.0) -> RetryState:
    return RetryState(attempts, remaining, {"a": 0.0, "b": 0.0} if usable is None else usable, tried, budget)


@pytest.mark.parametrize(
    ("failure", "st_", "action", "delay", "endpoints", "give_up"),
    [
        # not retryable
        (Failure("a", E.CLIENT), state(), Action.GIVE_UP, 0.0, set(), GiveUp.NOT_RETRYABLE),
        (Failure("a", E.AUTH), state(), Action.GIVE_UP, 0.0, set(), GiveUp.NOT_RETRYABLE),
        (Failure("a", E.CONTEXT_LENGTH), state(), Action.GIVE_UP, 0.0, set(), GiveUp.NOT_RETRYABLE),
        # limits
        (Failure("a", E.RETRYABLE), state(attempts=4), Action.GIVE_UP, 0.0, set(), GiveUp.ATTEMPTS),
        (Failure("a", E.RETRYABLE), state(remaining=0.05), Action.GIVE_UP, 0.0, set(), GiveUp.DEADLINE),
        # another endpoint: at once on the first retry, and after connect errors / 429s
        (Failure("a", E.RETRYABLE), state(), Action.FAILOVER, 0.0, {"b"}, None),
        (Failure("a", E.CONNECT), state(attempts=3, usable={"a": 0, "b": 0, "c": 0}, tried=("a", "x")),
         Action.FAILOVER, 0.0, {"b", "c"}, None),
        (Failure("a", E.RATE_LIMITED, 5.0), state(attempts=2, usable={"a": 5.0, "b": 0, "c": 0}, tried=("a", "c")),
         Action.FAILOVER, 0.0, {"b"}, None),
        # a 5xx on the second endpoint of the call: back off before the third (backoff(1) = 0.2)
        (Failure("b", E.RETRYABLE), state(attempts=2, usable={"a": 0, "b": 0, "c": 0}, tried=("a", "b")),
         Action.FAILOVER, 0.2, {"c"}, None),
        # no other endpoint: same endpoint after backoff(attempts)
        (Failure("a", E.RETRYABLE), state(usable={"a": 0.0}), Action.RETRY_AFTER, 0.2, {"a"}, None),
        (Failure("a", E.RETRYABLE), state(attempts=3, usable={"a": 0.0}), Action.RETRY_AFTER, 0.8, {"a"}, None),
        # Retry-After is never undercut, and wins over a shorter backoff
        (Failure("a", E.RETRYABLE, 1.5), state(usable={"a": 0.0}), Action.RETRY_AFTER, 1.5, {"a"}, None),
        (Failure("a", E.RATE_LIMITED, 3.0), state(usable={"a": 3.0}), Action.RETRY_AFTER, 3.0, {"a"}, None),
        # Retry-After beyond the deadline: do not retry that endpoint...
        (Failure("a", E.RATE_LIMITED, 30.0), state(usable={"a": 30.0}), Action.GIVE_UP, 0.0, set(),
         GiveUp.RETRY_AFTER_PAST_DEADLINE),
        # ...prefer another one immediately
        (Failure("a", E.RATE_LIMITED, 30.0), state(usable={"a": 30.0, "b": 0.0}), Action.FAILOVER, 0.0, {"b"}, None),
        # everything tried: the soonest endpoint wins (b's hold 0.5 < a's 2.0)
        (Failure("a", E.RETRYABLE, 2.0), state(attempts=2, usable={"a": 0.0, "b": 0.5}, tried=("a", "b")),
         Action.RETRY_AFTER, 0.5, {"b"}, None),
        # an untried but throttled endpoint: wait only its hold
        (Failure("a", E.RETRYABLE), state(attempts=3, usable={"a": 0.0, "b": 0.1}, tried=("a",)),
         Action.RETRY_AFTER, 0.1, {"b"}, None),
        # timeouts are not retried on the endpoint that timed out
        (Failure("a", E.TIMEOUT), state(usable={"a": 0.0}), Action.GIVE_UP, 0.0, set(), GiveUp.NO_ENDPOINT),
        (Failure("a", E.RETRYABLE), state(usable={}), Action.GIVE_UP, 0.0, set(), GiveUp.NO_ENDPOINT),
        # backoff past the deadline
        (Failure("a", E.RETRYABLE), state(attempts=3, remaining=0.5, usable={"a": 0.0}), Action.GIVE_UP, 0.0, set(),
         GiveUp.DEADLINE),
        # budget: a 5xx retry costs 1, a connect failover is free
        (Failure("a", E.RETRYABLE), state(budget=0.5), Action.GIVE_UP, 0.0, set(), GiveUp.BUDGET),
        (Failure("a", E.CONNECT), state(budget=0.0), Action.FAILOVER, 0.0, {"b"}, None),
        (Failure("a", E.CONNECT), state(usable={"a": 0.0}, budget=0.0), Action.GIVE_UP, 0.0, set(), GiveUp.BUDGET),
    ],
)
def test_decide(failure: Failure, st_: RetryState, action: Action, delay: float, endpoints: set[str],
                give_up: GiveUp | None) -> None:
    d = decide(failure, st_, P, Top())
    assert (d.action, d.give_up, set(d.endpoints)) == (action, give_up, endpoints), d.reason
    assert d.delay_s == pytest.approx(delay)
    assert d.reason


def test_decision_counts_failover_or_retry() -> None:
    assert decide(Failure("a", E.RETRYABLE), state(), P, Top()).new_endpoint
    assert not decide(Failure("a", E.RETRYABLE), state(usable={"a": 0.0}), P, Top()).new_endpoint
    assert decide(Failure("a", E.CONNECT), state(), P, Top()).cost == 0.0


def test_failover_delay_leaves_time_for_the_attempt() -> None:
    slow = BackoffPolicy("fixed", 5.0, 5.0, jitter="none", max_retries=5)
    d = decide(Failure("b", E.RETRYABLE), state(attempts=2, remaining=1.0, usable={"c": 0.0}, tried=("a", "b")),
               slow, Top())
    assert d.action is Action.FAILOVER and d.delay_s == pytest.approx(0.9)


B = BudgetSettings(ratio=0.2, min_retries_per_s=0.5, window_s=10.0, buckets=10)


@pytest.mark.parametrize(
    ("requests", "retries", "allowed"),
    [
        (0, 10, 5),  # floor: 0.5/s * 10 s
        (10, 10, 7),  # 5 + 0.2 * 10
        (100, 40, 25),
        (1000, 300, 205),
    ],
)
def test_budget_caps_retries(requests: int, retries: int, allowed: int) -> None:
    budget = RetryBudget(B)
    for _ in range(requests):
        budget.record_request(1.0)
    granted = sum(budget.spend(1.0) for _ in range(retries))
    assert granted == min(retries, allowed)


def test_budget_window_slides_and_free_retries_cost_nothing() -> None:
    budget = RetryBudget(B)
    assert sum(budget.spend(0.0) for _ in range(10)) == 5
    assert budget.spend(5.0, 0.0)  # a connect failover is free
    assert not budget.spend(9.9)
    assert budget.available(10.5) == pytest.approx(0.0)  # the [0, 1) bucket still overlaps the window
    assert budget.available(11.0) == pytest.approx(5.0)  # ...and then leaves it
    assert RetryBudgets(B).get("x") is not RetryBudgets(B).get("x")
    budgets = RetryBudgets(B)
    assert budgets.get("x") is budgets.get("x")


@given(
    kind=st.sampled_from(list(ErrorKind)),
    retry_after=st.none() | st.floats(0, 20),
    attempts=st.integers(1, 5),
    remaining=st.floats(0, 30),
    holds=st.dictionaries(st.sampled_from("abcd"), st.floats(0, 10), max_size=4),
    tried=st.sets(st.sampled_from("abcd")),
    budget=st.floats(0, 3),
    seed=st.integers(0, 2**16),
)
def test_decisions_never_undercut_retry_after_nor_overrun_the_deadline(
    kind: ErrorKind, retry_after: float | None, attempts: int, remaining: float, holds: dict[str, float],
    tried: set[str], budget: float, seed: int,
) -> None:
    st_ = RetryState(attempts, remaining, holds, tried | {"a"}, budget)
    d = decide(Failure("a", kind, retry_after), st_, P, random.Random(seed))
    if d.action is Action.GIVE_UP:
        assert d.give_up is not None and not d.endpoints
        return
    assert kind.retryable and attempts <= P.max_retries and d.cost <= budget
    assert d.endpoints and d.endpoints <= set(holds)
    assert d.delay_s >= 0 and d.delay_s + 0.1 <= remaining + 1e-9
    for e in d.endpoints:
        assert holds[e] <= d.delay_s + 1e-9  # no endpoint is offered before its hold ends
        if e == "a":
            assert (retry_after or 0) <= d.delay_s + 1e-9 and kind is not ErrorKind.TIMEOUT
