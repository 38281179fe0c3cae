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
    # It streams from its upstream, so it will report its first token (FirstToken): a stream,
    # or a whole answer the agent streams upstream. Only such attempts can be judged silent
    # (scheduling/stats.py, EndpointStats.silence); a plain unary call is silent until it ends.
    streamed: bool = False


@lean
@dataclass(frozen=True)
class FirstToken:
    """An attempt's first token arrived: a stream's first content chunk, or the first chunk of a
    whole-answer call the agent streams from its upstream. Delivered to the observers that
    have a `first_token` method (routing statistics: `LiveStats.first_token`), so an attempt
    that has shown it is alive is told from one still silent."""

    request_id: str
    service: str
    endpoint: str
    attempt: int
    ttft_s: float


@lean
@dataclass(frozen=True)
class AttemptEnd:
    """One attempt's outcome. `error` is None on success; `latency_s` is the attempt's own time;
    `ttft_s` is the time to the first token when known: streams, and whole-answer calls the
    agent streamed from its upstream (`unary`: the caller asked for a whole answer, so
    `latency_s` is a whole answer's time, as for any unary call). `cancelled`: the
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
    unary: bool = False


class AttemptObserver(Protocol):
    """An observer whose class sets `after_answer = True` only counts: a call's successful end
    reaches it after the caller's answer is written (afterward.py), not before."""

    def attempt_started(self, event: AttemptStart) -> None: ...

    def attempt_ended(self, event: AttemptEnd) -> None: ...
