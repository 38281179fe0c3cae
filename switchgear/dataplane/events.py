"""What the request path tells the rest of the agent about each upstream attempt.

Observers (live routing statistics, load reports, metrics, traces) subscribe to attempts
instead of being wired into the request path one by one. Calls are synchronous, on the event
loop, and must be cheap: no I/O, no logging at INFO.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from switchgear.adapters.base import ErrorKind, TokenUsage
from switchgear.wire.lean import lean


@lean
@dataclass(frozen=True)
class AttemptStart:
    request_id: str
    service: str
    category: str
    endpoint: str
    attempt: int  # 1-based within the call
    priority: int


@lean
@dataclass(frozen=True)
class AttemptEnd:
    """One attempt's outcome. `error` is None on success; `latency_s` is the attempt's own time;
    `ttft_s` is the time to the first token for streams (None otherwise). `cancelled`: the
    attempt was abandoned before its answer — a hedge that lost, or a caller that went away —
    so it says nothing about the endpoint: observers end its in-flight count and record no
    outcome, latency, usage or cost. On success, `answer` is what the upstream said (a unary
    answer's body; a stream's first chunk, which names its id and model) and `finish_reason`
    a stream's (a unary answer's is in its body): traces read the response's model, id and
    finish reasons from them, only for sampled spans."""

    request_id: str
    service: str
    category: str
    endpoint: str
    attempt: int
    latency_s: float
    error: ErrorKind | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)
    cost_usd: float = 0.0
    ttft_s: float | None = None
    cancelled: bool = False
    answer: bytes = b""
    finish_reason: str = ""


class AttemptObserver(Protocol):
    """An observer whose class sets `after_answer = True` only counts: a call's successful end
    reaches it after the caller's answer is written (afterward.py), not before."""

    def attempt_started(self, event: AttemptStart) -> None: ...

    def attempt_ended(self, event: AttemptEnd) -> None: ...
