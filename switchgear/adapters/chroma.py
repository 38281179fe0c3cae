"""The Chroma adapter: protocol "chroma" (Chroma server, REST API v2).

Base URL: the server's root (`http://chroma:8000`; a trailing `/api/v2` is accepted).
Options: `tenant` (default "default_tenant"), `database` ("default_database"),
`auth_header` ("x-chroma-token"; "Authorization" sends `Bearer <key>`), `database_scope`
("service", default, or "tenant") and `scope_prefix` (see below).

Methods (payload → request):
- "heartbeat": GET /api/v2/heartbeat
- "collections.create": POST /api/v2/tenants/{t}/databases/{d}/collections, the payload
  as body (`name`, `metadata`, `get_or_create`, `configuration`)
- "collections.list": GET …/collections (`limit`, `offset`)
- "collections.get" / "collections.delete": GET / DELETE …/collections/{name}
- "add", "upsert", "update", "query", "get", "delete", "count": POST (count: GET)
  …/collections/{collection_id}/{op}. The payload names the collection by `collection`
  (a name, resolved to its id with collections.get and cached per server and scope) or
  `collection_id`; the rest of the payload is Chroma's own body (`ids`, `embeddings`,
  `documents`, `metadatas`, `query_embeddings`, `n_results`, `where`, `include`, ...). The
  server never embeds: supply vectors.

Scope (adapters/_scope.py): a call reaches one Chroma tenant and database, never one the
payload names. The tenant is `options.tenant`; the database is `options.database`, or with
`database_scope: tenant` the caller's own, `<scope_prefix><switchgear tenant>` (with "_0"
appended when that is not a name Chroma takes: shorter than 3 characters or ending in "-"),
created on the first call that needs it. A payload `tenant` or `database` is dropped when it
repeats the scope and refused (CLIENT, naming the field) otherwise. Chroma's server does not
check that a collection id belongs to the tenant and database in the URL, so a payload
`collection_id` is taken only when it is one of the scope's collections: known from an
answer in this scope (create, get, list, a resolved name) or found by listing the scope's
collections (at most 1,000); any other is refused naming `payload.collection_id`. A collection
name that goes into a URL (`name`, `collection`) must be one Chroma takes: "." or ".." would be
a dot segment resolving to the database itself (DELETE …/collections/.. deletes the database).

The answer is Chroma's JSON, passed through.
Usage: vector stores count no tokens (a zero usage, not an estimate); price them with
`cost_per_request`. Errors are `{"error": "NotFoundError", "message": ...}`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import orjson

from switchgear.adapters import _http, _scope
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
_KNOWN = ("tenant", "database", "auth_header", "database_scope", "scope_prefix")
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
_MAX_KNOWN_DATABASES = 4096
#: Listing a scope's collections to find a payload's collection_id: pages of this many, at most
#: this many pages (a scope with more collections names them by `collection`).
_LIST_PAGE = 100
_LIST_PAGES = 10
#: Chroma's rule for tenant, database and collection names (its InvalidArgumentError says so).
_CHROMA_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]")
_PREFIX = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]*")

Scope = tuple[str, str, str]  # (server root, Chroma tenant, database)


@dataclass(frozen=True)
class ChromaOptions:
    tenant: str = "default_tenant"
    database: str = "default_database"
    auth_header: str = "x-chroma-token"
    database_per_tenant: bool = False  # database_scope: tenant
    scope_prefix: str = ""

    @property
    def tenant_scoped(self) -> bool:
        """Whether callers of different Switchgear tenants reach different data."""
        return self.database_per_tenant

    def database_for(self, tenant: str) -> str:
        """The database a call of Switchgear tenant `tenant` ("" = none) reaches."""
        if not self.database_per_tenant or not tenant:
            return self.database
        name = self.scope_prefix + tenant
        # (tenant ids hold no "_", so the suffix cannot make one tenant's name another's)
        return name if _CHROMA_NAME.fullmatch(name) else f"{name}_0"

    def describe_scope(self) -> str:
        """What `config validate` prints: the tenant and database calls reach."""
        if self.database_per_tenant:
            return (f"scope=chroma tenant {self.tenant}, database {self.scope_prefix}<tenant> per Switchgear tenant "
                    f"(created on first use; {self.database} without one)")
        return f"scope=chroma tenant {self.tenant}, database {self.database}"


def parse_options(options: Mapping[str, Any]) -> ChromaOptions:
    opts = _http.check_options(PROTOCOL, options, _KNOWN)
    d = ChromaOptions()
    scoped = _scope.scope_option(opts, "database_scope")
    return ChromaOptions(
        _http.str_option(opts, "tenant", d.tenant, allow_empty=False),
        _http.str_option(opts, "database", d.database, allow_empty=False),
        _http.str_option(opts, "auth_header", d.auth_header, allow_empty=False),
        scoped,
        _scope.prefix_option(opts, scoped, "database_scope", _PREFIX),
    )


def _collection_name(payload: Mapping[str, Any], key: str) -> str:
    """`payload[key]` as a collection name that goes into a URL's path: a name Chroma takes
    (`_CHROMA_NAME`). Anything else names no collection, and "." or ".." would be a dot segment
    an HTTP client or proxy resolves (`collections/..` is the database itself)."""
    name = _http.payload_str(payload, key)
    if not _CHROMA_NAME.fullmatch(name):
        raise UpstreamError(ErrorKind.CLIENT, f"payload.{key}: not a Chroma collection name (3 to 512 of "
                                              "a-z A-Z 0-9 . _ -, starting and ending with a letter or digit)")
    return name


class ChromaAdapter:
    """Adapter for Chroma's v2 REST API. Caches collection name → id per (server, tenant,
    database) — bounded, and dropped for a name whose id answers 404 (the collection was
    re-created) — and the ids known to be in each scope. Safe to share across tasks on one
    event loop."""

    protocol: ClassVar[str] = PROTOCOL
    methods: ClassVar[frozenset[str]] = frozenset(
        {"heartbeat", "collections.create", "collections.list", "collections.get", "collections.delete", *_RECORD_OPS}
    )

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._ids: dict[tuple[str, str, str, str], str] = {}  # (*scope, name) -> id
        self._scoped: dict[tuple[str, str, str, str], str] = {}  # (*scope, id) -> name: ids in that scope
        self._databases: set[Scope] = set()  # per-tenant databases known to exist
        self._creating: dict[Scope, asyncio.Lock] = {}

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
        tenant, database = options.tenant, options.database_for(request.tenant)
        own = options.database_per_tenant and bool(request.tenant)
        _scope.pinned(payload, "tenant", tenant, "set by the service (options.tenant)")
        _scope.pinned(payload, "database", database, "derived from your tenant (options.database_scope: tenant)"
                      if own else "set by the service (options.database)")
        root = _http.base_url(target.base_url, "/api/v2")
        where: Scope = (root, tenant, database)
        scope = f"{root}/api/v2/tenants/{quote(tenant, safe='')}/databases/{quote(database, safe='')}"
        call = _Call(self, client, target, request, options)
        method = request.method
        if method == "heartbeat":
            body = await call.json("GET", f"{root}/api/v2/heartbeat")
            return AdapterResponse(orjson.dumps(body), TokenUsage(), 200)
        if own:
            await self._ensure_database(call, where)
        if method == "collections.create":
            body = await call.json("POST", f"{scope}/collections", payload)
            self._learn(where, body)
        elif method == "collections.list":
            params = {k: payload[k] for k in ("limit", "offset") if k in payload}
            body = await call.json("GET", f"{scope}/collections", params=params)
            for found in body if isinstance(body, list) else ():
                self._learn(where, found)
        elif method == "collections.get":
            name = _collection_name(payload, "name")
            body = await call.json("GET", f"{scope}/collections/{quote(name, safe='')}")
            self._learn(where, body)
        elif method == "collections.delete":
            name = _collection_name(payload, "name")
            self._forget(where, name)
            body = await call.json("DELETE", f"{scope}/collections/{quote(name, safe='')}")
        else:
            body = await self._record_op(call, where, scope, payload)
        return AdapterResponse(orjson.dumps(body), TokenUsage(), 200)

    async def _ensure_database(self, call: _Call, where: Scope) -> None:
        """Create a per-tenant database the first time this adapter reaches it (one creation at a
        time per database; "already exists" is success)."""
        if where in self._databases:
            return
        lock = self._creating.setdefault(where, asyncio.Lock())
        try:
            async with lock:
                if where in self._databases:
                    return
                root, tenant, database = where
                try:
                    await call.json("POST", f"{root}/api/v2/tenants/{quote(tenant, safe='')}/databases",
                                    {"name": database})
                except UpstreamError as exc:
                    if exc.status != 409:  # 409: it exists already
                        raise
                if len(self._databases) >= _MAX_KNOWN_DATABASES:
                    self._databases.clear()
                self._databases.add(where)
        finally:
            if self._creating.get(where) is lock:
                del self._creating[where]

    def _learn(self, where: Scope, collection: Any) -> None:
        """Remember a collection an answer in scope `where` described (its name and id)."""
        if not isinstance(collection, dict):
            return
        name, cid = collection.get("name"), collection.get("id")
        if isinstance(name, str) and isinstance(cid, str) and name and cid:
            self._remember(where, name, cid)

    def _remember(self, where: Scope, name: str, cid: str) -> None:
        if len(self._ids) >= _MAX_CACHED_IDS or len(self._scoped) >= _MAX_CACHED_IDS:
            self._ids.clear()
            self._scoped.clear()
        self._ids[(*where, name)] = cid
        self._scoped[(*where, cid)] = name

    def _forget(self, where: Scope, name: str) -> None:
        cid = self._ids.pop((*where, name), None)
        if cid is not None:
            self._scoped.pop((*where, cid), None)

    async def _check_id(self, call: _Call, where: Scope, scope: str, cid: str) -> None:
        """Refuse (CLIENT) a payload's collection id that is not one of scope `where`'s: Chroma
        itself would serve any collection of the server by id, whatever the URL's scope."""
        if (*where, cid) in self._scoped:
            return
        for page in range(_LIST_PAGES):
            listed = await call.json("GET", f"{scope}/collections", params={"limit": _LIST_PAGE,
                                                                             "offset": page * _LIST_PAGE})
            listed = listed if isinstance(listed, list) else []
            for found in listed:
                self._learn(where, found)
            if (*where, cid) in self._scoped:
                return
            if len(listed) < _LIST_PAGE:
                break
        raise UpstreamError(ErrorKind.CLIENT, "payload.collection_id: no collection with this id in this service's "
                                              "scope (name it by payload.collection)")

    async def _record_op(self, call: _Call, where: Scope, scope: str, payload: dict[str, Any]) -> Any:
        method = call.request.method
        verb = _RECORD_OPS[method]
        collection_id = payload.pop("collection_id", None)
        name = payload.pop("collection", None)
        if collection_id is not None:
            if not isinstance(collection_id, str) or not collection_id:
                raise UpstreamError(ErrorKind.CLIENT, "payload.collection_id: must be a non-empty string")
            await self._check_id(call, where, scope, collection_id)
            return await call.json(
                verb,
                f"{scope}/collections/{quote(collection_id, safe='')}/{method}",
                payload if verb == "POST" else None,
            )
        if not isinstance(name, str) or not name:
            raise UpstreamError(
                ErrorKind.CLIENT, "payload.collection: required (a collection name), or give collection_id"
            )
        name = _collection_name({"collection": name}, "collection")
        key = (*where, name)
        for attempt in (1, 2):
            cid = self._ids.get(key)
            if cid is None:
                found = await call.json("GET", f"{scope}/collections/{quote(name, safe='')}")
                cid = str(found.get("id", "")) if isinstance(found, dict) else ""
                if not cid:
                    raise UpstreamError(ErrorKind.RETRYABLE, f"collection {name!r}: answer has no id")
                self._remember(where, name, cid)
                attempt = 2  # a fresh id: a 404 now is the caller's
            try:
                return await call.json(verb, f"{scope}/collections/{quote(cid, safe='')}/{method}",
                                       payload if verb == "POST" else None)
            except UpstreamError as exc:
                if exc.status != 404 or attempt == 2:
                    raise
                self._forget(where, name)  # stale id: the collection was deleted and re-created
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
