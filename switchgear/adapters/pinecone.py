"""The Pinecone adapter: protocol "pinecone".

The endpoint URL is Pinecone's control API (`https://api.pinecone.io`). Data-plane calls go
to the index's own host, resolved with describe_index (`GET /indexes/{index}` → `host`),
cached per (control URL, index), and called with the control URL's scheme (https in
production; http against a local emulator). Every request carries `Api-Key: <key>` and
`X-Pinecone-API-Version` (option `api_version`, default 2025-04).

Options: `index_name` (the default index), `environment`, `namespace` (default ""),
`api_version`. Hosts come from describe_index whatever `environment` says; when it is set, it
is where the index must be (the seed's `environment: "us-west1-gcp"`): the index's own
environment — a pod index's `spec.pod.environment`, a BYOC index's `spec.byoc.environment`, a
serverless index's `<region>-<cloud>` (Pinecone's naming: us-west1-gcp, us-east-1-aws) — is
compared, case-insensitively, with it, and an index elsewhere (another project's index of the
same name, data in the wrong region) is refused before any data call: a CONFIG error naming
`options.environment`, which trips no breaker. An answer that says nothing of where the index
is passes.

Methods (payload → request; a payload may name `index`, else the option's):
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

from switchgear.adapters import _http
from switchgear.adapters.base import AdapterRequest, AdapterResponse, ErrorKind, Target, TokenUsage, UpstreamError

PROTOCOL = "pinecone"
API_VERSION = "2025-04"
_KNOWN = ("index_name", "environment", "namespace", "api_version")
_DATA_OPS = {
    "upsert": ("POST", "/vectors/upsert"),
    "query": ("POST", "/query"),
    "fetch": ("GET", "/vectors/fetch"),
    "delete": ("POST", "/vectors/delete"),
    "describe_index_stats": ("POST", "/describe_index_stats"),
}
_MAX_CACHED_HOSTS = 1024


@dataclass(frozen=True)
class PineconeOptions:
    index_name: str = ""
    environment: str = ""
    namespace: str = ""
    api_version: str = API_VERSION


def parse_options(options: Mapping[str, Any]) -> PineconeOptions:
    opts = _http.check_options(PROTOCOL, options, _KNOWN)
    return PineconeOptions(*(_http.str_option(opts, k, getattr(PineconeOptions(), k)) for k in _KNOWN))


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
        index = str(payload.pop("index", "") or options.index_name)
        if not index:
            raise UpstreamError(ErrorKind.CLIENT, "payload.index: required (no index_name option either)")
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
        if "namespace" not in payload and options.namespace:
            payload["namespace"] = options.namespace
        try:
            if verb == "GET":
                ids = payload.get("ids")
                if not isinstance(ids, list) or not ids:
                    raise UpstreamError(ErrorKind.CLIENT, "payload.ids: required non-empty list")
                params: list[tuple[str, str]] = [("ids", str(i)) for i in ids]
                if payload.get("namespace"):
                    params.append(("namespace", str(payload["namespace"])))
                body = await call("GET", host + path, params=params)
            else:
                body = await call(verb, host + path, payload)
        except UpstreamError as exc:
            if exc.status == 404:
                self._hosts.pop((control, index), None)
            raise
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
