"""The Chroma adapter: protocol "chroma" (Chroma server, REST API v2).

Base URL: the server's root (`http://chroma:8000`; a trailing `/api/v2` is accepted).
Options: `tenant` (default "default_tenant"), `database` ("default_database"),
`auth_header` ("x-chroma-token"; "Authorization" sends `Bearer <key>`).

Methods (payload → request):
- "heartbeat": GET /api/v2/heartbeat
- "collections.create": POST /api/v2/tenants/{t}/databases/{d}/collections, the payload
  as body (`name`, `metadata`, `get_or_create`, `configuration`)
- "collections.list": GET …/collections (`limit`, `offset`)
- "collections.get" / "collections.delete": GET / DELETE …/collections/{name}
- "add", "upsert", "update", "query", "get", "delete", "count": POST (count: GET)
  …/collections/{collection_id}/{op}. The payload names the collection by `collection`
  (a name, resolved to its id with collections.get and cached per server) or
  `collection_id`; the rest of the payload is Chroma's own body (`ids`, `embeddings`,
  `documents`, `metadatas`, `query_embeddings`, `n_results`, `where`, `include`, ...). The
  server never embeds: supply vectors.

A payload may override `tenant` and `database`. The answer is Chroma's JSON, passed through.
Usage: vector stores count no tokens (a zero usage, not an estimate); price them with
`cost_per_request`. Errors are `{"error": "NotFoundError", "message": ...}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import orjson

from switchgear.adapters import _http
from switchgear.adapters.base import (
    AdapterRequest,
    AdapterResponse,
    ErrorKind,
    Target,
    TokenUsage,
    UpstreamError,
    all_have_ids,
)

PROTOCOL = "chroma"
_KNOWN = ("tenant", "database", "auth_header")
_RECORD_OPS = {
    "add": "POST",
    "upsert": "POST",
    "update": "POST",
    "query": "POST",
    "get": "POST",
    "delete": "POST",
    "count": "GET",
}
_MAX_CACHED_IDS = 4096


@dataclass(frozen=True)
class ChromaOptions:
    tenant: str = "default_tenant"
    database: str = "default_database"
    auth_header: str = "x-chroma-token"


def parse_options(options: Mapping[str, Any]) -> ChromaOptions:
    opts = _http.check_options(PROTOCOL, options, _KNOWN)
    d = ChromaOptions()
    return ChromaOptions(
        _http.str_option(opts, "tenant", d.tenant, allow_empty=False),
        _http.str_option(opts, "database", d.database, allow_empty=False),
        _http.str_option(opts, "auth_header", d.auth_header, allow_empty=False),
    )


class ChromaAdapter:
    """Adapter for Chroma's v2 REST API. Caches collection name → id per (server, tenant,
    database) — bounded, and dropped for a name whose id answers 404 (the collection was
    re-created). Safe to share across tasks on one event loop."""

    protocol: ClassVar[str] = PROTOCOL
    methods: ClassVar[frozenset[str]] = frozenset(
        {"heartbeat", "collections.create", "collections.list", "collections.get", "collections.delete", *_RECORD_OPS}
    )

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._ids: dict[tuple[str, str, str, str], str] = {}

    @staticmethod
    def idempotent(method: str, payload: Mapping[str, Any]) -> bool:
        """Reads, `update` and record `delete` may be hedged; `add` and `upsert` only when every
        record has its id (a second write of the same ids writes nothing new); creating or
        deleting a collection never (the second one fails)."""
        if method in ("add", "upsert"):
            return all_have_ids(payload)
        return method in ("heartbeat", "collections.list", "collections.get", "query", "get", "count", "update",
                          "delete")

    def parse_options(self, options: Mapping[str, Any]) -> ChromaOptions:
        return parse_options(options)

    async def invoke(self, client: Any, target: Target, request: AdapterRequest) -> AdapterResponse:
        if request.method not in self.methods:
            raise UpstreamError(ErrorKind.CLIENT, f"method {request.method!r} is not served by protocol {PROTOCOL}")
        options = target.options if isinstance(target.options, ChromaOptions) else ChromaOptions()
        payload = dict(request.payload)
        tenant = str(payload.pop("tenant", options.tenant))
        database = str(payload.pop("database", options.database))
        root = _http.base_url(target.base_url, "/api/v2")
        scope = f"{root}/api/v2/tenants/{quote(tenant, safe='')}/databases/{quote(database, safe='')}"
        call = _Call(self, client, target, request, options)
        method = request.method
        if method == "heartbeat":
            body = await call.json("GET", f"{root}/api/v2/heartbeat")
        elif method == "collections.create":
            body = await call.json("POST", f"{scope}/collections", payload)
        elif method == "collections.list":
            params = {k: payload[k] for k in ("limit", "offset") if k in payload}
            body = await call.json("GET", f"{scope}/collections", params=params)
        elif method in ("collections.get", "collections.delete"):
            name = _http.payload_str(payload, "name")
            self._ids.pop((root, tenant, database, name), None)
            body = await call.json(
                method.split(".")[1].upper() if method.endswith("delete") else "GET",
                f"{scope}/collections/{quote(name, safe='')}",
            )
        else:
            body = await self._record_op(call, root, tenant, database, scope, payload)
        return AdapterResponse(orjson.dumps(body), TokenUsage(), 200)

    async def _record_op(
        self, call: _Call, root: str, tenant: str, database: str, scope: str, payload: dict[str, Any]
    ) -> Any:
        method = call.request.method
        verb = _RECORD_OPS[method]
        collection_id = payload.pop("collection_id", None)
        name = payload.pop("collection", None)
        if collection_id is not None:
            return await call.json(
                verb,
                f"{scope}/collections/{quote(str(collection_id), safe='')}/{method}",
                payload if verb == "POST" else None,
            )
        if not isinstance(name, str) or not name:
            raise UpstreamError(
                ErrorKind.CLIENT, "payload.collection: required (a collection name), or give collection_id"
            )
        key = (root, tenant, database, name)
        for attempt in (1, 2):
            cid = self._ids.get(key)
            if cid is None:
                found = await call.json("GET", f"{scope}/collections/{quote(name, safe='')}")
                cid = str(found.get("id", "")) if isinstance(found, dict) else ""
                if not cid:
                    raise UpstreamError(ErrorKind.RETRYABLE, f"collection {name!r}: answer has no id")
                if len(self._ids) >= _MAX_CACHED_IDS:
                    self._ids.clear()
                self._ids[key] = cid
                attempt = 2  # a fresh id: a 404 now is the caller's
            try:
                return await call.json(verb, f"{scope}/collections/{cid}/{method}", payload if verb == "POST" else None)
            except UpstreamError as exc:
                if exc.status != 404 or attempt == 2:
                    raise
                self._ids.pop(key, None)  # stale id: the collection was deleted and re-created
        raise AssertionError("unreachable")


class _Call:
    """One adapter attempt's shared arguments (headers, deadline, secret)."""

    def __init__(
        self, adapter: ChromaAdapter, client: Any, target: Target, request: AdapterRequest, options: ChromaOptions
    ) -> None:
        self.adapter, self.client, self.target, self.request = adapter, client, target, request
        headers = dict(request.headers)
        if request.request_id:
            headers["X-Request-Id"] = request.request_id
        if target.api_key:
            bearer = options.auth_header.lower() == "authorization"
            headers[options.auth_header] = f"Bearer {target.api_key}" if bearer else target.api_key
        self.headers = headers

    async def json(self, verb: str, url: str, body: Any = None, **kwargs: Any) -> Any:
        _, parsed = await _http.call_json(
            self.client,
            verb,
            url,
            secret=self.target.api_key,
            timeout_s=self.request.timeout_s,
            headers=self.headers,
            now=self.adapter._wall_clock,
            body=body,
            **kwargs,
        )
        return parsed
