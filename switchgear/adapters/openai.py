"""The OpenAI-compatible adapter: protocol "openai" (OpenAI, vLLM, llama.cpp server, Ollama).

One attempt = one POST of the caller's JSON body to `{base}/{method path}`; a 2xx body is
passed through as bytes and only its `usage` is read. Every failure becomes an
`UpstreamError` whose kind tells the data plane what to do next (see `classify_status`).

Methods are rows of `_METHODS`: a path option with its default, a request check and a usage
reader: "chat.completions" (`chat_path`) and "embeddings" (`embeddings_path`). A new method is
one row (its path option is then accepted by `parse_options` automatically). `stream` serves
"chat.completions" as SSE (see `OpenAIAdapter.stream`).

The resolved API key is sent in one header and scrubbed from every message and error body
this module produces.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from switchgear.adapters.base import (
    AdapterRequest,
    AdapterResponse,
    ErrorKind,
    OptionsError,
    StreamChunk,
    Target,
    TokenUsage,
    UpstreamError,
    token_count,
    usage_with_parts,
)
from switchgear.adapters.sse import sse_events

PROTOCOL = "openai"
CHARS_PER_TOKEN = 4  # rough English average, used only when the upstream reports no usage
_REDACTED = "[redacted]"
_MESSAGE_SNIPPET_CHARS = 300  # how much of a non-JSON error body a message quotes


# ---------------------------------------------------------------------------------------
# methods table


def _check_chat(payload: Mapping[str, Any]) -> None:
    """Refuse a chat body that cannot succeed, before any I/O (raises CLIENT)."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UpstreamError(ErrorKind.CLIENT, "payload.messages: must be a non-empty list of messages")
    if payload.get("stream") is True:
        raise UpstreamError(ErrorKind.CLIENT, "payload.stream: streaming is not served by Invoke; use InvokeStream")


def _chat_usage(payload: Mapping[str, Any], body: Mapping[str, Any]) -> TokenUsage:
    """Usage from `body["usage"]`, else an estimate over message and choice texts."""
    reported = _reported_usage(body)
    if reported is not None:
        return reported
    prompt_chars = sum(_text_len(m.get("content")) for m in payload.get("messages", ()) if isinstance(m, Mapping))
    choices = body.get("choices")
    completion_chars = 0
    if isinstance(choices, list):
        for choice in choices:
            message = choice.get("message") if isinstance(choice, Mapping) else None
            if isinstance(message, Mapping):
                completion_chars += _text_len(message.get("content"))
    return TokenUsage(_estimate_tokens(prompt_chars), _estimate_tokens(completion_chars), estimated=True)


@dataclass(frozen=True)
class _Method:
    """How one method is called: the option naming its path, the default path, checks, usage."""

    path_option: str
    default_path: str
    check: Callable[[Mapping[str, Any]], None]
    usage: Callable[[Mapping[str, Any], Mapping[str, Any]], TokenUsage]


def _check_embeddings(payload: Mapping[str, Any]) -> None:
    """`input` must be a non-empty string or a non-empty list (of strings or token ids)."""
    value = payload.get("input")
    if not ((isinstance(value, str) and value) or (isinstance(value, list) and value)):
        raise UpstreamError(ErrorKind.CLIENT, "payload.input: must be a non-empty string or list")


def _embeddings_usage(payload: Mapping[str, Any], body: Mapping[str, Any]) -> TokenUsage:
    """`usage.prompt_tokens` (embeddings have no output tokens), else an estimate of the input."""
    reported = _reported_usage(body)
    if reported is not None:
        return reported
    value = payload.get("input")
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    chars = sum(
        len(t) if isinstance(t, str) else CHARS_PER_TOKEN * (len(t) if isinstance(t, list) else 1) for t in texts
    )
    return TokenUsage(_estimate_tokens(chars), 0, estimated=True)


_METHODS: Mapping[str, _Method] = MappingProxyType(
    {
        "chat.completions": _Method("chat_path", "/chat/completions", _check_chat, _chat_usage),
        "embeddings": _Method("embeddings_path", "/embeddings", _check_embeddings, _embeddings_usage),
    }
)
_PATH_OPTIONS = MappingProxyType({m.path_option: name for name, m in _METHODS.items()})
_OTHER_OPTIONS = ("headers", "organization", "api_key_header", "stream_usage")
KNOWN_OPTIONS = tuple(sorted((*_PATH_OPTIONS, *_OTHER_OPTIONS)))
_FORBIDDEN_HEADERS = frozenset({"authorization", "proxy-authorization"})


