"""Connections and secrets for upstream calls, kept at the edge.

One pooled httpx.AsyncClient per (service, endpoint, url), made on first use and closed when
a snapshot no longer names it. Secrets are resolved here, on the agent, at call time; their
values are never logged or put in errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from switchgear.adapters.base import ErrorKind, ResponseLimits, UpstreamError
from switchgear.adapters.transport import pooled_client
from switchgear.dataplane.snapshot import AgentSnapshot, SecretRef

PoolKey = tuple[str, str, str, ResponseLimits]
_LIMITS = ResponseLimits()


class ClientPool:
    """Clients are adapters/transport.py FastClients (the httpx.AsyncClient subset adapters use:
    buffered calls on adapters/http1.py, streams on aiohttp; httpcore's own pool cost over half
    the agent's CPU under load), each bounded by its route target's ResponseLimits (a change of
    limits makes a new client); `make_client` overrides that."""

    def __init__(self, *, max_connections: int = 100,
                 make_client: Callable[[], httpx.AsyncClient] | None = None) -> None:
        self._clients: dict[PoolKey, httpx.AsyncClient] = {}
        self._make_client: Callable[[ResponseLimits], httpx.AsyncClient] = (
            (lambda _limits: make_client()) if make_client is not None
            else (lambda limits: pooled_client(max_connections, limits))
        )

    def get(self, service: str, endpoint: str, url: str, limits: ResponseLimits = _LIMITS) -> httpx.AsyncClient:
        key = (service, endpoint, url, limits)
        client = self._clients.get(key)
        if client is None:
            client = self._make_client(limits)
            self._clients[key] = client
        return client

    async def retain(self, snapshot: AgentSnapshot) -> None:
        """Close clients for endpoints the new snapshot no longer has."""
        live = {
            (s.name, e.id, e.url, s.target(e).limits) for s in snapshot.services.values() for e in s.endpoints
        }
        for key in [k for k in self._clients if k not in live]:
            await self._clients.pop(key).aclose()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


class SecretResolver:
    """Resolves secret references from the agent's environment or files."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if env is None else env
        self._files: dict[str, tuple[float, str]] = {}

    def resolve(self, ref: SecretRef | None) -> str | None:
        if ref is None:
            return None
        if ref.env:
            value = self._env.get(ref.env)
            if not value:
                raise UpstreamError(ErrorKind.CONFIG, f"secret {ref.describe()} is not set on this agent")
            return value
        return self._read_file(ref)

    def _read_file(self, ref: SecretRef) -> str:
        path = Path(ref.file)
        try:
            mtime = path.stat().st_mtime
            cached = self._files.get(ref.file)
            if cached and cached[0] == mtime:
                return cached[1]
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UpstreamError(
                ErrorKind.CONFIG, f"secret {ref.describe()} cannot be read on this agent: {exc.strerror}"
            ) from None
        if not value:
            raise UpstreamError(ErrorKind.CONFIG, f"secret {ref.describe()} is empty")
        self._files[ref.file] = (mtime, value)
        return value
