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

from switchgear.wire.lean import lean


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


#: Service options (options_json) that cap an upstream answer; every adapter accepts them.
RESPONSE_LIMIT_OPTIONS = ("max_response_bytes", "max_decoded_bytes")
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: The largest cap a service may set (a larger answer is not a sane unary upstream answer).
MAX_RESPONSE_LIMIT_BYTES = 1024**3


@dataclass(frozen=True)
class ResponseLimits:
    """Caps on one upstream answer, per service; all in bytes or counts.

    `max_response_bytes` bounds the body as framed on the wire (de-chunked, before decoding);
    `max_decoded_bytes` bounds it after gzip/deflate decoding, and bounds a streamed answer's
    total; `max_head_bytes` and `max_headers` bound the status line and headers. Going over
    any of them is an upstream protocol error (retryable elsewhere), never the caller's fault.
    """

    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_decoded_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100


def split_response_limits(options: Mapping[str, Any]) -> tuple[ResponseLimits, dict[str, Any]]:
    """(the ResponseLimits a service's options set, the options without those keys);
    OptionsError naming a key whose value is not an integer from 1 to MAX_RESPONSE_LIMIT_BYTES."""
    rest = dict(options)
    given: dict[str, int] = {}
    for key in RESPONSE_LIMIT_OPTIONS:
        if key not in rest:
            continue
        value = rest.pop(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RESPONSE_LIMIT_BYTES:
            raise OptionsError(key, f"must be an integer number of bytes from 1 to {MAX_RESPONSE_LIMIT_BYTES}")
        given[key] = value
    return (ResponseLimits(**given) if given else _DEFAULT_LIMITS), rest


class OptionsError(ValueError):
    """An adapter option is invalid. `path` is relative to the options object, e.g. "chat_path"."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


_DEFAULT_LIMITS = ResponseLimits()


@lean
@dataclass(frozen=True)
class TokenUsage:
    """Tokens one call used, as the provider reported them (or estimated: `estimated`).

    `input_tokens` is ALL input, as OpenAI counts it: the cache parts are subsets of it.
    `cache_read_input_tokens` were read from the provider's prompt cache (billed at a discount),
    `cache_write_input_tokens` were written to it (Anthropic bills them above the input price);
    `reasoning_tokens` are the part of `output_tokens` the model spent thinking (not shown).
    `web_search_requests` are not tokens: searches the provider ran for the call (Anthropic's
    web_search server tool, an OpenAI search model), billed per search on top of the tokens.
    Anthropic reports input without its cache parts: its adapter adds them back in.
    Invariant (the adapters keep it): reads + writes <= input, reasoning <= output.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_requests: int = 0

    @property
    def uncached_input_tokens(self) -> int:
        """Input tokens billed at the plain input price."""
        return max(0, self.input_tokens - self.cache_read_input_tokens - self.cache_write_input_tokens)


# The most tokens one call may report: a provider answering more (or a negative, fractional or
# non-numeric count) is not believed, so one bad answer cannot blow up a tenant's budget or
# overflow a counter. Far above any real context window; a 32-bit wire integer.
MAX_TOKEN_COUNT = 2**31 - 1


def token_count(value: Any) -> int | None:
    """`value` if it is a token count (an int from 0 to MAX_TOKEN_COUNT, not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_TOKEN_COUNT else None


#: The most searches one call may report (Anthropic caps a request's searches with `max_uses`;
#: a count above this is not believed, as a token count above MAX_TOKEN_COUNT is not).
MAX_WEB_SEARCHES = 10_000


def usage_with_parts(input_tokens: int, output_tokens: int, cache_read: Any = 0, cache_write: Any = 0,
                     reasoning: Any = 0, web_searches: Any = 0) -> TokenUsage:
    """A reported TokenUsage whose parts (raw provider values) are believed only when they are
    counts, and clamped so they never exceed their totals (a provider's inconsistent answer
    then costs at most what its totals say)."""
    read = min(token_count(cache_read) or 0, input_tokens)
    write = min(token_count(cache_write) or 0, input_tokens - read)
    thought = min(token_count(reasoning) or 0, output_tokens)
    searches = token_count(web_searches) or 0
    return TokenUsage(input_tokens, output_tokens, cache_read_input_tokens=read, cache_write_input_tokens=write,
                      reasoning_tokens=thought, web_search_requests=searches if searches <= MAX_WEB_SEARCHES else 0)


def anthropic_usage(usage: TokenUsage) -> dict[str, Any]:
    """`usage` as an Anthropic message's usage object: `input_tokens` without the cache parts."""
    return {"input_tokens": usage.uncached_input_tokens,
            "cache_creation_input_tokens": usage.cache_write_input_tokens,
            "cache_read_input_tokens": usage.cache_read_input_tokens,
            "output_tokens": usage.output_tokens,
            **({"server_tool_use": {"web_search_requests": usage.web_search_requests}}
               if usage.web_search_requests else {})}


def responses_usage(usage: TokenUsage) -> dict[str, Any]:
    """`usage` as an OpenAI Responses API usage object (cache writes have no field there)."""
    return {"input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cache_read_input_tokens},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.input_tokens + usage.output_tokens}


def openai_usage(usage: TokenUsage) -> dict[str, Any]:
    """`usage` as an OpenAI chat completion's usage object. Cache writes have no OpenAI field;
    like LiteLLM, a non-zero count is given as `cache_creation_input_tokens` (Anthropic's name)."""
    shaped: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
    if usage.cache_write_input_tokens:
        shaped["cache_creation_input_tokens"] = usage.cache_write_input_tokens
    return shaped


@lean
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


@lean
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
    # The Switchgear tenant whose key made the call ("" with auth off or for the operator).
    # Adapters whose data is scoped per tenant (Chroma's database_scope, Pinecone's
    # namespace_scope) derive the scope from it; a payload never chooses it.
    tenant: str = ""


@lean
@dataclass(frozen=True)
class AdapterResponse:
    """A successful upstream answer: JSON body bytes (passed through), usage, HTTP status."""

    body: bytes
    usage: TokenUsage
    status: int = 200


def all_have_ids(payload: Mapping[str, Any], key: str = "ids") -> bool:
    """True when `payload[key]` is a non-empty list of non-empty ids: a write that names every
    record it writes can be repeated without writing anything twice (see `Adapter` on
    `idempotent`)."""
    ids = payload.get(key)
    return isinstance(ids, list) and bool(ids) and all(isinstance(i, str) and i for i in ids)


class Adapter(Protocol):
    """What the data plane needs of an adapter.

    `protocol` is the name used in service definitions; `methods` the operations it serves.
    `parse_options` validates a service's adapter options (raise OptionsError naming the key)
    and returns an immutable value that is later passed back in `Target.options`.

    Optional: `idempotent(method, payload) -> bool`, whether sending the call twice is harmless
    (the request path may then hedge it: send a second attempt elsewhere and cancel the
    loser). Every built-in adapter says, per method; an adapter that does not is never hedged.
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
    and `finish_reason` when the upstream said one, and `usage_chunk`: the upstream's own
    usage-only chunk when it sent one (not passed on to a streaming caller; a whole answer
    assembled from the stream takes its usage object from it: dataplane/assemble.py).
    `searches` (when not 0) is how many web searches the provider has run so far, told as their
    results stream (the count in the usage comes only at the end): a stream cut before its
    usage is charged them (dataplane/stream.Meter); a chunk may carry only that (empty data).
    """

    data: bytes = b""
    text: str = ""
    content: bool = False
    usage: TokenUsage | None = None
    finish_reason: str | None = None
    usage_chunk: bytes = b""
    searches: int = 0


class StreamingAdapter(Adapter, Protocol):
    """An adapter that can also stream. `stream_methods` is a subset of `methods`."""

    stream_methods: ClassVar[frozenset[str]]

    def stream(self, client: Any, target: Target, request: AdapterRequest) -> AsyncIterator[StreamChunk]:
        """Yield chunks of one attempt; raise UpstreamError on failure (before or mid-stream).

        The connection is held only while the iterator runs; closing the iterator closes it.
        """
        ...