# ---------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class OpenAIOptions:
    """Validated adapter options of one service (immutable, hashable).

    `paths` maps each method to its path below the base URL; `headers` are extra request
    headers as sorted (name, value) pairs; `api_key_header` is "Authorization" (sent as
    "Bearer <key>") or another header name that carries the raw key (e.g. "api-key").
    """

    paths: tuple[tuple[str, str], ...] = tuple(sorted((n, m.default_path) for n, m in _METHODS.items()))
    headers: tuple[tuple[str, str], ...] = ()
    organization: str | None = None
    api_key_header: str = "Authorization"
    # Ask for the usage chunk when streaming (`stream_options.include_usage`); turn off for a
    # server that refuses the field (usage is then estimated from the streamed text).
    stream_usage: bool = True

    def path(self, method: str) -> str:
        """The path of `method` below the base URL, e.g. "/chat/completions"."""
        return dict(self.paths)[method]


def parse_options(options: Mapping[str, Any]) -> OpenAIOptions:
    """Validate a service's `options` mapping; raise OptionsError naming the offending key."""
    if not isinstance(options, Mapping):
        raise OptionsError("", f"options for protocol {PROTOCOL} must be a mapping")
    for key in options:
        if key not in KNOWN_OPTIONS:
            raise OptionsError(str(key), f"unknown option for protocol {PROTOCOL}; known: {', '.join(KNOWN_OPTIONS)}")
    paths = dict(OpenAIOptions().paths)
    for option, method in _PATH_OPTIONS.items():
        if option in options:
            paths[method] = _parse_path(option, options[option])
    key_header = _parse_header_name("api_key_header", options.get("api_key_header", "Authorization"))
    return OpenAIOptions(
        paths=tuple(sorted(paths.items())),
        headers=_parse_headers(options.get("headers", {}), key_header),
        organization=_parse_optional_str("organization", options.get("organization")),
        api_key_header=key_header,
        stream_usage=_parse_bool("stream_usage", options.get("stream_usage", True)),
    )


def _parse_path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise OptionsError(key, f"must be a string starting with '/', got {value!r}")
    return value


def _parse_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionsError(key, f"must be true or false, got {value!r}")
    return value


def _parse_optional_str(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or _has_line_break(value):
        raise OptionsError(key, "must be a non-empty single-line string")
    return value


def _parse_header_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
        raise OptionsError(key, f"must be an HTTP header name, got {value!r}")
    return value


def _parse_headers(value: Any, key_header: str) -> tuple[tuple[str, str], ...]:
    """Extra headers: str → str; the key's own header and Authorization are refused."""
    if not isinstance(value, Mapping):
        raise OptionsError("headers", "must be a mapping of header name to string value")
    refused = _FORBIDDEN_HEADERS | {key_header.lower()}
    pairs = []
    for name, header_value in value.items():
        path = f"headers.{name}"
        _parse_header_name(path, name)
        if name.lower() in refused:
            raise OptionsError(path, "credentials are not options; give the service an api key reference instead")
        if not isinstance(header_value, str) or _has_line_break(header_value):
            raise OptionsError(path, "must be a single-line string")
        pairs.append((name, header_value))
    return tuple(sorted(pairs))


def _has_line_break(text: str) -> bool:
    return "\r" in text or "\n" in text


# ---------------------------------------------------------------------------------------
# request building


@functools.lru_cache(maxsize=1024)  # pure; called per attempt with a few distinct pairs
def endpoint_url(base_url: str, path: str) -> str:
    """Join a service base URL and a method path.

    A base whose path is empty or "/" (a local server given as http://host:8080) gets "/v1";
    any other path is used as given. A query string on the base (e.g. Azure's api-version)
    is kept.
    """
    parts = urlsplit(base_url)
    base_path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, base_path + path, parts.query, ""))


def request_headers(
    target: Target, options: OpenAIOptions, request_id: str, extra: Mapping[str, str] = {}
) -> dict[str, str]:
    """Headers of one attempt: the request's extras (trace context), the service's extras,
    content type, request id, organization and the key (later ones win)."""
    headers = {**extra, **dict(options.headers)}
    headers["Content-Type"] = "application/json"
    headers["Accept"] = "application/json"
    if request_id:
        headers["X-Request-Id"] = request_id
    if options.organization:
        headers["OpenAI-Organization"] = options.organization
    if target.api_key:
        bearer = options.api_key_header.lower() == "authorization"
        headers[options.api_key_header] = f"Bearer {target.api_key}" if bearer else target.api_key
    return headers


