"""The Gateway service applications call. Thin: convert, invoke, map failures to gRPC codes."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import duration_pb2

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.convert import RequestError, call_from_proto
from switchgear.dataplane.invoke import CallFailed, Invoker, Result, ServiceNotFound, Unsupported
from switchgear.dataplane.snapshot import Holder
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


def _response(request_id: str, result: Result) -> gateway_pb2.InvokeResponse:
    return gateway_pb2.InvokeResponse(
        request_id=request_id,
        payload=result.body,
        service=result.service,
        endpoint=result.endpoint,
        attempts=result.attempts,
        latency=_duration(result.latency_s),
        usage=common_pb2.Usage(
            input_tokens=result.usage.input_tokens,
            output_tokens=result.usage.output_tokens,
            cost_usd=result.cost_usd,
            estimated=result.usage.estimated,
        ),
        snapshot_version=result.version,
    )


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, holder: Holder, invoker: Invoker) -> None:
        self._holder = holder
        self._invoker = invoker

    async def Invoke(  # noqa: N802
        self, request: gateway_pb2.InvokeRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.InvokeResponse:
        snapshot = self._holder.current  # read once: the whole call uses one view
        if snapshot is None:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "agent has no snapshot from the control plane yet")
        try:
            call = call_from_proto(request)
            result = await self._invoker.invoke(call, snapshot)
        except RequestError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ServiceNotFound as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except Unsupported as exc:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, str(exc))
        except CallFailed as exc:
            await self._fail(context, exc)
        return _response(call.request_id, result)

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
