"""The Gateway service applications call. Thin: convert, invoke, map failures to gRPC codes."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from google.protobuf import duration_pb2

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.convert import RequestError, call_from_proto
from switchgear.dataplane.governance import PermissionDenied, Unauthenticated
from switchgear.dataplane.invoke import CallFailed, Invoker, Result, ServiceNotFound, Unsupported
from switchgear.dataplane.pipeline import CacheMode, Pipeline, QuotaExceeded, open_pipeline
from switchgear.dataplane.resilience.admission import ShedReason
from switchgear.dataplane.resilience.admission_edge import Shed
from switchgear.dataplane.snapshot import Holder
from switchgear.dataplane.stream import StreamEnd, Streamer
from switchgear.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

#: How a final upstream failure surfaces to the application.
STATUS_BY_KIND = {
    ErrorKind.RETRYABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.CONNECT: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CLIENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.CONTEXT_LENGTH: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.AUTH: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.CONFIG: grpc.StatusCode.FAILED_PRECONDITION,
}


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _response(request_id: str, result: Result, cached: bool = False, tenant: str = "") -> gateway_pb2.InvokeResponse:
    response = gateway_pb2.InvokeResponse(
        cached=cached,
        tenant=tenant,
        fallback=result.fallback,
        fallback_source=result.fallback_source,
        request_id=request_id,
        payload=result.body,
        service=result.service,
        endpoint=result.endpoint,
        attempts=result.attempts,
        snapshot_version=result.version,
    )
    # Sub-messages filled in place: building them and copying them in cost a third more.
    response.latency.FromNanoseconds(round(result.latency_s * 1e9))
    usage = response.usage
    usage.input_tokens = result.usage.input_tokens
    usage.output_tokens = result.usage.output_tokens
    usage.estimated = result.usage.estimated
    usage.cost_usd = result.cost_usd
    return response


def _stream_end(request_id: str, end: StreamEnd) -> gateway_pb2.InvokeStreamEnd:
    return gateway_pb2.InvokeStreamEnd(
        request_id=request_id,
        service=end.service,
        endpoint=end.endpoint,
        attempts=end.attempts,
        latency=_duration(end.latency_s),
        ttft=_duration(end.ttft_s),
        usage=common_pb2.Usage(
            input_tokens=end.usage.input_tokens,
            output_tokens=end.usage.output_tokens,
            cost_usd=end.cost_usd,
            estimated=end.usage.estimated,
        ),
        failover=end.failover,
        snapshot_version=end.version,
        finish_reason=end.finish_reason,
        error_kind=end.error.kind.value if end.error else "",
        error_message=end.error.message if end.error else "",
    )


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")


async def _shed(context: grpc.aio.ServicerContext, shed: Shed) -> NoReturn:
    """Admission refused the call: RESOURCE_EXHAUSTED with a `retry-after` trailer (whole
    seconds, at least 1) when the queue was full or its wait ran out, DEADLINE_EXCEEDED when
    the call's own deadline passed while it waited."""
    retry_after = str(max(1, math.ceil(shed.retry_after_s)))
    context.set_trailing_metadata((("retry-after", retry_after), ("switchgear-shed", shed.reason.value)))
    if shed.reason is ShedReason.DEADLINE:
        await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed while queued for admission: {shed}")
    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded, request shed: {shed}")


_REJECTION_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ServiceNotFound, grpc.StatusCode.NOT_FOUND),
    (Unsupported, grpc.StatusCode.UNIMPLEMENTED),
)
REJECTIONS: tuple[type[Exception], ...] = (*(kind for kind, _ in _REJECTION_CODES), QuotaExceeded, CallFailed, Shed)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self, holder: Holder, invoker: Invoker, streamer: Streamer | None = None, pipeline: Pipeline | None = None
    ) -> None:
        self._holder = holder
        self._invoker = invoker
        self._streamer = streamer
        self._pipeline = pipeline or open_pipeline(invoker.invoke)

    async def Invoke(  # noqa: N802
        self, request: gateway_pb2.InvokeRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.InvokeResponse:
        snapshot = self._holder.current  # read once: the whole call uses one view
        if snapshot is None:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "agent has no snapshot from the control plane yet")
        metadata = dict(context.invocation_metadata() or ())
        try:
            principal = self._pipeline.identify(metadata.get("authorization"), snapshot)
            call = call_from_proto(request)
            mode = CacheMode.parse(metadata.get("cache-control"))
            served = await self._pipeline.invoke(call, snapshot, principal, mode)
        except REJECTIONS as exc:
            await self._reject(context, exc)
        if served.cached:
            await context.send_initial_metadata((("switchgear-cache", "hit"),))
        return _response(call.request_id, served.result, served.cached, served.tenant)

    async def InvokeStream(  # noqa: N802
        self, request: gateway_pb2.InvokeStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.InvokeStreamResponse]:
        """Chunks, then one `end`. A failure after the first token is reported in `end`
        (error_kind, error_message) and then as the call's status, with trailer
        `switchgear-stream-interrupted: after-first-token`."""
        snapshot = self._holder.current
        if snapshot is None or self._streamer is None:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "agent has no snapshot from the control plane yet")
        metadata = dict(context.invocation_metadata() or ())
        try:
            principal = self._pipeline.identify(metadata.get("authorization"), snapshot)
            call = await self._pipeline.prepare(call_from_proto(request.request), snapshot, principal)
            items = self._streamer.stream(call, snapshot)
            first = await anext(items)
        except REJECTIONS as exc:
            await self._reject(context, exc)
        item = first
        try:
            while not isinstance(item, StreamEnd):
                yield gateway_pb2.InvokeStreamResponse(chunk=item)
                item = await anext(items)
        finally:  # also when the caller cancels: release the upstream connection now
            await items.aclose()
        await self._pipeline.account(principal, call.service, item.usage, item.cost_usd)
        yield gateway_pb2.InvokeStreamResponse(end=_stream_end(call.request_id, item))
        if item.error is not None:
            context.set_trailing_metadata((
                ("switchgear-stream-interrupted", "after-first-token"),
                ("switchgear-error-kind", item.error.kind.value),
            ))
            await _abort(context, STATUS_BY_KIND[item.error.kind],
                         f"stream interrupted after the first token (no failover possible): {item.error.message}")

    async def _reject(self, context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
        """Every way a call is refused before it answers, as one status mapping for both RPCs."""
        if isinstance(exc, CallFailed):
            await self._fail(context, exc)
        if isinstance(exc, Shed):
            await _shed(context, exc)
        if isinstance(exc, QuotaExceeded):
            context.set_trailing_metadata((("retry-after", f"{exc.retry_after_s:.0f}"),))
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"quota: {exc.reason}")
        code = next(code for kind, code in _REJECTION_CODES if isinstance(exc, kind))
        await _abort(context, code, str(exc))

    async def _fail(self, context: grpc.aio.ServicerContext, failure: CallFailed) -> NoReturn:
        error = failure.error
        metadata = [("switchgear-attempts", str(failure.attempts)), ("switchgear-error-kind", error.kind.value)]
        if error.status is not None:
            metadata.append(("switchgear-upstream-status", str(error.status)))
        if error.retry_after_s is not None:
            metadata.append(("retry-after", f"{error.retry_after_s:g}"))
        context.set_trailing_metadata(tuple(metadata))
        message = f"{error.kind.value} after {failure.attempts} attempt(s): {error.message}"
        await _abort(context, STATUS_BY_KIND[error.kind], message)