def request_body(target: Target, payload: Mapping[str, Any]) -> bytes:
    """The JSON body: the caller's payload with `model` replaced by `target.model` when set."""
    body = dict(payload)
    if target.model:
        body["model"] = target.model
    try:
        return orjson.dumps(body)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise UpstreamError(ErrorKind.CLIENT, f"payload: not serialisable as JSON: {exc}") from None


# ---------------------------------------------------------------------------------------
# response reading


def _reported_usage(body: Mapping[str, Any]) -> TokenUsage | None:
    usage = body.get("usage")
    if type(usage) is not dict and not isinstance(usage, Mapping):  # (a dict: no ABC check)
        return None
    prompt, completion = token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens", 0))
    if prompt is None or completion is None:
        return None
    # Both details are parts of their totals (OpenAI: cached prompt tokens are billed at a
    # discount; reasoning tokens are billed as completion tokens but never shown).
    prompt_details, completion_details = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
    cached = prompt_details.get("cached_tokens", 0) if isinstance(prompt_details, Mapping) else 0
    reasoning = completion_details.get("reasoning_tokens", 0) if isinstance(completion_details, Mapping) else 0
    return usage_with_parts(prompt, completion, cache_read=cached, reasoning=reasoning)


def _text_len(content: Any) -> int:
    """Characters of text in a message content: a string or a list of {"type":"text"} parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return 0


def _estimate_tokens(chars: int) -> int:
    """About CHARS_PER_TOKEN characters per token, rounded up."""
    return math.ceil(chars / CHARS_PER_TOKEN)


# ---------------------------------------------------------------------------------------
# failure classification


def classify_status(status: int, error_code: str, error_message: str) -> ErrorKind:
    """The kind of a non-2xx upstream answer.

    429 → RATE_LIMITED; 408 → TIMEOUT; 401/403 → AUTH; 400 saying the context is too long →
    CONTEXT_LENGTH; other 4xx → CLIENT; 5xx (incl. 529 overloaded) → RETRYABLE; 3xx →
    CONFIG (redirects are not followed: the base URL is wrong).
    """
    if status == 429:
        return ErrorKind.RATE_LIMITED
    if status == 408:
        return ErrorKind.TIMEOUT
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 400 and _is_context_length(error_code, error_message):
        return ErrorKind.CONTEXT_LENGTH
    if 400 <= status < 500:
        return ErrorKind.CLIENT
    if 300 <= status < 400:
        return ErrorKind.CONFIG
    return ErrorKind.RETRYABLE


_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})  # OpenAI, llama.cpp
_CONTEXT_PHRASES = ("maximum context length", "context length exceeded", "exceeds the available context size")


def _is_context_length(code: str, message: str) -> bool:
    lowered = message.lower()
    return code in _CONTEXT_CODES or any(p in lowered for p in _CONTEXT_PHRASES)


def parse_error_body(body: bytes) -> tuple[str, str]:
    """(code, message) from an OpenAI-style `{"error": {...}}` body, else ("", a text snippet).

    llama.cpp puts its kind in `error.type`; vLLM sometimes sends `{"message": ...}` at top level.
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", body[:_MESSAGE_SNIPPET_CHARS].decode("utf-8", "replace").strip()
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return "", str(error)[:_MESSAGE_SNIPPET_CHARS] if error is not None else ""
    code = error.get("code") or error.get("type") or ""
    return str(code), str(error.get("message") or "")


def retry_after_s(headers: httpx.Headers, now: float) -> float | None:
    """Seconds to wait before retrying, from a 429's headers; None when none says.

    Order: `retry-after-ms`; `retry-after` (seconds or an HTTP-date, against wall clock
    `now` in epoch seconds); then the `x-ratelimit-reset-*` header of whichever limit is
    exhausted (requests first), as a Go duration such as "1s", "6m0s" or "20ms".
    """
    millis = _parse_float(headers.get("retry-after-ms"))
    if millis is not None:
        return max(0.0, millis / 1000.0)
    after = headers.get("retry-after")
    if after is not None:
        seconds = _parse_float(after)
        if seconds is None:
            seconds = _parse_http_date(after, now)
        if seconds is not None:
            return max(0.0, seconds)
    return _ratelimit_reset_s(headers)


