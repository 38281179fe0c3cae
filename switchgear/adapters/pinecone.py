"""The Pinecone adapter: protocol "pinecone".

The endpoint URL is Pinecone's control API (`https://api.pinecone.io`). Data-plane calls go
to the index's own host, resolved with describe_index (`GET /indexes/{index}` → `host`),
cached per (control URL, index), and called with the control URL's scheme (https in
production; http against a local emulator). Every request carries `Api-Key: <key>` and
`X-Pinecone-API-Version` (option `api_version`, default 2025-04).

Options: `index_name` (the service's index), `environment`, `namespace` (default ""),
`api_version`, `namespace_scope`, `scope_prefix`, `caller_namespaces` (see Scope below).
Hosts come from describe_index whatever `environment` says; when it is set, it is where
the index must be (the seed's `environment: "us-west1-gcp"`): the index's own environment
— a pod index's `spec.pod.environment`, a BYOC index's `spec.byoc.environment`, a
serverless index's `<region>-<cloud>` (Pinecone's naming: us-west1-gcp, us-east-1-aws) — is
compared, case-insensitively, with it, and an index elsewhere (another project's index of the
same name, data in the wrong region) is refused before any data call: a CONFIG error naming
`options.environment`, which trips no breaker. An answer that says nothing of where the index
is passes.

Scope (adapters/_scope.py): a call reaches the service's index and one namespace, never what
the payload names. The index is `options.index_name` (without it, data calls are refused: a
CONFIG error naming it); the namespace is `options.namespace`, or with `namespace_scope: tenant`
the caller's own, `<scope_prefix><switchgear tenant>` (a call without a tenant uses
`options.namespace`). A payload `index` or `namespace` is dropped when it repeats the scope's
and refused (CLIENT, naming the field) otherwise. With `caller_namespaces: true` a payload
namespace is the caller's choice *inside* the scope's: `<scope namespace>/<payload namespace>`
(just the payload's when the scope's is ""). describe_index_stats answers only the namespaces
the call may reach.

Methods (payload → request):
- "describe_index": GET /indexes/{index} (control API)
- "upsert": POST {host}/vectors/upsert `{vectors, namespace}`
- "query": POST {host}/query `{vector | id, topK, filter, includeValues, includeMetadata, namespace}`
- "fetch": GET {host}/vectors/fetch?ids=..&namespace=..  (payload `ids`, `namespace`)
- "delete": POST {host}/vectors/delete `{ids | deleteAll | filter, namespace}`
- "describe_index_stats": POST {host}/describe_index_stats

Answers pass through. Usage: no tokens (zero usage); query's `usage.readUnits` is Pinecone's
own unit, left in the body. Errors: control API `{"error": {"code", "message"}, "status"}`,
data plane `{"code": <grpc code>, "message"}`; a 404 on a data call drops the cached host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import orjson

from switchgear.adapters import _http, _scope
from switchgear.adapters.base import AdapterRequest, AdapterResponse, ErrorKind, Target, TokenUsage, UpstreamError

PROTOCOL = "pinecone"
API_VERSION = "2025-04"
_STRINGS = ("index_name", "environment", "namespace", "api_version")
_KNOWN = (*_STRINGS, "namespace_scope", "scope_prefix", "caller_namespaces")
_DATA_OPS = {
    "upsert": ("POST", "/vectors/upsert"),
    "query": ("POST", "/query"),
    "fetch": ("GET", "/vectors/fetch"),
    "delete": ("POST", "/vectors/delete"),
    "describe_index_stats": ("POST", "/describe_index_stats"),
}
_MAX_CACHED_HOSTS = 1024
#: Pinecone's own bound on a namespace name.
MAX_NAMESPACE_CHARS = 512


@dataclass(frozen=True)
class PineconeOptions:
    index_name: str = ""
    environment: str = ""
    namespace: str = ""
    api_version: str = API_VERSION
    namespace_per_tenant: bool = False  # namespace_scope: tenant
    scope_prefix: str = ""
    caller_namespaces: bool = False

    @property
    def tenant_scoped(self) -> bool:
        """Whether callers of different Switchgear tenants reach different data."""
        return self.namespace_per_tenant

    def namespace_for(self, tenant: str) -> str:
        """The namespace a call of Switchgear tenant `tenant` ("" = none) reaches."""
        return self.scope_prefix + tenant if self.namespace_per_tenant and tenant else self.namespace

    def describe_scope(self) -> str:
        """What `config validate` prints: the index and namespace calls reach."""
        index = self.index_name or "(none: data calls refused)"
        if self.namespace_per_tenant:
            where = f"namespace {self.scope_prefix}<tenant> per Switchgear tenant ({self.namespace!r} without one)"
        else:
            where = f"namespace {self.namespace!r}"
        inside = ", callers' namespaces inside it" if self.caller_namespaces else ""
        return f"scope=pinecone index {index}, {where}{inside}"


def parse_options(options: Mapping[str, Any]) -> PineconeOptions:
    opts = _http.check_options(PROTOCOL, options, _KNOWN)
    d = PineconeOptions()
    strings = {k: _http.str_option(opts, k, getattr(d, k)) for k in _STRINGS}
    scoped = _scope.scope_option(opts, "namespace_scope")
    return PineconeOptions(**strings, namespace_per_tenant=scoped,
                           scope_prefix=_scope.prefix_option(opts, scoped, "namespace_scope"),
                           caller_namespaces=_scope.bool_option(opts, "caller_namespaces"))


class PineconeAdapter:
    """Adapter for Pinecone's control and data-plane REST APIs. Caches index hosts."""

    protocol: ClassVar[str] = PROTOCOL
    methods: ClassVar[frozenset[str]] = frozenset({"describe_index", *_DATA_OPS})

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._hosts: dict[tuple[str, str], str] = {}

    @staticmethod
    def idempotent(method: str, payload: Mapping[str, Any]) -> bool:
        """Reads and `delete` may be hedged; `upsert` when every vector has an id."""
        if method == "upsert":
            vectors = payload.get("vectors")
            return isinstance(vectors, list) and bool(vectors) and all(
                isinstance(v, Mapping) and isinstance(v.get("id"), str) and v["id"] for v in vectors)
        return method in PineconeAdapter.methods

    def parse_options(self, options: Mapping[str, Any]) -> PineconeOptions:
        return parse_options(options)

    async def invoke(self, client: Any, target: Target, request: AdapterRequest) -> AdapterResponse:
        if request.method not in self.methods:
            raise UpstreamError(ErrorKind.CLIENT, f"method {request.method!r} is not served by protocol {PROTOCOL}")
        options = target.options if isinstance(target.options, PineconeOptions) else PineconeOptions()
        payload = dict(request.payload)
        index = options.index_name
        if not index:
            raise UpstreamError(ErrorKind.CONFIG, "options.index_name: required (a Pinecone service serves one index)")
        _scope.pinned(payload, "index", index, "set by the service (options.index_name)")
        namespace = _namespace(options, request.tenant, payload)
        headers = {**request.headers, "X-Pinecone-API-Version": options.api_version}
        if request.request_id:
            headers["X-Request-Id"] = request.request_id
        if not target.api_key:
            raise UpstreamError(ErrorKind.CONFIG, "pinecone needs an api key (service api_key reference)")
        headers["Api-Key"] = target.api_key
        control = _http.base_url(target.base_url)

        async def call(verb: str, url: str, body: Any = None, **kwargs: Any) -> Any:
            _, parsed = await _http.call_json(
                client,
                verb,
                url,
                secret=target.api_key,
                timeout_s=request.timeout_s,
                headers=headers,
                now=self._wall_clock,
                body=body,
                **kwargs,
            )
            return parsed

        if request.method == "describe_index":
            described = await call("GET", f"{control}/indexes/{quote(index, safe='')}")
            self._remember(control, index, described, options.environment)
            return AdapterResponse(orjson.dumps(described), TokenUsage(), 200)
        host = self._hosts.get((control, index))
        if host is None:
            described = await call("GET", f"{control}/indexes/{quote(index, safe='')}")
            host = self._remember(control, index, described, options.environment)
        verb, path = _DATA_OPS[request.method]
        if namespace and request.method != "describe_index_stats":  # (its request names no namespace)
            payload["namespace"] = namespace
        try:
            if verb == "GET":
                ids = payload.get("ids")
                if not isinstance(ids, list) or not ids:
                    raise UpstreamError(ErrorKind.CLIENT, "payload.ids: required non-empty list")
                params: list[tuple[str, str]] = [("ids", str(i)) for i in ids]
                if namespace:
                    params.append(("namespace", namespace))
                body = await call("GET", host + path, params=params)
            else:
                body = await call(verb, host + path, payload)
        except UpstreamError as exc:
            if exc.status == 404:
                self._hosts.pop((control, index), None)
            raise
        if request.method == "describe_index_stats":
            body = _visible_stats(body, options, request.tenant, namespace)
        return AdapterResponse(orjson.dumps(body), TokenUsage(), 200)

    def _remember(self, control: str, index: str, described: Any, environment: str = "") -> str:
        """The data-plane base URL from a describe_index answer (cached), once the index is
        where `environment` (when set) says it must be."""
        where = index_environment(described)
        if environment and where and where.lower() != environment.strip().lower():
            raise UpstreamError(
                ErrorKind.CONFIG,
                f"options.environment is {environment!r} but index {index!r} is in {where!r}",
            )
        host = described.get("host") if isinstance(described, dict) else None
        if not isinstance(host, str) or not host:
            raise UpstreamError(ErrorKind.RETRYABLE, f"describe_index {index!r}: answer has no host (index not ready?)")
        scheme = urlsplit(control).scheme or "https"
        url = host.rstrip("/") if "://" in host else f"{scheme}://{host.rstrip('/')}"
        if len(self._hosts) >= _MAX_CACHED_HOSTS:
            self._hosts.clear()
        self._hosts[(control, index)] = url
        return url


