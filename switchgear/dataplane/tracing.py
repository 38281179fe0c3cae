"""OpenTelemetry traces for the agent: a SERVER span per request, a child span per upstream attempt.

Off by default: with no OTLP endpoint (and no exporter given) `Tracing.configure` returns None
and nothing is installed — no server span, no observer, no adapter wrapper, so no span is
ever created and the request path pays nothing. On:

- both doors open a SERVER span continuing the caller's W3C trace context (`traceparent`,
  `tracestate`; a malformed one starts a new trace): `GatewayInterceptor` for GatewayService
  ("switchgear.v1.GatewayService/Invoke", from gRPC metadata) and the HTTP door's edge
  (http_edge.py, "POST /v1/chat/completions", from headers). It is made current for the call;
  `finish_server_span` records the request's outcome, and marks it ERROR only for the server's
  own failures (never a stack trace: NOT_FOUND, UNAUTHENTICATED and 4xx are the caller's);
- the `Tracing` object is an AttemptObserver: `attempt_started` opens a CLIENT span
  "{gen_ai.operation.name} {gen_ai.request.model}" under the current (server) span and makes
  it current until `attempt_ended`, which records outcome, usage and cost. Attempts of one call
  must be sequential on its task (they are: invoke.py awaits each one). In an unsampled trace
  no attempt span is made (the sampler would drop it): the request pays for its server span's
  context only;
- `wrap_adapters` puts the current span's context into every upstream request's headers
  (AdapterRequest.headers), so the upstream receives `traceparent`. `upstream_headers()` gives
  the same headers to any code that builds requests itself.

Attributes follow OpenTelemetry's GenAI semantic conventions: gen_ai.system (and
gen_ai.provider.name), gen_ai.operation.name, gen_ai.request.model, gen_ai.response.id /
.model / .finish_reasons (from the answer: on the SERVER span, and on the CLIENT span of the
attempt that served it, as the GenAI conventions put them on the inference call's span),
gen_ai.usage.input_tokens /
output_tokens (and, when the answer reported them, gen_ai.usage.cache_read.input_tokens /
cache_creation.input_tokens / reasoning.output_tokens: the GenAI registry's names, development
status, checked against semantic conventions 1.43; parts of the totals),
error.type, server.address / server.port (attempts: the upstream); and
switchgear.service, switchgear.endpoint, switchgear.attempt(s), switchgear.fallback,
switchgear.cost_usd, switchgear.snapshot_version, switchgear.cache_hit, switchgear.request_id.

Sampling: parent-based, trace-id ratio `sample_ratio` for new traces.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import nullcontext
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import grpc
import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from switchgear import __version__
from switchgear.adapters.base import Adapter, AdapterRequest, AdapterResponse, Target
from switchgear.dataplane import access_log
from switchgear.dataplane.access_log import Exchange
from switchgear.dataplane.door_metrics import Edge, grpc_status_class
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.snapshot import Holder

log = logging.getLogger("switchgear.dataplane.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()
GATEWAY_PREFIX = "/switchgear.v1.GatewayService/"
_OPERATIONS = {"chat.completions": "chat", "completions": "text_completion", "embeddings": "embeddings",
               "messages": "chat"}
_CATEGORY_OPERATIONS = {"llm": "chat", "embedding": "embeddings"}
#: gRPC codes that are the server's failure (OpenTelemetry's RPC conventions): only these mark
#: a SERVER span ERROR; NOT_FOUND, UNAUTHENTICATED and the like are the caller's.
_SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


def _server_address(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    attrs: dict[str, Any] = {"server.address": parts.hostname or ""}
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return attrs
    attrs["server.port"] = port
    return attrs


def response_attributes(span: trace.Span, body: bytes) -> None:
    """gen_ai.response.id / .model / .finish_reasons from an OpenAI-shaped JSON answer (or
    chunk), or an Anthropic-shaped one (its `stop_reason`; a stream's `message_start`)."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if isinstance(answer, dict) and answer.get("type") == "message_start":  # an Anthropic stream's first event
        answer = answer.get("message")
    if not isinstance(answer, dict):
        return
    for key, attr in (("id", "gen_ai.response.id"), ("model", "gen_ai.response.model")):
        value = answer.get(key)
        if isinstance(value, str) and value:
            span.set_attribute(attr, value)
    choices = answer.get("choices")
    if isinstance(choices, list):
        reasons = [c["finish_reason"] for c in choices
                   if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
        if reasons:
            span.set_attribute("gen_ai.response.finish_reasons", reasons)
    stop_reason = answer.get("stop_reason")
    if isinstance(stop_reason, str) and stop_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [stop_reason])


def upstream_headers() -> dict[str, str]:
    """W3C trace-context headers for the current span ({} when there is none)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def operation_name(method: str) -> str:
    return _OPERATIONS.get(method, method)


class _Getter:
    """Reads trace context from gRPC invocation metadata (keys are lower-case)."""

    @staticmethod
    def get(carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    @staticmethod
    def keys(carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _Getter()


class _Ids(RandomIdGenerator):
    """Random ids, except that the next trace id can be set beforehand: `server_span` draws a
    new trace's id itself to ask the sampler, and the SDK must then start the span with it."""

    next_trace_id = 0

    def generate_trace_id(self) -> int:
        trace_id, self.next_trace_id = self.next_trace_id, 0
        return trace_id or super().generate_trace_id()


class Tracing:
    def __init__(self, provider: TracerProvider, holder: Holder, ids: _Ids | None = None) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("switchgear.dataplane", __version__)
        self._holder = holder
        self._attempts: dict[tuple[str, int], tuple[trace.Span, object]] = {}
        self._ids = ids if ids is not None else _Ids()

    @classmethod
    def configure(
        cls,
        holder: Holder,
        *,
        otlp_endpoint: str = "",
        sample_ratio: float = 1.0,
        exporter: SpanExporter | None = None,
        service_name: str = "switchgear-agent",
        node_id: str = "",
    ) -> Tracing | None:
        """A Tracing exporting to `otlp_endpoint` (OTLP/HTTP, e.g. http://127.0.0.1:4318) or to
        `exporter` (synchronously: for tests); None when neither is given (tracing off)."""
        if not otlp_endpoint and exporter is None:
            return None
        resource = Resource.create({"service.name": service_name, "service.version": __version__,
                                    "service.instance.id": node_id})
        ids = _Ids()
        provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
                                  id_generator=ids)
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = otlp_endpoint.rstrip("/")
            url = url if url.endswith("/v1/traces") else url + "/v1/traces"
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        return cls(provider, holder, ids)

    def shutdown(self) -> None:
        self.provider.shutdown()

    # --- the Invoke span -------------------------------------------------------------------

    def server_span(self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]) -> _ServerSpan:
        """A SERVER span continuing the caller's trace (W3C headers in `carrier`; a malformed
        `traceparent` starts a new trace), made current for the `with` block. An exception
        passing through does not mark it ERROR nor record a stack trace: the door sets its status
        from the answer."""
        return _ServerSpan(self, name, carrier, attributes)

    invoke_span = server_span

    def finish_server_span(self, span: trace.Span, exchange: Exchange, error: bool) -> None:
        """The request's outcome on its SERVER span (GenAI attributes for the service asked
        for, usage, attempts); ERROR only for a failure that is not the caller's own."""
        if not span.is_recording():
            return
        if exchange.route:
            span.set_attributes(self.request_attributes(exchange.route, exchange.method))
        elif exchange.method in _OPERATIONS:
            span.set_attribute("gen_ai.operation.name", operation_name(exchange.method))
        span.set_attribute("switchgear.request_id", exchange.request_id)
        if exchange.session:
            span.set_attribute("session.id", exchange.session)
        if exchange.tenant:
            span.set_attribute("switchgear.tenant", exchange.tenant)
        if exchange.attempts:
            span.set_attribute("switchgear.attempts", exchange.attempts)
        if exchange.endpoint:
            span.set_attribute("switchgear.endpoint", exchange.endpoint)
        if exchange.input_tokens or exchange.output_tokens:
            usage_attributes(span, exchange.input_tokens, exchange.output_tokens, exchange.parts)
        if exchange.reason:
            span.set_attribute("error.type", exchange.reason)
        if error:
            span.set_status(Status(StatusCode.ERROR, exchange.reason))

    def request_attributes(self, service: str, method: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {"switchgear.service": service, "gen_ai.operation.name": operation_name(method)}
        snapshot = self._holder.current
        view = snapshot.services.get(service) if snapshot else None
        if view is not None:
            attrs["gen_ai.system"] = attrs["gen_ai.provider.name"] = view.protocol
            if view.model:
                attrs["gen_ai.request.model"] = view.model
            attrs["switchgear.snapshot_version"] = snapshot.version if snapshot else ""
        return attrs

    # --- attempt spans (AttemptObserver) ---------------------------------------------------

    def attempt_started(self, event: AttemptStart) -> None:
        parent = trace.get_current_span().get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:
            # An unsampled trace (most of them at a ratio below 1): the parent-based sampler would
            # drop the attempt span, so none is made and no attributes are gathered for it; the
            # upstream gets the server span's context (same trace, not sampled) in its headers.
            return
        snapshot = self._holder.current
        view = snapshot.services.get(event.service) if snapshot else None
        model = view.model if view else ""
        exchange = access_log.current()
        method = exchange.method if exchange is not None and exchange.method in _OPERATIONS else ""
        operation = operation_name(method) if method else _CATEGORY_OPERATIONS.get(event.category, event.category)
        attrs: dict[str, Any] = {
            "switchgear.service": event.service, "switchgear.endpoint": event.endpoint,
            "switchgear.attempt": event.attempt, "switchgear.category": event.category,
            "switchgear.request_id": event.request_id, "gen_ai.operation.name": operation,
        }
        if view is not None:
            attrs["gen_ai.system"] = attrs["gen_ai.provider.name"] = view.protocol
            if model:
                attrs["gen_ai.request.model"] = model
            url = next((e.url for e in view.endpoints if e.id == event.endpoint), "")
            if url:
                attrs.update(_server_address(url))
        # OpenTelemetry GenAI: "{gen_ai.operation.name} {gen_ai.request.model}"
        name = f"{operation} {model or event.service}"
        span = self.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs)
        token = otel_context.attach(trace.set_span_in_context(span))
        self._attempts[(event.request_id, event.attempt)] = (span, token)

    def attempt_ended(self, event: AttemptEnd) -> None:
        entry = self._attempts.pop((event.request_id, event.attempt), None)
        if entry is None:
            return
        span, token = entry
        try:
            if event.error is None:
                usage_attributes(span, event.usage.input_tokens, event.usage.output_tokens,
                                 access_log.parts_of(event.usage))
                span.set_attribute("switchgear.cost_usd", event.cost_usd)
                if span.is_recording():  # the inference call's answer (GenAI: on its CLIENT span)
                    if event.answer:
                        response_attributes(span, event.answer)
                    if event.finish_reason:
                        span.set_attribute("gen_ai.response.finish_reasons", [event.finish_reason])
            else:
                span.set_attribute("error.type", event.error.value)
                span.set_status(Status(StatusCode.ERROR, event.error.value))
            if event.ttft_s is not None:
                span.set_attribute("switchgear.ttft_s", event.ttft_s)
        finally:
            span.end()
            try:
                otel_context.detach(token)  # type: ignore[arg-type]
            except ValueError:  # ended on another context (should not happen): keep going
                log.debug("attempt span context detached out of order")

    # --- upstream headers ------------------------------------------------------------------

    def wrap_adapters(self, adapters: Mapping[str, Adapter]) -> dict[str, Adapter]:
        return {name: TracedAdapter(adapter) for name, adapter in adapters.items()}  # type: ignore[misc]


