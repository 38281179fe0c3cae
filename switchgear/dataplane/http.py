"""The agent's OpenAI-compatible HTTP front door (aiohttp, on a second port).

    POST /v1/chat/completions   JSON, or SSE when "stream": true
    POST /v1/embeddings
    GET  /v1/models             the snapshot's llm and embedding services
    GET  /v1/models/{model}
    POST /v1/messages           Anthropic-compatible (anthropic_door.py), and
    POST /v1/messages/count_tokens
    POST /v1/responses          OpenAI's Responses API, stateless (responses_door.py)
    POST /v1/invoke             Gateway.Invoke in JSON, any category of service (invoke_door.py)

The request's `model` names a Switchgear service; the call then goes through the same
`Invoker` (non-streaming) or `Streamer` (SSE) as gRPC — same routing, failover, observers.
Any provider's answer comes back in OpenAI's shape (the Anthropic adapter maps it).

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 naming the
field for malformed input (JSON nested deeper than `convert.MAX_JSON_DEPTH` included), 404
`model_not_found`, and every refusal of the call as `outcome.py` maps it for both doors
(upstream failures by kind: rate limited → 429 with Retry-After, unavailable → 503, timeout →
504; shed by admission control → 429 with Retry-After, or 504 when its deadline passed queued;
quota or the tenant's in-flight cap → 429).
Optional request headers: `x-switchgear-priority` (1..10), `x-switchgear-timeout` (s, at most
the route's timeout), `x-switchgear-max-retries` (at most the route's retry policy max_retries),
`x-switchgear-require` (capabilities the serving target must offer, a comma list: http_edge.py).
Answers carry `x-switchgear-service`, `-endpoint`, `-attempts`, `-cost-usd` headers, and
`-target`, `-provider`, `-target-model` naming the route target that served.
A stream that fails after its first token ends with an OpenAI-style `data: {"error": ...}`
event and no `[DONE]` (no failover is possible once tokens went out).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from switchgear.adapters.base import openai_usage
from switchgear.dataplane import access_log, anthropic_door, invoke_door, responses_door
from switchgear.dataplane.burst_order import BurstOrder
from switchgear.dataplane.convert import MAX_JSON_DEPTH, MAX_TIMEOUT_S, Call, check_depth
from switchgear.dataplane.governance import Principal, may_call
from switchgear.dataplane.http_door import DEFAULT_LIMITS, DoorLimits, SpreadSite, body_guard, runner
from switchgear.dataplane.http_edge import Observe, add_probes, relay, request_id_of, required_of, target_headers
from switchgear.dataplane.invoke import Invoker, Result
from switchgear.dataplane.outcome import REFUSED, Refusal, failed, refusal
from switchgear.dataplane.pipeline import CacheMode, Pipeline, open_pipeline
from switchgear.dataplane.snapshot import AgentSnapshot, Holder, ServiceView
from switchgear.dataplane.stream import StreamEnd, Streamer
from switchgear.rpc.spread import Group
from switchgear.tls import ListenError

MODEL_CATEGORIES = ("llm", "embedding")
MAX_BODY_BYTES = 32 * 1024 * 1024

_HOLDER = web.AppKey("holder", Holder)
_INVOKER = web.AppKey("invoker", Invoker)
_STREAMER = web.AppKey("streamer", Streamer)
_PIPELINE = web.AppKey("pipeline", Pipeline)
_HOOKS = web.AppKey("hooks", anthropic_door.Hooks)  # (the chat route's stream opening too)


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.Response(
            status=self.status, body=orjson.dumps(body), content_type="application/json", headers=self.headers
        )

    def sse(self) -> bytes:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return b"data: " + orjson.dumps(body) + b"\n\n"


def render(refused: Refusal) -> ApiError:
    """A refusal (`outcome.Refusal`, the mapping both doors share) in OpenAI's error shape, with
    `Retry-After` (whole seconds) and an `x-switchgear-<name>` header per detail."""
    headers = {f"x-switchgear-{name}": value for name, value in refused.details}
    if refused.retry_after is not None:
        headers["Retry-After"] = refused.retry_after
    return ApiError(refused.http_status, refused.message, refused.error_type, refused.param, refused.code, headers)


# ---------------------------------------------------------------------------------------
# request parsing (pure)


def parse_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    check_depth(body, max_depth, raw=raw)  # RequestError naming the field: before any other work looks inside
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    return body


def check_chat(body: Mapping[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400,
            "'messages' must be a non-empty array",
            param="messages",
            code="missing_required_parameter" if messages is None else "invalid_type",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(
                400,
                f"messages[{i}] must be an object with a string 'role'",
                param=f"messages[{i}]",
                code="invalid_type",
            )
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")


def check_embeddings(body: Mapping[str, Any]) -> None:
    value = body.get("input")
    if not ((isinstance(value, str) and value) or (isinstance(value, list) and value)):
        raise ApiError(
            400,
            "'input' must be a non-empty string or array",
            param="input",
            code="missing_required_parameter" if value is None else "invalid_type",
        )


def make_call(request: web.Request, body: dict[str, Any], method: str, tenant: str) -> Call:
    """The call a request makes; `tenant`: the caller's key's ("" with auth off)."""
    priority_text = request.headers.get("x-switchgear-priority", "0")
    timeout_text = request.headers.get("x-switchgear-timeout", "0")
    try:
        priority, timeout_s = int(priority_text), float(timeout_text)
    except ValueError:
        raise ApiError(
            400,
            "x-switchgear-priority must be an integer and x-switchgear-timeout a number of seconds",
            param="headers",
        ) from None
    if not 0 <= priority <= 10 or not 0 <= timeout_s <= MAX_TIMEOUT_S:
        raise ApiError(400, f"priority must be 0..10 and timeout 0..{MAX_TIMEOUT_S:g} s", param="headers")
    user = body.get("user")
    retries_text = request.headers.get("x-switchgear-max-retries")
    max_retries: int | None = None
    if retries_text is not None:
        if not (retries_text.isascii() and retries_text.isdigit() and len(retries_text) <= 3):
            raise ApiError(400, "x-switchgear-max-retries must be a whole number from 0 to 999 "
                           "(at most the route's retry policy max_retries)", param="x-switchgear-max-retries")
        max_retries = int(retries_text)
    return Call(
        request_id=request_id_of(request) or access_log.request_id(request.headers.get("x-request-id")),
        category="",
        service=body["model"],
        method=method,
        payload=body,
        priority=priority or 5,
        timeout_s=timeout_s,
        user_id=user if isinstance(user, str) else "",
        session_id=request.headers.get("x-switchgear-session", ""),
        max_retries=max_retries,
        tenant=tenant,
        capabilities=required_of(request),
    )


def model_object(name: str, category: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner, "switchgear_category": category}


# ---------------------------------------------------------------------------------------
# handlers


def _snapshot(request: web.Request) -> AgentSnapshot:
    snapshot = request.app[_HOLDER].current
    if snapshot is None:
        raise ApiError(503, "agent has no snapshot from the control plane yet", "server_error", code="not_ready")
    return snapshot


def _unknown_model(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


def _check_model(snapshot: AgentSnapshot, name: str, category: str) -> None:
    service = snapshot.services.get(name)
    if service is None or service.category not in MODEL_CATEGORIES:
        raise _unknown_model(name)
    if category and service.category != category:
        raise ApiError(
            400,
            f"model `{name}` is a {service.category} service, not {category}",
            param="model",
            code="model_not_supported",
        )


def _result_headers(result: Result) -> dict[str, str]:
    headers = {
        "x-switchgear-service": result.service,
        "x-switchgear-endpoint": result.endpoint,
        "x-switchgear-attempts": str(result.attempts),
        "x-switchgear-cost-usd": f"{result.cost_usd:.8f}",
        "x-switchgear-snapshot-version": result.version,
    }
    if result.fallback:  # what answered instead of the requested model (service, local_model, ...)
        headers["x-switchgear-fallback"] = result.fallback_source
    if result.target is not None:  # the route target that served
        headers.update(target_headers((result.endpoint, result.target)))
    return headers


def _principal(request: web.Request, snapshot: AgentSnapshot) -> Principal | None:
    principal = request.app[_PIPELINE].identify(request.headers.get("Authorization"), snapshot)
    if principal is not None:
        access_log.note_tenant(principal.tenant.id)
    return principal


async def _invoke(request: web.Request, method: str, category: str) -> web.StreamResponse:
    snapshot = _snapshot(request)
    principal = _principal(request, snapshot)
    body = parse_body(await request.read(), request.app[_PIPELINE].max_json_depth)
    (check_chat if method == "chat.completions" else check_embeddings)(body)
    _check_model(snapshot, body["model"], category)
    access_log.note_route(body["model"])
    call = make_call(request, body, method, principal.tenant.id if principal else "")
    pipeline = request.app[_PIPELINE]
    if body.get("stream") is True:
        return await _stream(request, call, snapshot, body, principal)
    served = await pipeline.invoke(call, snapshot, principal, CacheMode.parse(request.headers.get("Cache-Control")))
    result = served.result
    access_log.note_answer(result.usage, result.cost_usd, result.endpoint,
                           result.attempts, served.cached)
    headers = _result_headers(result)
    if served.cached:
        headers["x-switchgear-cache"] = "hit"
    return web.Response(body=served.result.body, content_type="application/json", headers=headers)


async def _stream(
    request: web.Request, call: Call, snapshot: AgentSnapshot, body: Mapping[str, Any], principal: Principal | None
) -> web.StreamResponse:
    opened = await request.app[_HOOKS].open_stream(request, call, snapshot, principal, "x-request-id")
    if opened is None:
        raise ApiError(502, "upstream stream ended without an answer", "server_error")
    response, first, items = opened
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    item = await relay(response, first, items, lambda chunk: b"data: " + chunk + b"\n\n")
    if item.error is not None:
        await response.write(render(failed(item.error, item.attempts, item.service, item.endpoint,
                                           interrupted=True)).sse())
    else:
        if include_usage:
            await response.write(b"data: " + orjson.dumps(_usage_chunk(call, item)) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _usage_chunk(call: Call, end: StreamEnd) -> dict[str, Any]:
    usage = end.usage
    return {
        "id": f"chatcmpl-{call.request_id}",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": call.service,
        "choices": [],
        "usage": openai_usage(usage),
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _invoke(request, "chat.completions", "llm")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _invoke(request, "embeddings", "")


def _visible(service: ServiceView, principal: Principal | None) -> bool:
    """Whether the caller's key may use the service (every one in auth-none mode)."""
    return principal is None or may_call(principal.tenant, service.name, service.category, service.offered)


