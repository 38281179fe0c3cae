"""`POST /v1/invoke`: `Gateway.Invoke` over HTTP, for every category of service.

The OpenAI-shaped routes (http.py) serve llm and embedding services; a document parser, a
knowledge graph or a vector database is reached through `Gateway.Invoke`, which needs a gRPC
stack. This route is the same call in JSON, for callers that speak only HTTP: the body names
the service and method and carries the upstream protocol's request as `payload`; the answer
carries the upstream's answer as `payload` beside what Invoke's answer says (endpoint,
attempts, latency, usage and cost, fallback, cache, the route target that served).

    {"service": "docs", "method": "partition", "payload": {...},
     "category": "document", "priority": 5, "timeout": 30, "max_retries": 1,
     "user_id": "u1", "session_id": "s1", "required_capabilities": ["vision"]}

Everything but `service` and `method` is optional, with Invoke's meaning and bounds
(`convert.call_from_proto`; `timeout` in seconds). An unknown key, a wrong type or a value out
of bounds is refused with 400 naming the field, in the door's own error shape, before any work;
so is a payload nested deeper than the door's JSON depth limit. Keys, quotas, budgets, the
response cache (`Cache-Control`), routing, resilience and refusals are the pipeline's, as for
every route of this door (outcome.py maps refusals the same way for both doors); the request
id is the door's (`x-request-id`).

`"stream": true` is `InvokeStream`: Server-Sent Events, one `event: chunk` per upstream chunk
(its JSON as the upstream's adapter gives it) and one `event: end` carrying InvokeStreamEnd's
fields (usage, cost, time to first token, failover, the error of a stream cut after its first
token). A refusal before the first chunk is an ordinary error answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from switchgear.adapters.base import ErrorKind, TokenUsage, UpstreamError
from switchgear.dataplane import access_log
from switchgear.dataplane.anthropic_door import Hooks
from switchgear.dataplane.convert import (
    MAX_TIMEOUT_S,
    NO_CAPABILITIES,
    Call,
    RequestError,
    check_depth,
    required_capabilities,
)
from switchgear.dataplane.governance import Principal
from switchgear.dataplane.http_edge import relay, request_id_of, required_of
from switchgear.dataplane.invoke import CallFailed, Result
from switchgear.dataplane.outcome import public_text
from switchgear.dataplane.scheduling.model import user_type_of
from switchgear.dataplane.snapshot import CATEGORIES, AgentSnapshot, TargetView
from switchgear.dataplane.stream import StreamEnd

PATH = "/v1/invoke"
#: The body's keys: InvokeRequest's fields, but `request_id` (the door's `x-request-id`), and
#: `stream` (InvokeStream).
KEYS = ("service", "method", "payload", "category", "priority", "timeout", "max_retries", "user_id", "session_id",
        "required_capabilities", "stream")
_MAX_NAME = 256  # service and method names, user and session ids: longer is a caller's mistake


def _text(body: Mapping[str, Any], key: str, required: bool) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise RequestError(key, "required, a non-empty string" if required else "must be a string")
    if len(value) > _MAX_NAME:
        raise RequestError(key, f"at most {_MAX_NAME} characters, got {len(value)}")
    return value


def _whole(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(key, f"must be a whole number within {low}..{high}")
    return value


def _timeout(body: Mapping[str, Any]) -> float:
    value = body.get("timeout")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_TIMEOUT_S:
        raise RequestError("timeout", f"must be a number of seconds within 0..{MAX_TIMEOUT_S:g} (0: the route's)")
    return float(value)


def _category(body: Mapping[str, Any]) -> str:
    value = body.get("category")
    if value is None or value == "":
        return ""
    if value not in CATEGORIES:
        raise RequestError("category", f"must be one of {', '.join(CATEGORIES)}")
    return str(value)


def call_from_body(raw: bytes, request_id: str, max_depth: int, tenant: str = "",
                   required: frozenset[str] = NO_CAPABILITIES) -> tuple[Call, bool]:
    """The validated call of a `/v1/invoke` body and whether it streams (pure); RequestError
    naming the field. `required`: the capabilities the request's `x-switchgear-require` header
    names (the body's `required_capabilities` join them)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError("body", f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}")
    check_depth(body, max_depth + 1, raw=raw)  # (+1: the payload's own depth is what the limit is for)
    unknown = sorted(key for key in body if key not in KEYS)
    if unknown:
        raise RequestError(unknown[0], f"unknown field (this route takes {', '.join(KEYS)})")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError("stream", "must be a boolean")
    payload = body.get("payload", {})
    if not isinstance(payload, dict):
        raise RequestError("payload", f"must be a JSON object, got {type(payload).__name__}")
    user_id = _text(body, "user_id", False)
    call = _call(body, request_id, payload, user_id, tenant, required | _required(body))
    return call, body.get("stream") is True


def _required(body: Mapping[str, Any]) -> frozenset[str]:
    value = body.get("required_capabilities")
    if value is None:
        return NO_CAPABILITIES
    if not isinstance(value, list):
        raise RequestError("required_capabilities", "must be an array of capability names")
    return required_capabilities(value, "required_capabilities")


def _call(body: Mapping[str, Any], request_id: str, payload: dict[str, Any], user_id: str, tenant: str,
          required: frozenset[str]) -> Call:
    return Call(
        request_id=request_id,
        category=_category(body),
        service=_text(body, "service", True),
        method=_text(body, "method", True),
        payload=payload,
        priority=_whole(body, "priority", 0, 10) or 5,
        timeout_s=_timeout(body),
        user_id=user_id,
        session_id=_text(body, "session_id", False),
        user_type=user_type_of(user_id),
        max_retries=_whole(body, "max_retries", 0, 999),
        tenant=tenant,
        capabilities=required,
    )


def _target(endpoint: str, target: TargetView | None) -> dict[str, Any] | None:
    """TargetInfo's fields: the route target that served."""
    if target is None:
        return None
    p = target.pricing
    return {"id": endpoint, "provider": target.provider, "protocol": target.protocol, "model": target.model,
            "pricing": {"cost_per_1k_tokens": p.cost_per_1k_tokens,
                        "input_cost_per_1k_tokens": p.input_cost_per_1k_tokens,
                        "output_cost_per_1k_tokens": p.output_cost_per_1k_tokens,
                        "cost_per_request": p.cost_per_request,
                        "cache_read_input_cost_per_1k_tokens": p.cache_read_input_cost_per_1k_tokens,
                        "cache_write_input_cost_per_1k_tokens": p.cache_write_input_cost_per_1k_tokens,
                        "web_search_cost_per_1k_requests": p.web_search_cost_per_1k_requests}}


def _usage(usage: TokenUsage, cost_usd: float) -> dict[str, Any]:
    """Usage's fields (common.proto): the cache and reasoning counts are parts of the totals."""
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens, "cost_usd": cost_usd,
            "estimated": usage.estimated, "cache_read_input_tokens": usage.cache_read_input_tokens,
            "cache_write_input_tokens": usage.cache_write_input_tokens, "reasoning_tokens": usage.reasoning_tokens,
            "web_search_requests": usage.web_search_requests}


