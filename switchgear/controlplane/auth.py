"""Operator authentication: Admin, Governance and Tasks RPCs need the admin token.

The token travels as `authorization: Bearer <token>` metadata and is compared in constant
time. Agents' own calls (discovery, load reports, and the task calls a worker makes: lease,
heartbeat, complete, download a payload, defer an invocation) are not covered here: like the
snapshot stream they are protected by mTLS when TLS is on, and agents never hold the admin
token. The token comes from a file (0600); when none is given the control plane makes one
beside its store on first start, so a fresh install is never open.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("switchgear.controlplane.auth")

PROTECTED_SERVICES = (
    "/switchgear.v1.AdminService/",
    "/switchgear.v1.GovernanceService/",
    "/switchgear.v1.TasksService/",
)

#: Calls agents make; they are agents' to make, never operators' (see the module docstring).
AGENT_METHODS = frozenset(f"/switchgear.v1.TasksService/{m}" for m in (
    "LeaseTasks", "HeartbeatTask", "CompleteTask", "DownloadBlob", "DeferInvoke"))


def load_or_create_token(path: Path) -> str:
    """The token in `path`, creating the file (mode 0600) with a fresh token when absent."""
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"admin token file {path} is empty")
        return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    log.info("created admin token file %s", path)
    return token


def bearer_matches(metadata: Any, token: str) -> bool:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, presented = value.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(presented.encode(), token.encode())
    return False


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, token: str, protected: tuple[str, ...] = PROTECTED_SERVICES) -> None:
        self._token = token
        self._protected = protected

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
        return _denied(handler, method)


def _denied(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{method} needs the admin token (metadata 'authorization: Bearer <token>')",
        )

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
