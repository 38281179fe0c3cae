"""What one attempt's outcome says about the endpoint's health. Pure.

The breaker and outlier ejection both need to know whether an attempt's outcome is evidence
that the *endpoint* is sick. The adapter's `ErrorKind` answers a different question (should
the *call* be retried), so the mapping lives here, once:

| outcome                     | signal    | why |
| --------------------------- | --------- | --- |
| success                     | SUCCESS   | |
| CLIENT, CONTEXT_LENGTH      | NEUTRAL   | the request was at fault: the caller's own mistake counts nowhere |
| RETRYABLE (5xx, reset)      | FAILURE   | the endpoint is failing |
| CONNECT                     | FAILURE   | the endpoint is unreachable ("gateway" failure) |
| TIMEOUT                     | FAILURE   | the endpoint is too slow or hung ("gateway" failure) |
| RATE_LIMITED (429)          | THROTTLED | healthy but over quota: move traffic away for Retry-After, never trip |
| AUTH (401/403)              | NEUTRAL   | a wrong key is a configuration fault; tripping would hide it behind 503s |
| CONFIG                      | NEUTRAL   | the agent could not make the call; the endpoint was never asked |

429 deliberately does not trip: a provider that rate-limits is protecting itself and says
for how long (Retry-After). Tripping would add a second, longer and unrelated open time and
count quota exhaustion as an outage in the trip metrics. Instead THROTTLED holds the
endpoint out of selection until Retry-After passes (see `CircuitBreaker.record`), which moves
traffic exactly as long as the provider asked.

A caller's own mistake (CLIENT, CONTEXT_LENGTH) is NEUTRAL rather than SUCCESS: counted as a
success, one tenant's stream of malformed requests would dilute a sick endpoint's failure rate
and reset its run of consecutive failures, hiding it from the breaker for every other tenant.
A TIMEOUT that is the caller's own shortened deadline running out is no outcome at all
(`AttemptController.callers_timeout`), as for a caller that went away.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

from switchgear.adapters.base import ErrorKind


class Signal(str, Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    THROTTLED = "throttled"
    NEUTRAL = "neutral"


_SIGNALS: Mapping[ErrorKind, Signal] = MappingProxyType({
    ErrorKind.CLIENT: Signal.NEUTRAL,
    ErrorKind.CONTEXT_LENGTH: Signal.NEUTRAL,
    ErrorKind.RETRYABLE: Signal.FAILURE,
    ErrorKind.CONNECT: Signal.FAILURE,
    ErrorKind.TIMEOUT: Signal.FAILURE,
    ErrorKind.RATE_LIMITED: Signal.THROTTLED,
    ErrorKind.AUTH: Signal.NEUTRAL,
    ErrorKind.CONFIG: Signal.NEUTRAL,
})

#: Failures that mean "the endpoint could not be reached or did not answer" (Envoy's
#: gateway failures), as opposed to an answer that was a server error.
GATEWAY_FAILURES = frozenset({ErrorKind.CONNECT, ErrorKind.TIMEOUT})


def signal_of(error: ErrorKind | None) -> Signal:
    """The health signal of one attempt; `error` is None for a success."""
    return Signal.SUCCESS if error is None else _SIGNALS[error]