class _ServerSpan:
    """`Tracing.server_span`'s `with` block (a plain class: a generator-based context manager
    costs a generator, its helper and two frames more per request)."""

    __slots__ = ("_attributes", "_carrier", "_name", "_sdk", "_token", "_tracing")

    def __init__(self, tracing: Tracing, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]) -> None:
        self._tracing, self._name, self._carrier, self._attributes = tracing, name, carrier, attributes
        self._token: object = None
        self._sdk: Any = None

    def __enter__(self) -> trace.Span:
        tracing, name = self._tracing, self._name
        parent = _PROPAGATOR.extract(self._carrier, getter=_GETTER)  # type: ignore[arg-type]
        caller = trace.get_current_span(parent).get_span_context()
        trace_id = caller.trace_id if caller.is_valid else tracing._ids.generate_trace_id()
        # The provider's own sampler decides, as it would inside the SDK; an unsampled span (most
        # of them at a ratio below 1) is made here without the SDK's span machinery.
        sampling = tracing.provider.sampler.should_sample(parent, trace_id, name, SpanKind.SERVER)
        if sampling.decision is Decision.DROP:
            random_id = caller.trace_flags.random_trace_id if caller.is_valid else True  # (as the SDK flags it)
            flags = trace.TraceFlags.RANDOM_TRACE_ID if random_id else trace.TraceFlags.DEFAULT
            unsampled = trace.NonRecordingSpan(trace.SpanContext(
                trace_id, tracing._ids.generate_span_id(), is_remote=False, trace_flags=trace.TraceFlags(flags),
                trace_state=sampling.trace_state))
            self._token = otel_context.attach(trace.set_span_in_context(unsampled, parent))
            return unsampled
        if not caller.is_valid:
            tracing._ids.next_trace_id = trace_id  # the SDK starts the sampled span with the id decided on
        self._sdk = tracing.tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER,
                                                         attributes=dict(self._attributes), record_exception=False,
                                                         set_status_on_exception=False)
        span: trace.Span = self._sdk.__enter__()
        return span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._sdk is not None:
            self._sdk.__exit__(exc_type, exc, tb)
        else:
            otel_context.detach(self._token)  # type: ignore[arg-type]


