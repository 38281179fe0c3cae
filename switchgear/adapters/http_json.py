"""The generic HTTP JSON adapter: protocol "http_json", for services with no adapter of their own.

Method "request". Payload: `{"method"?: "POST", "path": "/x", "query"?: {..}, "json"?: any,
"headers"?: {..}}`; the answer's body passes through as bytes. Options: `headers` (added to
every request), `api_key_header` ("Authorization" → `Bearer <key>`), `allowed_methods`
(default GET, POST, PUT, PATCH, DELETE).

Usage: an answer's `usage` with OpenAI (`prompt_tokens`/`completion_tokens`) or Anthropic
(`input_tokens`/`output_tokens`) names is read; otherwise zero. Errors are classified from
the status alone (plus the common error-body shapes for the message).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from switchgear.adapters import _http
from switchgear.adapters.base import (
    AdapterRequest,
    AdapterResponse,
    ErrorKind,
    OptionsError,
    Target,
    TokenUsage,
    UpstreamError,
)

PROTOCOL = "http_json"
_KNOWN = ("headers", "api_key_header", "allowed_methods")
_VERBS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class HttpJsonOptions:
    headers: tuple[tuple[str, str], ...] = ()
    api_key_header: str = "Authorization"
    allowed_methods: tuple[str, ...] = _VERBS


def parse_options(options: Mapping[str, Any]) -> HttpJsonOptions:
    opts = _http.check_options(PROTOCOL, options, _KNOWN)
    headers = opts.get("headers", {})
    if not isinstance(headers, Mapping) or not all(isinstance(v, str) and "\n" not in v for v in headers.values()):
        raise OptionsError("headers", "must be a mapping of header name to single-line string")
    allowed = opts.get("allowed_methods", list(_VERBS))
    if not isinstance(allowed, list) or not all(isinstance(m, str) and m.upper() in _VERBS for m in allowed):
        raise OptionsError("allowed_methods", f"must be a list of {', '.join(_VERBS)}")
    return HttpJsonOptions(
        tuple(sorted((str(k), v) for k, v in headers.items())),
        _http.str_option(opts, "api_key_header", "Authorization", allow_empty=False),
        tuple(m.upper() for m in allowed),
    )


def _usage(body: Any) -> TokenUsage:
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return TokenUsage()
    for names in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
        a, b = _http.count(usage.get(names[0])), _http.count(usage.get(names[1], 0))
        if a is not None and b is not None:
            return TokenUsage(a, b)
    return TokenUsage()


class HttpJsonAdapter:
    protocol: ClassVar[str] = PROTOCOL
    methods: ClassVar[frozenset[str]] = frozenset({"request"})

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock

    @staticmethod
    def idempotent(method: str, payload: Mapping[str, Any]) -> bool:
        """The HTTP verb says (RFC 9110 section 9.2.2): GET, HEAD, OPTIONS, PUT and DELETE may be
        hedged; POST and PATCH never."""
        return str(payload.get("method", "POST")).upper() in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")

    def parse_options(self, options: Mapping[str, Any]) -> HttpJsonOptions:
        return parse_options(options)

    async def invoke(self, client: Any, target: Target, request: AdapterRequest) -> AdapterResponse:
        if request.method not in self.methods:
            raise UpstreamError(ErrorKind.CLIENT, f"method {request.method!r} is not served by protocol {PROTOCOL}")
        options = target.options if isinstance(target.options, HttpJsonOptions) else HttpJsonOptions()
        payload = request.payload
        verb = str(payload.get("method", "POST")).upper()
        if verb not in options.allowed_methods:
            raise UpstreamError(
                ErrorKind.CLIENT, f"payload.method: {verb} not allowed (allowed: {', '.join(options.allowed_methods)})"
            )
        path = payload.get("path", "")
        if not isinstance(path, str) or (path and not path.startswith("/")):
            raise UpstreamError(ErrorKind.CLIENT, "payload.path: must start with '/'")
        extra = payload.get("headers", {})
        if not isinstance(extra, Mapping):
            raise UpstreamError(ErrorKind.CLIENT, "payload.headers: must be an object")
        headers = {**request.headers, **{str(k): str(v) for k, v in extra.items()}, **dict(options.headers)}
        if request.request_id:
            headers["X-Request-Id"] = request.request_id
        if target.api_key:
            bearer = options.api_key_header.lower() == "authorization"
            headers[options.api_key_header] = f"Bearer {target.api_key}" if bearer else target.api_key
        query = payload.get("query") or {}
        if not isinstance(query, Mapping):
            raise UpstreamError(ErrorKind.CLIENT, "payload.query: must be an object")
        response, parsed = await _http.call_json(
            client,
            verb,
            _http.base_url(target.base_url) + path,
            secret=target.api_key,
            timeout_s=request.timeout_s,
            headers=headers,
            now=self._wall_clock,
            body=payload.get("json"),
            params={str(k): str(v) for k, v in query.items()},
        )
        return AdapterResponse(response.content or orjson.dumps(parsed), _usage(parsed), response.status_code)
