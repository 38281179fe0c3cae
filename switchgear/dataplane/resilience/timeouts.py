"""Adaptive per-attempt timeouts: how long one attempt on one endpoint may run. Pure.

A call has a deadline (the caller's timeout, else the service's, else the agent's default).
Without a shorter bound per attempt, an attempt on a hung endpoint — one that read the request
and never answers — holds its caller until that whole deadline, although another endpoint
would have answered in milliseconds. So each attempt gets its own timeout, derived from the
endpoint's *own* recent latency:

    t = clamp(factor x max(p99, expected), floor_s, ceiling_s)       once samples >= min_samples
    t = ceiling_s                                                      before that
    attempt timeout = min(t, what is left of the call's deadline)

where p99 is the 99th percentile of the endpoint's last successful answers (whole answers for
unary calls, time to first token for streams) and `expected` this request's own estimate when
it asks for a number of output tokens (time to first token + the endpoint's peak seconds per
output token x `max_tokens`), so a call that asks for 4,000 tokens is not cut off at a bound
learnt from 50-token answers (a call that asks for nothing in particular is like the answers
the p99 was taken over). An expired
attempt is abandoned (its connection closed) and counts as a TIMEOUT of that endpoint; the
call fails over while its retry budget and deadline allow.

A streamed attempt has two bounds: the one above on its first token, then `gap_s` between
two chunks (at least `factor` x the endpoint's peak seconds per token) — a stream that
stalls mid-answer ends with an error instead of holding the caller to the deadline.

How the defaults are chosen (`DEFAULT_TIMEOUTS`, per category): they must never cut off a
slow *legitimate* call, so the adaptive part only ever shortens the wait for an endpoint that
has shown, over `min_samples` answers, what normal looks like; the floor is several times the
slowest normal answer of the category (an LLM completion: seconds, a document parse: a minute),
so a burst of long completions is not mistaken for a hang; the ceiling is what an attempt may
take before the data seen says anything (a long completion: 2 minutes; a document: 10).
`factor` 4 over p99 leaves room for the tail without waiting for ten times it. A route's
category policy overrides floor, ceiling and factor (config `scheduling_policies.<category>.
attempt_timeout_floor / attempt_timeout_ceiling / attempt_timeout_factor`).
"""

from __future__ import annotations

from switchgear.wire.attempt_policy import DEFAULT_TIMEOUTS, FALLBACK_TIMEOUTS, AttemptTimeouts, timeouts_for

__all__ = ("DEFAULT_TIMEOUTS", "FALLBACK_TIMEOUTS", "AttemptTimeouts", "attempt_timeout", "gap_timeout",
           "timeouts_for")


def attempt_timeout(policy: AttemptTimeouts, p99_s: float | None, samples: int,
                    expected_s: float | None = None) -> float:
    """Seconds one attempt may take on an endpoint (before the call's deadline caps it):
    clamp(factor x max(p99, expected), floor, ceiling) once the endpoint has `min_samples`
    answers, else the ceiling."""
    if p99_s is None or samples < policy.min_samples:
        return policy.ceiling_s
    t = policy.factor * max(p99_s, expected_s or 0.0)
    return min(policy.ceiling_s, max(policy.floor_s, t))


def gap_timeout(policy: AttemptTimeouts, per_token_s: float | None) -> float:
    """Seconds a committed stream may stay silent between two chunks:
    min(ceiling, max(gap_s, factor x peak seconds per token))."""
    return min(policy.ceiling_s, max(policy.gap_s, policy.factor * (per_token_s or 0.0)))