class TracedAdapter:
    """An adapter that adds the current trace context to every upstream request's headers.

    Everything else (protocol, methods, parse_options, streaming methods) is the inner
    adapter's; the caller's own headers win over the trace headers.
    """

    def __init__(self, inner: Adapter) -> None:
        self._inner = inner
        self.protocol = inner.protocol
        self.methods = inner.methods
        check = getattr(inner, "idempotent", None)
        if check is not None:  # read per call (invoke.idempotent): found here, not through __getattr__
            self.idempotent = check

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def parse_options(self, options: Mapping[str, Any]) -> Any:
        return self._inner.parse_options(options)

    def invoke(self, client: Any, target: Target, request: AdapterRequest) -> Coroutine[Any, Any, AdapterResponse]:
        # (the inner adapter's own coroutine, not one more around it: one frame less each time the
        # call's task is resumed)
        return self._inner.invoke(client, target, _with_trace(request))

    def stream(self, client: Any, target: Target, request: AdapterRequest) -> Any:
        return self._inner.stream(client, target, _with_trace(request))  # type: ignore[attr-defined]


def _with_trace(request: AdapterRequest) -> AdapterRequest:
    """`request` with the current trace context added to its headers (its own headers win)."""
    headers = upstream_headers()
    if not headers:
        return request
    if request.headers:
        headers.update(request.headers)
    if type(request) is AdapterRequest:  # (dataclasses.replace walks the fields: 4 µs a call)
        return AdapterRequest(request.method, request.payload, request.timeout_s, request.request_id, headers,
                              request.tenant)
    return dataclasses.replace(request, headers=headers)


