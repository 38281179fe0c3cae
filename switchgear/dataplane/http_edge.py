"""The HTTP front door's edge: request id, SERVER span, overhead, metrics and access log, probes.

`observe(...)` is the door's outermost middleware. Per request it takes the caller's
`x-request-id` (access_log.request_id: bounded, else a new one) and echoes it, opens a SERVER
span continuing the caller's `traceparent` when tracing is on (upstream attempts become its
children), writes a whole answer itself, and once it is out runs the request's remaining work
(afterward.py: the cache store, the quota accounting) and records the request's families, its
overhead (its time up to the answer's last byte minus its upstream attempts') and its access-log
line (door_metrics.Edge, as the gRPC door does). A request whose tenant has requests or tokens per
minute limits gets them as rate-limit headers (quota.limit_headers) on a whole answer here, on a
stream where it is prepared (anthropic_door.Hooks.open_stream).
Handlers tell the current exchange what they learn through the `note_*` helpers.

Probes, unauthenticated and answering nothing else: `GET /healthz` is 200 while the process
serves; `GET /readyz` is 200 once the agent holds a snapshot, 503 before. Neither is logged
or counted as a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable

import orjson
from aiohttp import web

from switchgear.dataplane import access_log, afterward
from switchgear.dataplane.convert import NO_CAPABILITIES, capabilities_header
from switchgear.dataplane.door_metrics import Edge, http_status_class
from switchgear.dataplane.quota import limit_headers
from switchgear.dataplane.snapshot import Holder, TargetView
from switchgear.dataplane.stream import StreamEnd, StreamItem
from switchgear.dataplane.tracing import Tracing, response_attributes

PROBES = frozenset({"/healthz", "/readyz"})
_ROUTES = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/responses"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_OPERATIONS = {"/v1/chat/completions": "chat.completions", "/v1/embeddings": "embeddings",
               "/v1/responses": "responses", "/v1/invoke": "invoke"}

#: The request header naming the capabilities a target must offer to serve it (a comma list,
#: e.g. `vision,tools`): read the same way on every route of the door (`required_of`).
REQUIRE_HEADER = "x-switchgear-require"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def required_of(request: web.Request) -> frozenset[str]:
    """The capabilities the request's `x-switchgear-require` header(s) name (RequestError naming
    the header when malformed); none without the header — one lookup, nothing else."""
    values = request.headers.getall(REQUIRE_HEADER, ())
    return capabilities_header(values, REQUIRE_HEADER) if values else NO_CAPABILITIES
Observe = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def observe(edge: Edge, tracing: Tracing | None) -> Observe:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PROBES:
            return await handler(request)
        exchange = edge.begin("http", access_log.request_id(request.headers.get("x-request-id")))
        exchange.method = _OPERATIONS.get(request.path) or access_log.label(request.method)  # any token
        exchange.session = access_log.session_label(request.headers.get("x-switchgear-session"))
        request[_REQUEST_ID] = exchange.request_id
        response: web.StreamResponse | None = None
        left = sent = False
        work, token = afterward.collect()
        try:
            if tracing is None:
                response = await handler(request)
            else:
                response = await _traced(tracing, request, handler, exchange)
            if not response.prepared:
                response.headers["x-request-id"] = exchange.request_id
                if exchange.limits:  # the tenant's rate limits, on answers and refusals alike (quota.Limit)
                    response.headers.extend(limit_headers(exchange.limits, request.path.startswith("/v1/messages")))
                sent = await _send(request, response)
            return response
        except asyncio.CancelledError:
            left = True
            raise
        finally:
            afterward.stop(token)
            # no response: 499 when the caller went away (as nginx logs it), else an internal error
            status = response.status if response is not None else 499 if left else 500
            exchange.status, exchange.status_class = status, http_status_class(status)
            if status >= 400 and not exchange.reason:
                exchange.reason = f"http_{status}"
            if sent:  # the answer is out: its latency ends here, the request's remaining work runs next
                asyncio.get_running_loop().call_soon(_after, work, edge, exchange)
                exchange.close()
            else:
                _after(work, edge, exchange)

    return middleware


async def _send(request: web.Request, response: web.StreamResponse) -> bool:
    """Writes a whole answer now (aiohttp would write it when the middlewares return); False when
    the caller is gone (aiohttp's own write then meets the closed connection and drops it)."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        return False
    return True


def _after(work: afterward.Later, edge: Edge, exchange: access_log.Exchange) -> None:
    """The request's work after its answer (afterward.py), then its metrics and access-log line."""
    work.run()
    edge.finish(exchange)


async def _traced(tracing: Tracing, request: web.Request, handler: Handler,
                  exchange: access_log.Exchange) -> web.StreamResponse:
    # OpenTelemetry HTTP: "{method} {route}", "_OTHER" for a method outside the known set
    method = request.method if request.method in _METHODS else "_OTHER"
    path = request.path
    route = path if path in _ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else ""
    with tracing.server_span(f"{method} {route}".strip() if method != "_OTHER" else "HTTP", request.headers,
                             {"http.request.method": method, **({"http.route": route} if route else {})}) as span:
        response = await handler(request)
        if span.is_recording():
            span.set_attribute("http.response.status_code", response.status)
            body = response.body if isinstance(response, web.Response) and response.status == 200 else None
            if isinstance(body, bytes):
                response_attributes(span, body)
            tracing.finish_server_span(span, exchange, error=response.status >= 500)
        return response


_REQUEST_ID = web.RequestKey("switchgear_request_id", str)


def target_headers(committed: tuple[str, TargetView] | None) -> dict[str, str]:
    """The route target that served (docs/concepts/routes.md) as answer headers: both doors,
    unary answers and streams alike. `committed`: (endpoint id, target); None: no headers."""
    if committed is None:
        return {}
    endpoint, target = committed
    return {"x-switchgear-target": endpoint, "x-switchgear-provider": target.provider or target.protocol,
            "x-switchgear-target-model": target.model}


async def relay(response: web.StreamResponse, first: StreamItem, items: AsyncGenerator[StreamItem, None],
                encode: Callable[[bytes], bytes]) -> StreamEnd:
    """Writes a stream's chunks (`first`, then the rest of `items`), each as `encode` frames it
    for the door, up to its StreamEnd, which it returns after noting the answer's usage, cost,
    endpoint and attempts in the access log. The stream is closed whatever happens — also when
    the caller disconnects — so the upstream connection is released and the call charged now."""
    item = first
    try:
        while not isinstance(item, StreamEnd):
            await response.write(encode(item))
            item = await anext(items)
    finally:
        await items.aclose()
    access_log.note_answer(item.usage, item.cost_usd, item.endpoint, item.attempts)
    return item


def request_id_of(request: web.Request) -> str | None:
    """The id `observe` settled for this request (None when the door runs without an edge)."""
    return request.get(_REQUEST_ID)


def add_probes(app: web.Application, holder: Holder) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return _probe(200, "ok")

    async def readyz(request: web.Request) -> web.Response:
        return _probe(200, "ready") if holder.current is not None else _probe(503, "not ready")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def _probe(status: int, text: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"status": text}), content_type="application/json",
                        headers={"Cache-Control": "no-store"})