def answer(call: Call, result: Result, cached: bool, tenant: str) -> bytes:
    """InvokeResponse's fields as JSON, the upstream's answer spliced in as `payload` unparsed."""
    usage = result.usage
    rest = orjson.dumps({
        "request_id": call.request_id, "service": result.service, "endpoint": result.endpoint,
        "attempts": result.attempts, "latency_s": round(result.latency_s, 6),
        "usage": _usage(usage, result.cost_usd),
        "fallback": result.fallback, "fallback_source": result.fallback_source, "cached": cached,
        "snapshot_version": result.version, "tenant": tenant, "target": _target(result.endpoint, result.target),
    })
    return b'{"payload":' + (result.body or b"null") + b"," + rest[1:]


async def invoke(request: web.Request) -> web.StreamResponse:
    hooks = request.app[_HOOKS]
    snapshot = hooks.snapshot(request)
    pipeline = hooks.pipeline(request)
    principal = hooks.principal(request, snapshot)
    request_id = request_id_of(request) or access_log.request_id(request.headers.get("x-request-id"))
    call, stream = call_from_body(await request.read(), request_id, pipeline.max_json_depth,
                                  principal.tenant.id if principal else "", required_of(request))
    access_log.note_route(call.service)
    if stream:
        return await _stream(request, hooks, call, snapshot, principal)
    served, headers = await hooks.invoke(request, call, snapshot, principal)
    headers["x-request-id"] = call.request_id
    return web.Response(body=answer(call, served.result, served.cached, served.tenant),
                        content_type="application/json", headers=headers)


def stream_end(request_id: str, end: StreamEnd) -> bytes:
    """InvokeStreamEnd's fields as the stream's last event (an error's text as callers see it)."""
    return b"event: end\ndata: " + orjson.dumps({
        "request_id": request_id, "service": end.service, "endpoint": end.endpoint, "attempts": end.attempts,
        "latency_s": round(end.latency_s, 6), "ttft_s": round(end.ttft_s, 6), "usage": _usage(end.usage, end.cost_usd),
        "failover": end.failover, "snapshot_version": end.version, "finish_reason": end.finish_reason,
        "error_kind": end.error.kind.value if end.error else "",
        "error_message": public_text(end.error.message) if end.error else "",
        "fallback": end.fallback, "fallback_source": end.fallback_source, "target": _target(end.endpoint, end.target),
    }) + b"\n\n"


def _chunk(chunk: bytes) -> bytes:
    return b"event: chunk\ndata: " + chunk + b"\n\n"


async def _stream(request: web.Request, hooks: Hooks, call: Call, snapshot: AgentSnapshot,
                  principal: Principal | None) -> web.StreamResponse:
    opened = await hooks.open_stream(request, call, snapshot, principal, "x-request-id")  # (refusals raise)
    if opened is None:
        raise CallFailed(UpstreamError(ErrorKind.RETRYABLE, "upstream stream ended without an answer"), 1, call.service)
    response, first, items = opened
    end = await relay(response, first, items, _chunk)
    await response.write(stream_end(call.request_id, end))
    await response.write_eof()
    return response


_HOOKS = web.AppKey("invoke_hooks", Hooks)


def add_routes(app: web.Application, hooks: Hooks) -> None:
    app[_HOOKS] = hooks
    app.router.add_post(PATH, invoke)