async def list_models(request: web.Request) -> web.StreamResponse:
    """The services and routes the caller's key may use (another tenant's stay out of sight)."""
    snapshot = _snapshot(request)
    principal = _principal(request, snapshot)
    data = [
        _route_object(s)
        for s in snapshot.services.values()
        if s.category in MODEL_CATEGORIES and not s.unsupported and _visible(s, principal)
    ]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def get_model(request: web.Request) -> web.StreamResponse:
    snapshot = _snapshot(request)
    principal = _principal(request, snapshot)
    name = request.match_info["model"]
    service = snapshot.services.get(name)
    if service is None or service.category not in MODEL_CATEGORIES or not _visible(service, principal):
        raise _unknown_model(name)  # one the key may not use is not listed either
    return web.Response(body=orjson.dumps(_route_object(service)), content_type="application/json")


def _route_object(service: ServiceView) -> dict[str, Any]:
    """A route as a model object, with the providers of its targets (`switchgear_providers`),
    every capability some target offers (`switchgear_capabilities`: what `x-switchgear-require`
    may name), and per target its capabilities and context window (tokens, 0 = unknown) in
    `switchgear_targets`, so a client can tell what a requirement leaves."""
    obj = model_object(service.name, service.category, service.protocol)
    targets = [(e.id, service.target(e)) for e in service.endpoints]
    obj["switchgear_providers"] = sorted({t.provider or t.protocol for _, t in targets})
    obj["switchgear_capabilities"] = sorted(service.offered)
    obj["switchgear_targets"] = [{"id": ident, "provider": t.provider or t.protocol,
                                  "capabilities": sorted(t.capabilities), "context_window": t.context_window}
                                 for ident, t in targets]
    return obj


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except ApiError as exc:
        access_log.note_reason(exc.code)
        return exc.response()
    except REFUSED as exc:
        refused = render(refusal(exc))
        access_log.note_reason(refused.code)
        return refused.response()
    except web.HTTPRequestEntityTooLarge:
        return ApiError(413, "request body too large", code="request_too_large").response()
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        return ApiError(exc.status, f"Invalid URL ({request.method} {request.path})", code="unknown_url").response()