# --- the gRPC edge: one interceptor for traces and the overhead meter ----------------------------


Measure = Callable[[], Any]  # a context manager factory, e.g. AgentMetrics.measure


class GatewayInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps GatewayService handlers, the gRPC door's edge: the request id (the caller's
    `request_id`, else `x-request-id` metadata, bounded as access_log.request_id; the request
    carries the one used, so the answer does too), the SERVER span (when tracing is on), the
    overhead meter (when given) and, with an `edge`, the request's metrics and access-log line.
    Other services pass through untouched."""

    def __init__(self, tracing: Tracing | None, measure: Measure | None, edge: Edge | None = None) -> None:
        self._tracing = tracing
        self._measure = measure
        self._edge = edge
        # A wrapper reads what it needs of a call from its context, so one per method handler
        # serves every call (building one per call was ~5% of an agent's CPU per Invoke).
        self._wrapped: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(GATEWAY_PREFIX):
            return handler
        if self._tracing is None and self._measure is None and self._edge is None:
            return handler
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            wrapped = self._wrapped[handler] = self._wrap(handler, method[1:])
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, name), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, name), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _begin(self, call: Any, context: grpc.aio.ServicerContext) -> Exchange:
        given = call.request_id
        if not given:
            given = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
        rid = access_log.request_id(given if isinstance(given, str) else None)
        if rid != call.request_id:
            call.request_id = rid
        exchange = Exchange("grpc", rid)
        exchange.method = access_log.label(call.method)
        exchange.session = access_log.session_label(call.session_id)
        if self._edge is not None:
            self._edge.route(exchange, call.service)
        return exchange

    def _span(self, name: str, call: Any, context: grpc.aio.ServicerContext) -> Any:
        if self._tracing is None:
            return nullcontext(None)
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        return self._tracing.server_span(name, metadata, {
            **self._tracing.request_attributes(call.service, call.method), "rpc.system": "grpc",
            "rpc.service": name.partition("/")[0], "rpc.method": name.partition("/")[2]})

    def _end(self, exchange: Exchange, span: trace.Span | None, code: grpc.StatusCode) -> None:
        exchange.status = code.name
        exchange.status_class = grpc_status_class(code)
        if code != grpc.StatusCode.OK and not exchange.reason:
            exchange.reason = code.name.lower()
        if span is not None and self._tracing is not None:
            span.set_attribute("rpc.grpc.status_code", int(code.value[0]))
            self._tracing.finish_server_span(span, exchange, error=code in _SERVER_FAULTS)
        if self._edge is not None:
            self._edge.finish(exchange)
        else:
            exchange.close()

    def _unary(self, inner: Any, name: str) -> Any:
        measure = self._measure

        async def lean(request: Any, context: grpc.aio.ServicerContext) -> Any:
            """No span, no meter of its own: the edge alone (the usual agent, tracing off)."""
            return await self._call(inner, request, context, self._begin(request, context), None)

        if measure is None and self._tracing is None:
            return lean

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            exchange = self._begin(request, context)
            with measure() if measure is not None else nullcontext(), self._span(name, request, context) as span:
                return await self._call(inner, request, context, exchange, span)

        return behavior

    async def _call(self, inner: Any, request: Any, context: grpc.aio.ServicerContext, exchange: Exchange,
                    span: trace.Span | None) -> Any:
        code = grpc.StatusCode.OK
        try:
            response = await inner(request, context)
        except BaseException as exc:
            code = _code(context, exc)
            raise
        else:
            _answered(exchange, response, span)
        finally:
            self._end(exchange, span, code)
        return response

    def _stream(self, inner: Any, name: str) -> Any:
        measure = self._measure

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = request.request
            exchange = self._begin(call, context)
            with measure() if measure is not None else nullcontext(), self._span(name, call, context) as span:
                code = grpc.StatusCode.OK
                try:
                    async for item in inner(request, context):
                        if item.HasField("end"):
                            _answered(exchange, item.end, span)
                        yield item
                except BaseException as exc:
                    code = _code(context, exc)
                    raise
                finally:
                    self._end(exchange, span, code)

        return behavior


def _code(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    """The status a call that raised ends with (an abort's exception says only "aborted")."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code
    return grpc.StatusCode.UNKNOWN


def _answered(exchange: Exchange, response: Any, span: trace.Span | None) -> None:
    usage = response.usage
    exchange.answered(int(usage.input_tokens), int(usage.output_tokens), float(usage.cost_usd), response.endpoint,
                      int(response.attempts), bool(getattr(response, "cached", False)), access_log.parts_of(usage))
    if span is not None:
        _response_attributes(span, response)
        payload = getattr(response, "payload", b"")
        if payload and span.is_recording():
            response_attributes(span, payload)


def _response_attributes(span: trace.Span, response: Any) -> None:
    if not span.is_recording():
        return
    for attr, key in (("endpoint", "switchgear.endpoint"), ("attempts", "switchgear.attempts"),
                      ("fallback", "switchgear.fallback"), ("failover", "switchgear.fallback"),
                      ("cache_hit", "switchgear.cache_hit"), ("service", "switchgear.served_by"),
                      ("snapshot_version", "switchgear.snapshot_version")):
        value = getattr(response, attr, None)
        if value is not None and value != "":
            span.set_attribute(key, value)
    usage = getattr(response, "usage", None)
    if usage is not None:
        usage_attributes(span, int(usage.input_tokens), int(usage.output_tokens), access_log.parts_of(usage))
        span.set_attribute("switchgear.cost_usd", float(usage.cost_usd))


#: GenAI registry names for the parts of the token counts, in access_log.Parts order. Like
#: gen_ai.usage.input_tokens, which includes both cache parts, they are subsets of the totals.
#: In access_log.Parts order. GenAI's conventions name no attribute for a provider's own
#: searches, so that one is in Switchgear's namespace.
USAGE_PART_ATTRIBUTES = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_creation.input_tokens",
                         "gen_ai.usage.reasoning.output_tokens", "switchgear.usage.web_search_requests")


def usage_attributes(span: trace.Span, input_tokens: int, output_tokens: int, parts: access_log.Parts) -> None:
    """gen_ai.usage.*: the totals, and each part the answer reported (non-zero)."""
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    for name, count in zip(USAGE_PART_ATTRIBUTES, parts, strict=True):
        if count:
            span.set_attribute(name, count)


def observers(tracing: Tracing | None) -> Sequence[Any]:
    """The AttemptObservers tracing adds (none when off)."""
    return () if tracing is None else (tracing,)
