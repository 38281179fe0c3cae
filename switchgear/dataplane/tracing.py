"""OpenTelemetry traces for the agent: a span per Invoke, a child span per upstream attempt.

Off by default: with no OTLP endpoint (and no exporter given) `Tracing.configure` returns None
and nothing is installed — no interceptor span, no observer, no adapter wrapper, so no span is
ever created and the request path pays nothing. On:

- `interceptor(...)` wraps GatewayService methods: the W3C trace context (`traceparent`,
  `tracestate`) is taken from the caller's gRPC metadata, and a SERVER span
  "switchgear.v1.GatewayService/Invoke" is made current for the call;
- the `Tracing` object is an AttemptObserver: `attempt_started` opens a CLIENT span
  "{gen_ai.operation.name} {gen_ai.request.model}" under the current (Invoke) span and makes it
  current until `attempt_ended`, which records outcome, usage and cost. Attempts of one call
  must be sequential on its task (they are: invoke.py awaits each one);
- `wrap_adapters` puts the current span's context into every upstream request's headers
  (AdapterRequest.headers), so the upstream receives `traceparent`. `upstream_headers()` gives
  the same headers to any code that builds requests itself.

Attributes follow OpenTelemetry's GenAI semantic conventions: gen_ai.system (and
gen_ai.provider.name), gen_ai.operation.name, gen_ai.request.model,
gen_ai.usage.input_tokens / output_tokens, error.type, server.address; and switchgear.service,
switchgear.endpoint, switchgear.attempt(s), switchgear.fallback, switchgear.cost_usd,
switchgear.snapshot_version, switchgear.cache_hit.

Sampling: parent-based, trace-id ratio `sample_ratio` for new traces.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from switchgear import __version__
from switchgear.adapters.base import Adapter, AdapterRequest, AdapterResponse, Target
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.snapshot import Holder

log = logging.getLogger("switchgear.dataplane.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()
GATEWAY_PREFIX = "/switchgear.v1.GatewayService/"
_OPERATIONS = {"chat.completions": "chat", "completions": "text_completion", "embeddings": "embeddings",
               "messages": "chat"}


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


class Tracing:
    def __init__(self, provider: TracerProvider, holder: Holder) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("switchgear.dataplane", __version__)
        self._holder = holder
        self._attempts: dict[tuple[str, int], tuple[trace.Span, object]] = {}

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
        provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = otlp_endpoint.rstrip("/")
            url = url if url.endswith("/v1/traces") else url + "/v1/traces"
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        return cls(provider, holder)

    def shutdown(self) -> None:
        self.provider.shutdown()

    # --- the Invoke span -------------------------------------------------------------------

    @contextmanager
    def invoke_span(self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]) -> Iterator[trace.Span]:
        """A SERVER span continuing the caller's trace (W3C headers in `carrier`), made current."""
        parent = _PROPAGATOR.extract(carrier, getter=_Getter())  # type: ignore[arg-type]
        with self.tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER,
                                               attributes=dict(attributes)) as span:
            yield span

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
        snapshot = self._holder.current
        view = snapshot.services.get(event.service) if snapshot else None
        model = view.model if view else ""
        attrs: dict[str, Any] = {
            "switchgear.service": event.service, "switchgear.endpoint": event.endpoint,
            "switchgear.attempt": event.attempt, "switchgear.category": event.category,
            "switchgear.request_id": event.request_id,
        }
        if view is not None:
            attrs["gen_ai.system"] = attrs["gen_ai.provider.name"] = view.protocol
            if model:
                attrs["gen_ai.request.model"] = model
            url = next((e.url for e in view.endpoints if e.id == event.endpoint), "")
            if url:
                attrs["server.address"] = urlsplit(url).hostname or ""
        name = f"attempt {event.service}/{event.endpoint}" + (f" {model}" if model else "")
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
                span.set_attribute("gen_ai.usage.input_tokens", event.usage.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", event.usage.output_tokens)
                span.set_attribute("switchgear.cost_usd", event.cost_usd)
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


class TracedAdapter:
    """An adapter that adds the current trace context to every upstream request's headers.

    Everything else (protocol, methods, parse_options, streaming methods) is the inner
    adapter's; the caller's own headers win over the trace headers.
    """

    def __init__(self, inner: Adapter) -> None:
        self._inner = inner
        self.protocol = inner.protocol
        self.methods = inner.methods

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def parse_options(self, options: Mapping[str, Any]) -> Any:
        return self._inner.parse_options(options)

    async def invoke(self, client: Any, target: Target, request: AdapterRequest) -> AdapterResponse:
        headers = upstream_headers()
        if headers:
            request = dataclasses.replace(request, headers={**headers, **request.headers})
        return await self._inner.invoke(client, target, request)

    def stream(self, client: Any, target: Target, request: AdapterRequest) -> Any:
        headers = upstream_headers()
        if headers:
            request = dataclasses.replace(request, headers={**headers, **request.headers})
        return self._inner.stream(client, target, request)  # type: ignore[attr-defined]


# --- the gRPC edge: one interceptor for traces and the overhead meter ----------------------------


Measure = Callable[[], Any]  # a context manager factory, e.g. AgentMetrics.measure


class GatewayInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps GatewayService handlers: Invoke span (when tracing is on) and overhead (when a meter
    is given). Other services pass through untouched."""

    def __init__(self, tracing: Tracing | None, measure: Measure | None) -> None:
        self._tracing = tracing
        self._measure = measure
        # Without tracing a wrapper needs nothing of the call, so one per method handler serves
        # every call (building it per call was ~5% of an agent's CPU per Invoke).
        self._untraced: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(GATEWAY_PREFIX):
            return handler
        if self._tracing is None:
            if handler.unary_unary is None:
                return handler
            wrapped = self._untraced.get(handler)
            if wrapped is None:
                wrapped = self._untraced[handler] = grpc.unary_unary_rpc_method_handler(
                    self._unary(handler.unary_unary, method[1:], {}), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
            return wrapped
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method[1:], metadata),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None and self._tracing is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method[1:], metadata),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler

    def _unary(self, inner: Any, name: str, metadata: Mapping[str, str]) -> Any:
        tracing, measure = self._tracing, self._measure

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if measure is None:
                return await self._traced(inner, name, metadata, request, context)
            with measure():
                return await self._traced(inner, name, metadata, request, context)

        return behavior if (tracing is not None or measure is not None) else inner

    async def _traced(self, inner: Any, name: str, metadata: Mapping[str, str], request: Any,
                      context: grpc.aio.ServicerContext) -> Any:
        if self._tracing is None:
            return await inner(request, context)
        with self._tracing.invoke_span(name, metadata, self._tracing.request_attributes(
                getattr(request, "service", ""), getattr(request, "method", ""))) as span:
            try:
                response = await inner(request, context)
            except BaseException:
                _status_attributes(span, context)
                raise
            _response_attributes(span, response)
            return response

    def _stream(self, inner: Any, name: str, metadata: Mapping[str, str]) -> Any:
        tracing = self._tracing
        assert tracing is not None

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = getattr(request, "request", request)
            with tracing.invoke_span(name, metadata, tracing.request_attributes(
                    getattr(call, "service", ""), getattr(call, "method", ""))) as span:
                async for item in inner(request, context):
                    if getattr(item, "HasField", None) and item.HasField("end"):
                        _response_attributes(span, item.end)
                    yield item

        return behavior


def _status_attributes(span: trace.Span, context: grpc.aio.ServicerContext) -> None:
    """The gRPC status an aborted call ends with (the exception itself says only "aborted")."""
    code = context.code() if hasattr(context, "code") else None
    if code is not None and span.is_recording():
        span.set_attribute("rpc.grpc.status_code", int(code.value[0]) if hasattr(code, "value") else int(code))
        span.set_status(Status(StatusCode.ERROR, f"{getattr(code, 'name', code)}: {context.details() or ''}"))


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
        span.set_attribute("gen_ai.usage.input_tokens", int(usage.input_tokens))
        span.set_attribute("gen_ai.usage.output_tokens", int(usage.output_tokens))
        span.set_attribute("switchgear.cost_usd", float(usage.cost_usd))


def observers(tracing: Tracing | None) -> Sequence[Any]:
    """The AttemptObservers tracing adds (none when off)."""
    return () if tracing is None else (tracing,)