def _in_order(order: BurstOrder) -> Callable[..., Awaitable[web.StreamResponse]]:
    """`_errors`, a POST's forward leg in one of `order`'s slots (burst_order.py). One middleware
    for both: aiohttp wraps each middleware anew for every request (a few µs each)."""

    @web.middleware
    async def in_order(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST":  # (model listings: no forward leg)
            return await _errors(request, handler)
        slot = order.free() or await order.enter()  # (BurstOrder.slot inline: ~1.5 µs less a request)
        token = order.mark(slot)
        try:
            return await _errors(request, handler)
        finally:
            order.unmark(slot, token)

    return in_order


def build_app(
    holder: Holder, invoker: Invoker, streamer: Streamer, pipeline: Pipeline | None = None,
    limits: DoorLimits = DEFAULT_LIMITS, observe: Observe | None = None, order: BurstOrder | None = None,
) -> web.Application:
    """`pipeline` governs and caches calls; None: open (no keys, quotas or cache), for tests.
    `observe`: the edge middleware (http_edge.py: request id, span, metrics, access log), outermost
    so that it sees the answer as sent (after the Anthropic door reshapes its errors). `order`: the
    forward leg's gate (burst_order.py), once the body is read whole, around the error mapping."""
    middlewares = [*((observe,) if observe is not None else ()), anthropic_door.reshape, body_guard(limits),
                   _in_order(order) if order is not None else _errors]
    app = web.Application(middlewares=middlewares, client_max_size=limits.max_body_bytes)
    app[_HOLDER] = holder
    app[_INVOKER] = invoker
    app[_STREAMER] = streamer
    app[_PIPELINE] = pipeline or open_pipeline(invoker.invoke)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    hooks = anthropic_door.Hooks(  # what the other wire shapes' routes take from this door
        _snapshot, _check_model, make_call, _result_headers, lambda r: r.app[_PIPELINE], lambda r: r.app[_STREAMER],
        _principal)
    app[_HOOKS] = hooks
    anthropic_door.add_routes(app, hooks)  # POST /v1/messages, on this door's pipeline
    responses_door.add_routes(app, hooks)  # POST /v1/responses, likewise
    invoke_door.add_routes(app, hooks)  # POST /v1/invoke: Gateway.Invoke in JSON, any category
    add_probes(app, holder)
    return app


async def start(
    holder: Holder, invoker: Invoker, streamer: Streamer, listen: str, pipeline: Pipeline | None = None,
    tls: ssl.SSLContext | None = None, limits: DoorLimits = DEFAULT_LIMITS, observe: Observe | None = None,
    reuse_port: bool = False, spread: Group | None = None, order: BurstOrder | None = None,
) -> tuple[web.AppRunner, str]:
    """Start the front door on `listen` ("host:port", port 0 picks one), over TLS when `tls` is
    given, bounded by `limits` (http_door.py); (runner, bound address). `reuse_port`: with
    SO_REUSEPORT, for the processes of one agent (`--workers`); `spread`: and their connections spread
    evenly over them (switchgear.rpc.spread)."""
    host, _, port = listen.rpartition(":")
    door = runner(build_app(holder, invoker, streamer, pipeline, limits, observe, order), limits)
    await door.setup()
    site: web.BaseSite
    if spread is not None:
        site = SpreadSite(door, host.strip("[]") or "127.0.0.1", int(port), spread, ssl_context=tls)
    else:
        site = web.TCPSite(door, host.strip("[]") or "127.0.0.1", int(port), backlog=1024, ssl_context=tls,
                           reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await door.cleanup()
        raise ListenError(f"--http-listen {listen}: {exc.strerror or exc}") from None
    bound = door.addresses[0]
    return door, f"{host or '127.0.0.1'}:{bound[1]}"
