"""The Gateway service applications call. Thin: convert, invoke, render refusals
(`outcome.Refusal`, the one mapping both doors share) as gRPC status and trailers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from google.protobuf import duration_pb2

from switchgear.dataplane import access_log
from switchgear.dataplane.convert import call_from_proto
from switchgear.dataplane.invoke import Invoker, Result
from switchgear.dataplane.outcome import REFUSED, Refusal, failed, public_text, refusal
from switchgear.dataplane.pipeline import CacheMode, Pipeline, open_pipeline
from switchgear.dataplane.quota import limit_headers
from switchgear.dataplane.snapshot import Holder, TargetView
from switchgear.dataplane.stream import StreamEnd, Streamer
from switchgear.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


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
    usage.cache_read_input_tokens = result.usage.cache_read_input_tokens
    usage.cache_write_input_tokens = result.usage.cache_write_input_tokens
    usage.reasoning_tokens = result.usage.reasoning_tokens
    usage.web_search_requests = result.usage.web_search_requests
    usage.cost_usd = result.cost_usd
    if result.target is not None:
        _fill_target(response.target, result.endpoint, result.target)
    return response


def _fill_target(info: gateway_pb2.TargetInfo, endpoint: str, target: TargetView) -> None:
    """Which route target served: its id, provider, protocol, upstream model and prices."""
    info.id = endpoint
    info.provider = target.provider
    info.protocol = target.protocol
    info.model = target.model
    p = target.pricing
    pricing = info.pricing
    pricing.cost_per_1k_tokens = p.cost_per_1k_tokens
    pricing.input_cost_per_1k_tokens = p.input_cost_per_1k_tokens
    pricing.output_cost_per_1k_tokens = p.output_cost_per_1k_tokens
    pricing.cost_per_request = p.cost_per_request
    pricing.cache_read_input_cost_per_1k_tokens = p.cache_read_input_cost_per_1k_tokens
    pricing.cache_write_input_cost_per_1k_tokens = p.cache_write_input_cost_per_1k_tokens
    pricing.web_search_cost_per_1k_requests = p.web_search_cost_per_1k_requests


def _stream_end(request_id: str, end: StreamEnd) -> gateway_pb2.InvokeStreamEnd:
    msg = _stream_end_fields(request_id, end)
    if end.target is not None:
        _fill_target(msg.target, end.endpoint, end.target)
    return msg


def _stream_end_fields(request_id: str, end: StreamEnd) -> gateway_pb2.InvokeStreamEnd:
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
            cache_read_input_tokens=end.usage.cache_read_input_tokens,
            cache_write_input_tokens=end.usage.cache_write_input_tokens,
            reasoning_tokens=end.usage.reasoning_tokens,
            web_search_requests=end.usage.web_search_requests,
        ),
        failover=end.failover,
        snapshot_version=end.version,
        finish_reason=end.finish_reason,
        error_kind=end.error.kind.value if end.error else "",
        error_message=public_text(end.error.message) if end.error else "",
        fallback=end.fallback,
        fallback_source=end.fallback_source,
    )


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")


def _limit_trailers() -> list[tuple[str, str]]:
    """The tenant's rate limits as its admission left them (quota.limit_headers), as trailers."""
    exchange = access_log.current()
    return limit_headers(exchange.limits) if exchange is not None and exchange.limits else []


async def render(context: grpc.aio.ServicerContext, refused: Refusal,
                 extra: tuple[tuple[str, str], ...] = ()) -> NoReturn:
    """A refusal as this door says it: its status, and trailers `retry-after` (whole seconds),
    `switchgear-<name>` for each detail (attempts, error-kind, upstream-status, shed, ...) and
    the tenant's rate limits (`x-ratelimit-*`) when its admission read any."""
    trailers = [*extra, *((f"switchgear-{name}", value) for name, value in refused.details), *_limit_trailers()]
    if refused.retry_after is not None:
        trailers.append(("retry-after", refused.retry_after))
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
    await _abort(context, grpc.StatusCode[refused.grpc_status], refused.message)


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
            if principal is not None:
                access_log.note_tenant(principal.tenant.id)
            call = call_from_proto(request, self._pipeline.max_json_depth, principal.tenant.id if principal else "")
            mode = CacheMode.parse(metadata.get("cache-control"))
            served = await self._pipeline.invoke(call, snapshot, principal, mode)
        except REFUSED as exc:
            await render(context, refusal(exc))
        if served.cached:
            await context.send_initial_metadata((("switchgear-cache", "hit"),))
        limits = _limit_trailers()
        if limits:
            context.set_trailing_metadata(tuple(limits))
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
            if principal is not None:
                access_log.note_tenant(principal.tenant.id)
            call = call_from_proto(request.request, self._pipeline.max_json_depth,
                                   principal.tenant.id if principal else "")
            items = self._pipeline.stream(call, snapshot, principal, self._streamer.stream)
            first = await anext(items)
        except REFUSED as exc:
            await render(context, refusal(exc))
        item = first
        try:
            while not isinstance(item, StreamEnd):
                yield gateway_pb2.InvokeStreamResponse(chunk=item)
                item = await anext(items)
        finally:  # also when the caller cancels: release the upstream connection and charge now
            await items.aclose()
        yield gateway_pb2.InvokeStreamResponse(end=_stream_end(call.request_id, item))
        limits = _limit_trailers()
        if limits and item.error is None:  # (a failed stream's trailers are render's)
            context.set_trailing_metadata(tuple(limits))
        if item.error is not None:
            await render(context, failed(item.error, item.attempts, item.service, item.endpoint, interrupted=True),
                         (("switchgear-stream-interrupted", "after-first-token"),))