def index_environment(described: Any) -> str:
    """Where a describe_index answer says the index is, in Pinecone's environment naming; ""
    when it does not say: `spec.pod.environment`, `spec.byoc.environment`, else a serverless
    spec's `<region>-<cloud>`."""
    spec = described.get("spec") if isinstance(described, dict) else None
    if not isinstance(spec, dict):
        return ""
    for kind in ("pod", "byoc"):
        part = spec.get(kind)
        if isinstance(part, dict) and isinstance(part.get("environment"), str):
            return str(part["environment"])[:64]
    serverless = spec.get("serverless")
    if isinstance(serverless, dict):
        region, cloud = serverless.get("region"), serverless.get("cloud")
        if isinstance(region, str) and isinstance(cloud, str) and region and cloud:
            return f"{region}-{cloud}"[:64]
    return ""


def _namespace(options: PineconeOptions, tenant: str, payload: dict[str, Any]) -> str:
    """The namespace the call reaches (the payload's `namespace` taken out of it): the scope's,
    or with `caller_namespaces` one the payload names inside it."""
    scope = options.namespace_for(tenant)
    if not options.caller_namespaces or payload.get("namespace", scope) == scope:
        own = options.namespace_per_tenant and bool(tenant)
        _scope.pinned(payload, "namespace", scope, "derived from your tenant (options.namespace_scope: tenant)"
                      if own else "set by the service (options.namespace)")
        return scope
    chosen = payload.pop("namespace")
    if not isinstance(chosen, str) or len(chosen) > MAX_NAMESPACE_CHARS - len(scope) - 1:
        raise UpstreamError(ErrorKind.CLIENT, f"payload.namespace: must be a string of at most "
                                              f"{MAX_NAMESPACE_CHARS - len(scope) - 1} characters")
    return f"{scope}/{chosen}" if scope else chosen


def _visible_stats(body: Any, options: PineconeOptions, tenant: str, namespace: str) -> Any:
    """describe_index_stats with only the namespaces the call may reach (its own, or with
    `caller_namespaces` those inside its scope), and their total: other namespaces' names and
    sizes are other callers' (another tenant's) business."""
    if not isinstance(body, dict) or not isinstance(body.get("namespaces"), dict):
        return body
    scope = options.namespace_for(tenant)
    if options.caller_namespaces and not scope:
        return body  # the whole index is the callers' to choose from
    if options.caller_namespaces:
        shown = {k: v for k, v in body["namespaces"].items() if k == scope or k.startswith(scope + "/")}
    else:  # (Pinecone lists the default namespace "" as "__default__")
        own = {namespace, "__default__"} if namespace == "" else {namespace}
        shown = {k: v for k, v in body["namespaces"].items() if k in own}
    total = sum(v.get("vectorCount", 0) for v in shown.values()
                if isinstance(v, dict) and isinstance(v.get("vectorCount"), int))
    return {**body, "namespaces": shown, "totalVectorCount": total}
