"""The GraphRAG adapter: protocol "graphrag".

Microsoft GraphRAG ships a library and CLI, not a server, so Switchgear defines the small
HTTP JSON API a GraphRAG deployment exposes (served here by `switchgear.emulators.graphrag`;
a real deployment wraps `graphrag.api.{local,global,drift,basic}_search` and
`graphrag.api.build_index` the same way):

- `POST /v1/query` `{"query": str, "method": "local"|"global"|"drift"|"basic",
  "community_level"?: int, "response_type"?: str}` → 200 `{"response": str, "method",
  "context": {"entities": [...], "relationships": [...], "reports": [...]},
  "usage": {"prompt_tokens", "completion_tokens", "llm_calls"}}`
- `POST /v1/index` `{"documents": [{"id", "text", "title"?, "metadata"?}], "update"?: bool}`
  → 202 `{"job_id", "status": "queued", "documents": n}` (indexing is a long job)
- `GET /v1/index/{job_id}` → `{"job_id", "status": "queued"|"running"|"succeeded"|"failed",
  "progress": 0..1, "error"?: str}`
- `GET /health` → `{"status": "ok"}`
- errors: `{"error": {"type", "message"}}`; 400 invalid_request, 401 authentication,
  404 not_found, 413 too_many_documents, 429 rate_limited (Retry-After), 5xx.
- auth: `Authorization: Bearer <key>` when the service has a key.

Methods: "query", "index", "index.status" (payload `{"job_id"}`), "health". Usage is the
answer's `usage` (the LLM tokens GraphRAG spent), else an estimate from query and response.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import orjson

from switchgear.adapters import _http
from switchgear.adapters.base import AdapterRequest, AdapterResponse, ErrorKind, Target, TokenUsage, UpstreamError

PROTOCOL = "graphrag"
SEARCH_METHODS = ("local", "global", "drift", "basic")


def _usage(payload: Mapping[str, Any], body: Any) -> TokenUsage:
    usage = body.get("usage") if isinstance(body, dict) else None
    if isinstance(usage, dict):
        prompt, completion = _http.count(usage.get("prompt_tokens")), _http.count(usage.get("completion_tokens", 0))
        if prompt is not None and completion is not None:
            return TokenUsage(prompt, completion)
    response = body.get("response") if isinstance(body, dict) else None
    return _http.estimated(len(str(payload.get("query", ""))), len(response) if isinstance(response, str) else 0)


class GraphRAGAdapter:
    """Adapter for the GraphRAG HTTP API above. Stateless."""

    protocol: ClassVar[str] = PROTOCOL
    methods: ClassVar[frozenset[str]] = frozenset({"query", "index", "index.status", "health"})

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock

    @staticmethod
    def idempotent(method: str, payload: Mapping[str, Any]) -> bool:
        """Reads may be hedged; `index` starts a job and is never sent twice."""
        return method in ("query", "index.status", "health")

    def parse_options(self, options: Mapping[str, Any]) -> None:
        _http.check_options(PROTOCOL, options, ())

    async def invoke(self, client: Any, target: Target, request: AdapterRequest) -> AdapterResponse:
        if request.method not in self.methods:
            raise UpstreamError(ErrorKind.CLIENT, f"method {request.method!r} is not served by protocol {PROTOCOL}")
        payload = request.payload
        root = _http.base_url(target.base_url, "/v1")
        verb, url, body = self._route(request.method, root, payload)
        headers = dict(request.headers)
        if request.request_id:
            headers["X-Request-Id"] = request.request_id
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        response, parsed = await _http.call_json(
            client,
            verb,
            url,
            secret=target.api_key,
            timeout_s=request.timeout_s,
            headers=headers,
            now=self._wall_clock,
            body=body,
        )
        usage = _usage(payload, parsed) if request.method == "query" else TokenUsage()
        return AdapterResponse(response.content or orjson.dumps(parsed), usage, response.status_code)

    @staticmethod
    def _route(method: str, root: str, payload: Mapping[str, Any]) -> tuple[str, str, Any]:
        if method == "query":
            _http.payload_str(payload, "query")
            search = payload.get("method", "local")
            if search not in SEARCH_METHODS:
                raise UpstreamError(ErrorKind.CLIENT, f"payload.method: must be one of {', '.join(SEARCH_METHODS)}")
            return "POST", f"{root}/v1/query", dict(payload)
        if method == "index":
            documents = payload.get("documents")
            if not isinstance(documents, list) or not documents:
                raise UpstreamError(ErrorKind.CLIENT, "payload.documents: required non-empty list")
            return "POST", f"{root}/v1/index", dict(payload)
        if method == "index.status":
            return "GET", f"{root}/v1/index/{quote(_http.payload_str(payload, 'job_id'), safe='')}", None
        return "GET", f"{root}/health", None