def _ratelimit_reset_s(headers: httpx.Headers) -> float | None:
    kinds = ("requests", "tokens")
    exhausted = [k for k in kinds if headers.get(f"x-ratelimit-remaining-{k}", "").strip() == "0"]
    for kind in (*exhausted, *kinds):
        value = headers.get(f"x-ratelimit-reset-{kind}")
        seconds = parse_go_duration(value) if value is not None else None
        if seconds is not None:
            return seconds
    return None


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_GO_UNIT_S = MappingProxyType({"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9})


def parse_go_duration(text: str) -> float | None:
    """Seconds in a Go-style duration ("1s", "6m0s", "1h2m3.5s", "20ms"); None if malformed."""
    text = text.strip()
    if not text:
        return None
    total, pos = 0.0, 0
    for match in _GO_DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _GO_UNIT_S[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


def _parse_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _parse_http_date(text: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp() - now


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, _REDACTED) if secret else text


def _redact_bytes(body: bytes, secret: str | None) -> bytes:
    return body.replace(secret.encode(), _REDACTED.encode()) if secret else body


# ---------------------------------------------------------------------------------------
# the adapter


class OpenAIAdapter:
    """Adapter for OpenAI-compatible HTTP APIs. Stateless; safe to share across tasks.

    `wall_clock` (epoch seconds) is only used to turn a Retry-After HTTP-date into seconds.
    """

    protocol: ClassVar[str] = PROTOCOL
    methods: ClassVar[frozenset[str]] = frozenset(_METHODS)
    stream_methods: ClassVar[frozenset[str]] = frozenset({"chat.completions"})

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock

    def __repr__(self) -> str:
        return "OpenAIAdapter()"

    @staticmethod
    def idempotent(method: str, payload: Mapping[str, Any]) -> bool:
        """A chat completion and embeddings only read: both may be hedged."""
        return method in _METHODS

    def parse_options(self, options: Mapping[str, Any]) -> OpenAIOptions:
        """Validate a service's options; see `parse_options`."""
        return parse_options(options)

    async def invoke(self, client: Any, target: Target, request: AdapterRequest) -> AdapterResponse:
        """One POST with `client` (an httpx.AsyncClient); raise UpstreamError on any failure."""
        method = _METHODS.get(request.method)
        if method is None:
            raise UpstreamError(ErrorKind.CLIENT, f"method {request.method!r} is not served by protocol {PROTOCOL}")
        options = _target_options(target)
        method.check(request.payload)
        if request.timeout_s <= 0:
            raise UpstreamError(ErrorKind.TIMEOUT, "no time left for the attempt")
        url = endpoint_url(target.base_url, options.path(request.method))
        response = await self._post(client, target, url, options, request)
        if 200 <= response.status_code < 300:
            return self._success(method, request, response)
        raise self._failure(target, url, response)

    async def _post(
        self, client: Any, target: Target, url: str, options: OpenAIOptions, request: AdapterRequest
    ) -> httpx.Response:
        """Send the attempt; transport failures become UpstreamError (key scrubbed)."""
        content = request_body(target, request.payload)
        headers = request_headers(target, options, request.request_id, request.headers)
        try:
            response: httpx.Response = await client.post(
                url, content=content, headers=headers, timeout=httpx.Timeout(request.timeout_s)
            )
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            # `from None`: the httpx error holds the request, whose headers carry the key.
            text = f"POST {url}: {type(exc).__name__}: {exc}".rstrip(": ")
            raise UpstreamError(transport_error_kind(exc), _redact(text, target.api_key)) from None
        return response

    @staticmethod
    def _success(method: _Method, request: AdapterRequest, response: httpx.Response) -> AdapterResponse:
        body = response.content
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise UpstreamError(
                ErrorKind.RETRYABLE,
                f"upstream answered {response.status_code} with a body that is not a JSON object",
                status=response.status_code,
                body=body,
            )
        return AdapterResponse(body=body, usage=method.usage(request.payload, parsed), status=response.status_code)

    def _failure(self, target: Target, url: str, response: httpx.Response) -> UpstreamError:
        body = _redact_bytes(response.content, target.api_key)
        code, message = parse_error_body(body)
        kind = classify_status(response.status_code, code, message)
        retry = retry_after_s(response.headers, self._wall_clock()) if kind is ErrorKind.RATE_LIMITED else None
        detail = f" [{code}]" if code else ""
        text = f"POST {url}: upstream {response.status_code}{detail}: {message}".rstrip(": ")
        return UpstreamError(
            kind, _redact(text, target.api_key), status=response.status_code, retry_after_s=retry, body=body
        )

    async def stream(self, client: Any, target: Target, request: AdapterRequest) -> AsyncIterator[StreamChunk]:
        """One streamed chat attempt: POST with `stream: true` (and `stream_options.include_usage`
        unless the caller set stream_options), then one StreamChunk per SSE `data:` chunk.

        Chunks are passed through as bytes. The final item carries the usage chunk's counts,
        or an estimate from the prompt and streamed text when the server sent none (older
        llama.cpp / Ollama builds). A stream that ends without `[DONE]` is RETRYABLE.
        """
        if request.method not in self.stream_methods:
            raise UpstreamError(ErrorKind.CLIENT, f"method {request.method!r} cannot stream on protocol {PROTOCOL}")
        options = _target_options(target)
        payload = {k: v for k, v in request.payload.items() if k != "stream"}
        _check_chat(payload)
        if request.timeout_s <= 0:
            raise UpstreamError(ErrorKind.TIMEOUT, "no time left for the attempt")
        payload["stream"] = True
        if options.stream_usage:
            payload.setdefault("stream_options", {"include_usage": True})
        url = endpoint_url(target.base_url, options.path(request.method))
        headers = request_headers(target, options, request.request_id, request.headers)
        headers["Accept"] = "text/event-stream"
        content = request_body(target, payload)
        state = _StreamState()
        try:
            async with client.stream(
                "POST", url, content=content, headers=headers, timeout=httpx.Timeout(request.timeout_s)
            ) as response:
                if not 200 <= response.status_code < 300:
                    await response.aread()
                    raise self._failure(target, url, response)
                async for chunk in _openai_chunks(response, state):
                    yield chunk
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            text = f"POST {url}: {type(exc).__name__}: {exc}".rstrip(": ")
            raise UpstreamError(transport_error_kind(exc), _redact(text, target.api_key)) from None
        if not state.done:
            raise UpstreamError(ErrorKind.RETRYABLE, f"POST {url}: stream ended before [DONE]")
        prompt_chars = sum(_text_len(m.get("content")) for m in payload["messages"] if isinstance(m, Mapping))
        usage = state.usage or TokenUsage(_estimate_tokens(prompt_chars), _estimate_tokens(state.chars), estimated=True)
        yield StreamChunk(usage=usage, finish_reason=state.finish_reason, usage_chunk=state.usage_chunk)


class _StreamState:
    """What a stream has shown so far: streamed characters, finish reason, usage, [DONE]."""

    def __init__(self) -> None:
        self.chars = 0
        self.finish_reason: str | None = None
        self.usage: TokenUsage | None = None
        self.usage_chunk = b""
        self.done = False


async def _openai_chunks(response: httpx.Response, state: _StreamState) -> AsyncIterator[StreamChunk]:

    async for _event, data in sse_events(response.aiter_lines()):
        if data.strip() == "[DONE]":
            state.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError(ErrorKind.RETRYABLE, f"stream chunk is not JSON: {data[:120]!r}") from None
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk and "choices" not in chunk:  # vLLM / llama.cpp report mid-stream errors so
            code, message = parse_error_body(data.encode())
            raise UpstreamError(ErrorKind.RETRYABLE, f"error in stream: [{code}] {message}", body=data.encode())
        reported = _reported_usage(chunk)
        if reported is not None:
            state.usage = reported
            if not chunk.get("choices"):
                state.usage_chunk = data.encode()
                continue  # the usage-only chunk is not passed on: the final StreamChunk carries it
        text, content = "", False
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            piece = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(piece, str) and piece:
                text += piece
                content = True
            if isinstance(delta, dict) and delta.get("tool_calls"):
                content = True
            if choice.get("finish_reason"):
                state.finish_reason = str(choice["finish_reason"])
        state.chars += len(text)
        yield StreamChunk(data=data.encode(), text=text, content=content)


def transport_error_kind(exc: Exception) -> ErrorKind:
    """Timeouts (connect, read, write, pool) → TIMEOUT; refused/unreachable → CONNECT; a bad
    URL or scheme → CONFIG; anything else (reset, dropped mid-response, protocol) → RETRYABLE."""
    if isinstance(exc, httpx.TimeoutException):
        return ErrorKind.TIMEOUT
    if isinstance(exc, httpx.ConnectError):
        return ErrorKind.CONNECT
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return ErrorKind.CONFIG
    return ErrorKind.RETRYABLE


def _target_options(target: Target) -> OpenAIOptions:
    """The target's parsed options; None means all defaults."""
    if target.options is None:
        return OpenAIOptions()
    if isinstance(target.options, OpenAIOptions):
        return target.options
    raise UpstreamError(ErrorKind.CONFIG, "target.options must be the value OpenAIAdapter.parse_options returned")
