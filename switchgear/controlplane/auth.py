"""Operator authentication: Admin, Governance and Tasks RPCs need the admin token, except:
applications' own task calls (submit, upload, get, cancel, list, watch) also take a tenant's
client key, and are then scoped to that tenant (`CALLER`, read by the TasksService).

The token travels as `authorization: Bearer <token>` metadata and is compared in constant
time. Agents' own calls (discovery, load reports, and the task calls a worker makes: lease,
heartbeat, complete, download a payload, defer an invocation: AGENT_METHODS) are not
operators' calls: they need the agent credential (a client certificate from the cluster CA, or
the agent bootstrap token), checked by agent_auth.py. Neither token opens the other role's
calls, and tenant keys open neither. Each token comes from a file (0600); when none is given
the control plane makes one beside its store on first start, so a fresh install is never open.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from switchgear.controlplane import tenancy
from switchgear.controlplane.model import RegistryState

log = logging.getLogger("switchgear.controlplane.auth")

PROTECTED_SERVICES = (
    "/switchgear.v1.AdminService/",
    "/switchgear.v1.GovernanceService/",
    "/switchgear.v1.TasksService/",
)

#: Calls agents make; they are agents' to make, never operators' (see the module docstring).
AGENT_METHODS = frozenset(f"/switchgear.v1.TasksService/{m}" for m in (
    "LeaseTasks", "HeartbeatTask", "CompleteTask", "DownloadBlob", "DeferInvoke"))


#: Applications' task calls: the admin token, or a tenant's client key scoped to that tenant.
TENANT_METHODS = frozenset(f"/switchgear.v1.TasksService/{m}" for m in (
    "SubmitTask", "UploadBlob", "GetTask", "CancelTask", "ListTasks", "WatchTasks"))

#: The tenant whose client key authorised the current call; None for the admin token (or with
#: admin auth off): every tenant's tasks.
CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("switchgear_task_caller", default=None)


def load_or_create_token(path: Path, role: str = "admin") -> str:
    """The `role` token in `path`, creating the file (mode 0600) with a fresh token when absent."""
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{role} token file {path} is empty")
        return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    log.info("created %s token file %s", role, path)
    return token


def bearer(metadata: Any) -> str | None:
    """What `authorization: Bearer <credential>` carries; None without one."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, presented = value.strip().partition(" ")
            return presented.strip() if scheme.lower() == "bearer" else None
    return None


def bearer_matches(metadata: Any, token: str) -> bool:
    presented = bearer(metadata)
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """`state` (the registry's current state) lets tenant keys through on TENANT_METHODS."""

    def __init__(self, token: str, protected: tuple[str, ...] = PROTECTED_SERVICES,
                 state: Callable[[], RegistryState] | None = None) -> None:
        self._token = token
        self._protected = protected
        self._state = state

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(self._protected) or method in AGENT_METHODS:
            return handler
        if bearer_matches(details.invocation_metadata, self._token):
            return handler
        if method in TENANT_METHODS and self._state is not None:
            presented = bearer(details.invocation_metadata)
            tenant = tenancy.tenant_of_key(self._state(), presented) if presented else None
            if tenant is not None:
                return _as_tenant(handler, tenant)
        return denied(handler, f"{method} needs the admin token (metadata 'authorization: Bearer <token>')"
                               + (" or a tenant's client key" if method in TENANT_METHODS else ""))


def _as_tenant(handler: grpc.RpcMethodHandler, tenant: str) -> grpc.RpcMethodHandler:
    """The handler run with CALLER set to `tenant` (in the call's own task context)."""
    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream(request: Any, context: Any) -> Any:
            CALLER.set(tenant)
            async for item in inner_stream(request, context):
                yield item

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    inner = handler.unary_unary or handler.stream_unary

    async def unary(request: Any, context: Any) -> Any:
        CALLER.set(tenant)
        return await inner(request, context)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


#: A refused request-streaming call waits at most this long for the caller's first message before
#: it is answered. grpc's aio client turns a message written after its call has ended into INTERNAL
#: ("Internal error from Core"), which would hide the refusal from an agent that writes its hello
#: at once to a server that refuses it sooner (switchgear.rpc on loopback, mostly).
DENY_FIRST_MESSAGE_S = 1.0


def denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED with `message`."""
    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if handler.request_streaming:  # the first message (unread), the request's end, or none in time
            with contextlib.suppress(Exception):
                await asyncio.wait_for(anext(aiter(request)), DENY_FIRST_MESSAGE_S)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
