"""The one small interface every upstream protocol adapter implements.

An adapter turns a unified call into the provider's wire format over a pooled
`httpx.AsyncClient` it is given (never one it makes), normalises the response and its token
usage, and classifies failures so the data plane can decide on retry, failover or giving up.
Adapters know nothing of snapshots, routing or gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Protocol


class ErrorKind(str, Enum):
    """How an upstream failure should be treated."""

    RETRYABLE = "retryable"  # 5xx, overloaded, connection reset: try again / elsewhere
    RATE_LIMITED = "rate_limited"  # 429: try elsewhere; honour retry_after_s
    TIMEOUT = "timeout"  # no answer in time: retryable elsewhere, not on the same deadline
    CONNECT = "connect"  # could not connect at all: retryable elsewhere at once
    CLIENT = "client"  # 4xx caused by the request: never retried
    AUTH = "auth"  # 401/403: the key is wrong; not retried, other endpoints may differ
    CONTEXT_LENGTH = "context_length"  # prompt too long for the model: a bigger model may fit
    CONFIG = "config"  # the agent cannot make the call (missing secret, bad option)

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE

    @property
    def caller_fault(self) -> bool:
        """The request itself was wrong (invalid, unknown model, too long, too large: an upstream
        4xx other than 401/403/408/429). The caller's own mistake is answered to that caller and
        counts against nothing shared: breakers, ejection, health, weights, load reports, alerts."""
        return self in _CALLER_FAULTS


_RETRYABLE = frozenset({ErrorKind.RETRYABLE, ErrorKind.RATE_LIMITED, ErrorKind.TIMEOUT, ErrorKind.CONNECT})
_CALLER_FAULTS = frozenset({ErrorKind.CLIENT, ErrorKind.CONTEXT_LENGTH})


class UpstreamError(Exception):
    """A classified failure of one upstream attempt.

    `status` is the upstream HTTP status when there was one; `retry_after_s` comes from a
    Retry-After (or provider-specific reset) header; `body` is the upstream error body, kept
    so a front door can pass the provider's own error through.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s
        self.body = body

    def __repr__(self) -> str:
        return f"UpstreamError({self.kind.value}, status={self.status}, {self.message!r})"


class OptionsError(ValueError):
    """An adapter option is invalid. `path` is relative to the options object, e.g. "chat_path"."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False


@dataclass(frozen=True)
class Target:
    """Where and how to call: one endpoint of one service, as the adapter needs it.

    `api_key` is the resolved secret (never logged); `options` is what the adapter's
    `parse_options` returned for this service.
    """

    base_url: str
    model: str = ""
    api_key: str | None = field(default=None, repr=False)  # a secret: never in a repr or log
    options: Any = None


@dataclass(frozen=True)
class AdapterRequest:
    """One upstream attempt. `payload` is the caller's JSON object, already parsed.

    `timeout_s` is what remains of the caller's deadline for this attempt; `headers` are
    added to the upstream request (the adapter's own auth headers win over them).
    """

    method: str
    payload: Mapping[str, Any]
    timeout_s: float
    request_id: str = ""
    # Extra headers for the upstream request, e.g. W3C trace context (traceparent).
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterResponse:
    """A successful upstream answer: JSON body bytes (passed through), usage, HTTP status."""

    body: bytes
    usage: TokenUsage
    status: int = 200


class Adapter(Protocol):
    """What the data plane needs of an adapter.

    `protocol` is the name used in service definitions; `methods` the operations it serves.
    `parse_options` validates a service's adapter options (raise OptionsError naming the key)
    and returns an immutable value that is later passed back in `Target.options`.
    """

    protocol: ClassVar[str]
    methods: ClassVar[frozenset[str]]

    def parse_options(self, options: Mapping[str, Any]) -> Any: ...

    async def invoke(self, client: Any, target: Target, request: AdapterRequest) -> AdapterResponse:
        """Make one attempt with `client` (an httpx.AsyncClient). Raise UpstreamError on failure."""
        ...


@dataclass(frozen=True)
class StreamChunk:
    """One piece of a streamed answer.

    `data` is one JSON object (bytes) to pass to the caller: an OpenAI `chat.completion.chunk`
    for "chat.completions", the provider's own event for native methods; empty for a
    bookkeeping-only item. `text` is the delta's visible text (for estimates); `content` is
    True when the chunk carries model output (text or a tool call) — the first such chunk is
    the "first token". The last item of a stream has `usage` set (reported or estimated)
    and `finish_reason` when the upstream said one.
    """

    data: bytes = b""
    text: str = ""
    content: bool = False
    usage: TokenUsage | None = None
    finish_reason: str | None = None


class StreamingAdapter(Adapter, Protocol):
    """An adapter that can also stream. `stream_methods` is a subset of `methods`."""

    stream_methods: ClassVar[frozenset[str]]

    def stream(self, client: Any, target: Target, request: AdapterRequest) -> AsyncIterator[StreamChunk]:
        """Yield chunks of one attempt; raise UpstreamError on failure (before or mid-stream).

        The connection is held only while the iterator runs; closing the iterator closes it.
        """
        ...
