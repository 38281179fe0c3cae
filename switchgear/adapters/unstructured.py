"""The Unstructured adapter: protocol "unstructured" (Unstructured's partition API).

One attempt = `POST {base}/general/v0/general` as multipart/form-data: the document in the
`files` part, every other payload key as a form field (`strategy`, `languages`,
`coordinates`, `encoding`, `chunking_strategy`, `max_characters`, `output_format`, ...;
lists become repeated fields, booleans "true"/"false"). The answer — a JSON list of
elements `{"type", "element_id", "text", "metadata"}` — passes through.

Method "partition". Payload: `{"file": {"name": "a.pdf", "content_base64": "...",
"content_type"?: "application/pdf"}}` or `{"text": "...", "filename"?: "doc.txt"}`, plus form
fields. Option `default_strategy` (default "auto") fills `strategy` when absent; the key goes
in `unstructured-api-key` (option `api_key_header`).

Usage: no LLM tokens are spent; the output tokens are estimated from the elements' text
(marked estimated) so per-token prices still meter parsing. Errors: FastAPI's
`{"detail": ...}` — 400/422 CLIENT (unsupported type, bad field), 401/403 AUTH, 413 CLIENT
(file too large), 429, 5xx RETRYABLE.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from switchgear.adapters import _http
from switchgear.adapters.base import AdapterRequest, AdapterResponse, ErrorKind, Target, UpstreamError

PROTOCOL = "unstructured"
_KNOWN = ("default_strategy", "api_key_header", "path")


@dataclass(frozen=True)
class UnstructuredOptions:
    default_strategy: str = "auto"
    api_key_header: str = "unstructured-api-key"
    path: str = "/general/v0/general"


def parse_options(options: Mapping[str, Any]) -> UnstructuredOptions:
    opts = _http.check_options(PROTOCOL, options, _KNOWN)
    return UnstructuredOptions(
        *(_http.str_option(opts, k, getattr(UnstructuredOptions(), k), allow_empty=False) for k in _KNOWN)
    )


def _document(payload: Mapping[str, Any]) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) from the payload; CLIENT error naming the field."""
    file = payload.get("file")
    if isinstance(file, Mapping):
        name = file.get("name")
        if not isinstance(name, str) or not name:
            raise UpstreamError(ErrorKind.CLIENT, "payload.file.name: required")
        try:
            content = base64.b64decode(str(file.get("content_base64", "")), validate=True)
        except (binascii.Error, ValueError):
            raise UpstreamError(ErrorKind.CLIENT, "payload.file.content_base64: not base64") from None
        return name, content, str(file.get("content_type") or "application/octet-stream")
    text = payload.get("text")
    if isinstance(text, str):
        return str(payload.get("filename") or "document.txt"), text.encode(), "text/plain"
    raise UpstreamError(ErrorKind.CLIENT, "payload.file: required ({name, content_base64}), or payload.text")


def _form(payload: Mapping[str, Any], default_strategy: str) -> dict[str, list[str]]:
    """Form fields: each key once per value (lists repeat the field, as the API expects)."""
    fields: dict[str, list[str]] = {}
    for key, value in payload.items():
        if key in ("file", "text", "filename"):
            continue
        items = value if isinstance(value, list) else [value]
        fields[key] = [("true" if item else "false") if isinstance(item, bool) else str(item) for item in items]
    fields.setdefault("strategy", [default_strategy])
    return fields


class UnstructuredAdapter:
    protocol: ClassVar[str] = PROTOCOL
    methods: ClassVar[frozenset[str]] = frozenset({"partition"})

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock

    @staticmethod
    def idempotent(method: str, payload: Mapping[str, Any]) -> bool:
        """Partitioning is a pure function of the document: it may be hedged (documents are
        not hedged by default: see the category's hedge_min_priority)."""
        return method == "partition"

    def parse_options(self, options: Mapping[str, Any]) -> UnstructuredOptions:
        return parse_options(options)

    async def invoke(self, client: Any, target: Target, request: AdapterRequest) -> AdapterResponse:
        if request.method not in self.methods:
            raise UpstreamError(ErrorKind.CLIENT, f"method {request.method!r} is not served by protocol {PROTOCOL}")
        options = target.options if isinstance(target.options, UnstructuredOptions) else UnstructuredOptions()
        name, content, content_type = _document(request.payload)
        headers = {**request.headers, "Accept": "application/json"}
        if request.request_id:
            headers["X-Request-Id"] = request.request_id
        if target.api_key:
            headers[options.api_key_header] = target.api_key
        url = _http.base_url(target.base_url) + options.path
        _http.check_time(request.timeout_s)
        response = await _http.send(
            client,
            "POST",
            url,
            secret=target.api_key,
            timeout_s=request.timeout_s,
            headers=headers,
            files={"files": (name, content, content_type)},
            data=_form(request.payload, options.default_strategy),
        )
        if not 200 <= response.status_code < 300:
            raise _http.response_failure(
                "POST", url, response, secret=target.api_key, now=self._wall_clock(), parse=_http.generic_error
            )
        elements = _http.json_body(response)
        if not isinstance(elements, list):
            raise UpstreamError(
                ErrorKind.RETRYABLE, "partition answer is not a list of elements", status=response.status_code
            )
        chars = sum(len(e.get("text") or "") for e in elements if isinstance(e, dict))
        usage = _http.estimated(0, chars)
        return AdapterResponse(response.content, usage, response.status_code)
