"""Channels to the control plane that carry the admin token, for the CLI, demo and tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc

from switchgear.tls import ClientTls

TOKEN_ENV = "SWITCHGEAR_ADMIN_TOKEN"
API_KEY_ENV = "SWITCHGEAR_API_KEY"


def resolve_token(token_file: str | None = None) -> str | None:
    """The admin token from a file, else from $SWITCHGEAR_ADMIN_TOKEN; None when neither is set."""
    if token_file:
        return Path(token_file).read_text(encoding="utf-8").strip()
    return os.environ.get(TOKEN_ENV) or None


def resolve_credential(token_file: str | None = None, api_key: str | None = None) -> str | None:
    """What task commands send: --api-key, else the admin token (--admin-token-file, else
    $SWITCHGEAR_ADMIN_TOKEN), else $SWITCHGEAR_API_KEY; None when none is set."""
    return api_key or resolve_token(token_file) or os.environ.get(API_KEY_ENV) or None


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def admin_channel(address: str, token: str | None, tls: ClientTls | None = None) -> grpc.Channel:
    """A blocking channel to `address` that sends `token` (when given) with every call."""
    channel = grpc.secure_channel(address, tls.credentials()) if tls else grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
