"""HTTP plumbing shared by the adapters: one send, one failure builder (SSE framing is sse.py).

Every adapter makes its attempts through `send` (transport failures become classified
`UpstreamError`s with the key scrubbed) and turns a non-2xx answer into an error with
`failure`, giving it the provider's own error-body parser and status classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import orjson

from switchgear.adapters.base import ErrorKind, TokenUsage, UpstreamError, token_count
from switchgear.adapters.openai import (
    CHARS_PER_TOKEN,
    _redact,
    _redact_bytes,
    classify_status,
    retry_after_s,
    transport_error_kind,
)

ErrorParser = Callable[[bytes], tuple[str, str]]
Classifier = Callable[[int, str, str], ErrorKind]


def check_time(timeout_s: float) -> None:
    if timeout_s <= 0:
        raise UpstreamError(ErrorKind.TIMEOUT, "no time left for the attempt")


def dumps(payload: Any) -> bytes:
    """JSON bytes of a request body; CLIENT error when it cannot be serialised."""
    try:
        return orjson.dumps(payload)
    except TypeError as exc:
        raise UpstreamError(ErrorKind.CLIENT, f"payload: not serialisable as JSON: {exc}") from None


async def send(
    client: httpx.AsyncClient,
    verb: str,
    url: str,
    *,
    secret: str | None,
    timeout_s: float,
    headers: Mapping[str, str],
    **kwargs: Any,
) -> httpx.Response:
    """One HTTP exchange; transport failures become UpstreamError with `secret` scrubbed."""
    try:
        return await client.request(verb, url, headers=dict(headers), timeout=httpx.Timeout(timeout_s), **kwargs)
    except (httpx.TransportError, httpx.InvalidURL) as exc:
        text = f"{verb} {url}: {type(exc).__name__}: {exc}".rstrip(": ")
        raise UpstreamError(transport_error_kind(exc), _redact(text, secret)) from None


def failure(
    verb: str,
    url: str,
    status: int,
    headers: httpx.Headers,
    raw: bytes,
    *,
    secret: str | None,
    now: float,
    parse: ErrorParser,
    classify: Classifier = classify_status,
) -> UpstreamError:
    """The classified error of a non-2xx answer (Retry-After read for RATE_LIMITED)."""
    body = _redact_bytes(raw, secret)
    code, message = parse(body)
    kind = classify(status, code, message)
    retry = retry_after_s(headers, now) if kind is ErrorKind.RATE_LIMITED else None
    detail = f" [{code}]" if code else ""
    text = f"{verb} {url}: upstream {status}{detail}: {message}".rstrip(": ")
    return UpstreamError(kind, _redact(text, secret), status=status, retry_after_s=retry, body=body)


def response_failure(
    verb: str,
    url: str,
    response: httpx.Response,
    *,
    secret: str | None,
    now: float,
    parse: ErrorParser,
    classify: Classifier = classify_status,
) -> UpstreamError:
    return failure(
        verb,
        url,
        response.status_code,
        response.headers,
        response.content,
        secret=secret,
        now=now,
        parse=parse,
        classify=classify,
    )


def json_body(response: httpx.Response) -> Any:
    """The parsed 2xx body; RETRYABLE when it is not JSON (a proxy's page, a cut answer)."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise UpstreamError(
            ErrorKind.RETRYABLE,
            f"upstream answered {response.status_code} with a body that is not JSON",
            status=response.status_code,
            body=response.content,
        ) from None


def count(value: Any) -> int | None:
    """`value` if it is a token count (an int from 0 to MAX_TOKEN_COUNT, not a bool), else None."""
    return token_count(value)


def estimate_tokens(chars: int) -> int:
    """About CHARS_PER_TOKEN characters per token, rounded up."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def estimated(input_chars: int, output_chars: int) -> TokenUsage:
    return TokenUsage(estimate_tokens(input_chars), estimate_tokens(output_chars), estimated=True)


def generic_error(body: bytes) -> tuple[str, str]:
    """(code, message) from the common error shapes: {"error": {...}}, {"error": "X",
    "message": ...} (Chroma), {"detail": ...} (FastAPI), {"code", "message"} (Pinecone data
    plane); else ("", a snippet of the text)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", body[:300].decode("utf-8", "replace").strip()
    if not isinstance(parsed, dict):
        return "", str(parsed)[:300]
    error = parsed.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type") or ""
        return str(code), str(error.get("message") or "")
    detail = parsed.get("detail")
    if detail is not None:
        return "", detail if isinstance(detail, str) else orjson.dumps(detail).decode()[:300]
    code = error if isinstance(error, str) else parsed.get("code", "")
    return str(code or ""), str(parsed.get("message") or "")


# ---------------------------------------------------------------------------------------
# server-sent events


async def call_json(
    client: httpx.AsyncClient,
    verb: str,
    url: str,
    *,
    secret: str | None,
    timeout_s: float,
    headers: Mapping[str, str],
    now: Callable[[], float],
    body: Any = None,
    parse: ErrorParser = generic_error,
    classify: Classifier = classify_status,
    **kwargs: Any,
) -> tuple[httpx.Response, Any]:
    """One JSON exchange: (response, parsed 2xx body); a non-2xx raises a classified error."""
    check_time(timeout_s)
    all_headers = {"Accept": "application/json", **headers}
    if body is not None:
        all_headers["Content-Type"] = "application/json"
        kwargs["content"] = dumps(body)
    response = await send(client, verb, url, secret=secret, timeout_s=timeout_s, headers=all_headers, **kwargs)
    if not 200 <= response.status_code < 300:
        raise response_failure(verb, url, response, secret=secret, now=now(), parse=parse, classify=classify)
    parsed = json_body(response) if response.content else {}
    return response, parsed


def base_url(url: str, *suffixes: str) -> str:
    """`url` without a trailing slash and without any of `suffixes` (e.g. "/api/v2")."""
    url = url.rstrip("/")
    for suffix in suffixes:
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def check_options(protocol: str, options: Any, known: tuple[str, ...]) -> Mapping[str, Any]:
    """`options` as a mapping with only `known` keys, else an OptionsError naming the key."""
    from switchgear.adapters.base import OptionsError

    if not isinstance(options, Mapping):
        raise OptionsError("", f"options for protocol {protocol} must be a mapping")
    for key in options:
        if key not in known:
            raise OptionsError(
                str(key), f"unknown option for protocol {protocol}; known: {', '.join(known) or '(none)'}"
            )
    return options


def str_option(options: Mapping[str, Any], key: str, default: str, *, allow_empty: bool = True) -> str:
    from switchgear.adapters.base import OptionsError

    value = options.get(key, default)
    if not isinstance(value, str) or "\n" in value or "\r" in value or (not allow_empty and not value):
        raise OptionsError(key, "must be a single-line string" + ("" if allow_empty else " (non-empty)"))
    return value


def payload_str(payload: Mapping[str, Any], key: str, default: str = "") -> str:
    """A required (when no default) string field of a payload; CLIENT error naming it."""
    value = payload.get(key, default)
    if not isinstance(value, str) or not value:
        raise UpstreamError(ErrorKind.CLIENT, f"payload.{key}: required non-empty string")
    return value
