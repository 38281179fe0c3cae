"""The retry decision after a failed attempt: fail over now, retry after a delay, or give up. Pure.

Rules, in order (the first that applies wins):

1. the error is not retryable (CLIENT, AUTH, CONTEXT_LENGTH, CONFIG)   -> give up NOT_RETRYABLE
2. `attempts > policy.max_retries` (attempts = 1 + retries so far)     -> give up ATTEMPTS
3. less than `min_attempt_s` left before the deadline                  -> give up DEADLINE
4. an untried endpoint other than the failed one is usable now         -> FAILOVER to those
   delay: 0 after CONNECT or RATE_LIMITED (the fault is that endpoint's), 0 on the first
   retry, else backoff(attempts - 1): several endpoints failing in one call hints at a
   provider-wide fault, where spacing the attempts out helps it recover.
5. otherwise every usable endpoint e waits w(e):
       untried e:  w = hold(e)                          (its Retry-After, if any)
       tried e:    w = max(backoff(attempts), hold(e))  (the failed one's hold includes the
                                                         error's retry_after_s)
   TIMEOUT is not retried on an endpoint that just timed out. With w* = min w(e):
       no usable endpoint                        -> give up NO_ENDPOINT
       w* + min_attempt_s > remaining            -> give up RETRY_AFTER_PAST_DEADLINE when a
                                                    Retry-After hold is what pushes it past,
                                                    else DEADLINE
       else RETRY_AFTER w* on the endpoints with w(e) <= w*
6. the retry costs `cost` budget units (0 for a CONNECT failover, see `budget`); when the
   budget has less than that                                            -> give up BUDGET

Retry-After is never undercut: an endpoint with a hold is not offered before it expires.
`delay_s` is clamped to leave at least `min_attempt_s` for the attempt itself.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.resilience.backoff import BackoffPolicy

MIN_ATTEMPT_S = 0.1


class Action(str, Enum):
    FAILOVER = "failover"  # another endpoint of the same service
    RETRY_AFTER = "retry_after"  # after `delay_s`, on `endpoints` (may be the same one)
    GIVE_UP = "give_up"


class GiveUp(str, Enum):
    NOT_RETRYABLE = "not_retryable"
    ATTEMPTS = "attempts_exhausted"
    DEADLINE = "deadline"
    RETRY_AFTER_PAST_DEADLINE = "retry_after_past_deadline"
    NO_ENDPOINT = "no_endpoint"
    BUDGET = "retry_budget"


@dataclass(frozen=True)
class Failure:
    """The attempt that just failed."""

    endpoint: str
    error: ErrorKind
    retry_after_s: float | None = None


@dataclass(frozen=True)
class RetryState:
    """Where the call stands. `usable` maps every endpoint of the service the next attempt
    could use (not breaker-blocked, not ejected, not draining) to its hold: seconds until it
    may be called (0 = now). `tried` holds the endpoint ids already attempted in this call."""

    attempts: int
    remaining_s: float
    usable: Mapping[str, float]
    tried: Collection[str]
    budget_available: float = float("inf")
    previous_delay_s: float = 0.0


@dataclass(frozen=True)
class RetryDecision:
    action: Action
    delay_s: float = 0.0
    endpoints: frozenset[str] = frozenset()  # the next attempt picks among these
    cost: float = 0.0  # budget units to spend when acting on it
    give_up: GiveUp | None = None
    reason: str = ""
    # True when `endpoints` includes one not yet tried: count a "failover", else a "retry".
    new_endpoint: bool = False


def _give_up(why: GiveUp, reason: str) -> RetryDecision:
    return RetryDecision(Action.GIVE_UP, give_up=why, reason=reason)


def decide(
    failure: Failure,
    state: RetryState,
    policy: BackoffPolicy,
    rng: random.Random,
    min_attempt_s: float = MIN_ATTEMPT_S,
) -> RetryDecision:
    """What to do after `failure` (see the module docstring for the rules)."""
    kind = failure.error
    if not kind.retryable:
        return _give_up(GiveUp.NOT_RETRYABLE, f"{kind.value} errors are not retried")
    if state.attempts > policy.max_retries:
        return _give_up(GiveUp.ATTEMPTS, f"{state.attempts} attempts made, max_retries is {policy.max_retries}")
    if state.remaining_s < min_attempt_s:
        return _give_up(GiveUp.DEADLINE, f"{state.remaining_s:.3f} s left before the deadline")
    decision = (_failover(failure, state, policy, rng, min_attempt_s)
                or _wait(failure, state, policy, rng, min_attempt_s))
    if decision.action is not Action.GIVE_UP and decision.cost > state.budget_available:
        return _give_up(GiveUp.BUDGET, "the service's retry budget is spent")
    return decision


def _failover(failure: Failure, state: RetryState, policy: BackoffPolicy, rng: random.Random,
              min_attempt_s: float) -> RetryDecision | None:
    ready = frozenset(e for e, hold in state.usable.items()
                      if hold <= 0 and e not in state.tried and e != failure.endpoint)
    if not ready:
        return None
    immediate = failure.error in (ErrorKind.CONNECT, ErrorKind.RATE_LIMITED) or state.attempts <= 1
    delay = 0.0 if immediate else policy.delay(state.attempts - 1, rng, state.previous_delay_s)
    delay = min(delay, max(0.0, state.remaining_s - min_attempt_s))
    cost = 0.0 if failure.error is ErrorKind.CONNECT else 1.0
    return RetryDecision(Action.FAILOVER, delay, ready, cost, reason=f"{failure.error.value} on {failure.endpoint}",
                         new_endpoint=True)


def _wait(failure: Failure, state: RetryState, policy: BackoffPolicy, rng: random.Random,
          min_attempt_s: float) -> RetryDecision:
    backoff = policy.delay(state.attempts, rng, state.previous_delay_s)
    waits: dict[str, tuple[float, bool]] = {}  # endpoint -> (wait, held by Retry-After)
    for endpoint, hold in state.usable.items():
        if endpoint == failure.endpoint:
            if failure.error is ErrorKind.TIMEOUT:
                continue
            hold = max(hold, failure.retry_after_s or 0.0)
        tried = endpoint in state.tried or endpoint == failure.endpoint
        wait = max(backoff, hold) if tried else max(0.0, hold)
        waits[endpoint] = (wait, hold > 0 and hold >= backoff)
    if not waits:
        return _give_up(GiveUp.NO_ENDPOINT,
                        f"no usable endpoint left after {failure.error.value} on {failure.endpoint}")
    best = min(w for w, _ in waits.values())
    if best + min_attempt_s > state.remaining_s:
        held = all(h for w, h in waits.values() if w == best)
        why = GiveUp.RETRY_AFTER_PAST_DEADLINE if held else GiveUp.DEADLINE
        return _give_up(why, f"the next attempt could start in {best:.3f} s, {state.remaining_s:.3f} s remain")
    chosen = frozenset(e for e, (w, _) in waits.items() if w <= best)
    has_new = any(e not in state.tried and e != failure.endpoint for e in chosen)
    return RetryDecision(Action.RETRY_AFTER, best, chosen, 1.0, reason=f"{failure.error.value} on {failure.endpoint}",
                         new_endpoint=has_new)
