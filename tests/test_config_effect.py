"""Every setting of the seed's config takes effect: the limits its services declare are enforced
before the upstream, and a category policy's timeout bounds synchronous calls too."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import pytest

from switchgear.dataplane.convert import Call, RequestError
from switchgear.dataplane.invoke import CallFailed
from switchgear.dataplane.service_rules import check_request, document_size
from switchgear.dataplane.snapshot import (
    AgentSettings,
    AgentSnapshot,
    EndpointView,
    RetrySettings,
    SchedulingPolicy,
    ServiceView,
)
from switchgear.wire.attempt_policy import call_timeout
from tests.test_stream import make_agent

#: The unstructured, graphrag and chroma services' metadata as the loader writes it from the seed.
DOCS = MappingProxyType({"max_file_size": "50MB", "max_file_size_bytes": "50000000",
                         "supported_formats": "pdf,docx,xlsx,pptx,html"})
GRAPH = MappingProxyType({"max_documents": "1000"})
CHROMA = MappingProxyType({"collections": "documents,chunks,embeddings"})


def service(metadata: Any, protocol: str = "unstructured", category: str = "document",
            url: str = "http://127.0.0.1:9") -> ServiceView:
    return ServiceView(name="svc", category=category, protocol=protocol, endpoints=(EndpointView("e0", url),),
                       metadata=metadata)


def b64(size: int) -> str:
    return base64.b64encode(b"x" * size).decode()


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 1000, 4097])
def test_document_size_is_the_decoded_size_without_decoding(size: int) -> None:
    assert document_size({"file": {"name": "a.pdf", "content_base64": b64(size)}}) == (
        "payload.file.content_base64", size)


OK: list[tuple[Any, str, dict[str, Any]]] = [
    (DOCS, "partition", {"file": {"name": "report.PDF", "content_base64": b64(10)}}),
    (DOCS, "partition", {"text": "plain words, no file name"}),
    (DOCS, "partition", {"text": "<p>hi</p>", "filename": "page.html"}),
    (GRAPH, "index", {"documents": [{"id": str(i), "text": "t"} for i in range(1000)]}),
    (GRAPH, "query", {"query": "who?"}),
    (CHROMA, "query", {"collection": "chunks", "query_embeddings": [[0.1]]}),
    (CHROMA, "collections.create", {"name": "documents"}),
    (CHROMA, "collections.list", {}),
    ({}, "partition", {"file": {"name": "a.exe", "content_base64": b64(10)}}),  # no limits declared
]


@pytest.mark.parametrize(("metadata", "method", "payload"), OK)
def test_requests_within_the_configs_limits_pass(metadata: Any, method: str, payload: dict[str, Any]) -> None:
    check_request(service(metadata), method, payload)


REFUSED: list[tuple[Any, str, dict[str, Any], str, str]] = [
    (MappingProxyType({**DOCS, "max_file_size": "1KB", "max_file_size_bytes": "1000"}), "partition",
     {"file": {"name": "a.pdf", "content_base64": b64(1001)}}, "payload.file.content_base64",
     "1001 bytes; this service's max_file_size is 1KB"),
    (MappingProxyType({**DOCS, "max_file_size_bytes": "3"}), "partition", {"text": "four"}, "payload.text",
     "max_file_size"),
    (DOCS, "partition", {"file": {"name": "notes.txt", "content_base64": b64(3)}}, "payload.file.name",
     "format 'txt' is not among this service's supported_formats (docx, html, pdf, pptx, xlsx)"),
    (DOCS, "partition", {"file": {"name": "README", "content_base64": b64(3)}}, "payload.file.name", "no extension"),
    (DOCS, "partition", {"text": "x", "filename": "a.md"}, "payload.filename", "format 'md'"),
    (GRAPH, "index", {"documents": [{"id": str(i), "text": "t"} for i in range(1001)]}, "payload.documents",
     "1001 documents in one call; this service's max_documents is 1000"),
    (CHROMA, "add", {"collection": "secrets", "ids": ["1"]}, "payload.collection",
     "collection 'secrets' is not among this service's collections (chunks, documents, embeddings)"),
    (CHROMA, "add", {"collection": "Documents", "ids": ["1"]}, "payload.collection", "'Documents'"),  # exact names
    (CHROMA, "collections.delete", {"name": "other"}, "payload.name", "not among"),
    (CHROMA, "get", {"collection_id": "0f9c", "ids": ["1"]}, "payload.collection_id", "name one in"),
]


@pytest.mark.parametrize(("metadata", "method", "payload", "field", "fragment"), REFUSED)
def test_requests_past_the_configs_limits_name_the_field(
    metadata: Any, method: str, payload: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(RequestError) as caught:
        check_request(service(metadata), method, payload)
    assert caught.value.path == field and fragment in caught.value.message


def test_hostile_metadata_is_ignored_not_guessed_at() -> None:
    odd = MappingProxyType({"max_file_size_bytes": "-5", "max_documents": "many", "supported_formats": " , "})
    check_request(service(odd), "partition", {"file": {"name": "a.exe", "content_base64": b64(10)}})


def call(method: str, payload: dict[str, Any], timeout_s: float = 0.0) -> Call:
    return Call(request_id="r1", category="", service="svc", method=method, payload=payload, priority=5,
                timeout_s=timeout_s, user_id="", session_id="")


def snapshot(svc: ServiceView, policy_timeout_s: float = 0.0) -> AgentSnapshot:
    policies = {svc.category: SchedulingPolicy(timeout_s=policy_timeout_s)} if policy_timeout_s else {}
    settings = AgentSettings(retry=RetrySettings(max_retries=0), category_policies=MappingProxyType(policies))
    return AgentSnapshot("1.t", MappingProxyType({svc.name: svc}), settings)


async def test_a_too_large_document_is_refused_before_any_attempt() -> None:
    small = MappingProxyType({**DOCS, "max_file_size": "1KB", "max_file_size_bytes": "1000"})
    snap = snapshot(service(small))
    agent = make_agent(snap)
    with pytest.raises(RequestError) as caught:
        await agent.invoker.invoke(call("partition", {"file": {"name": "a.pdf", "content_base64": b64(5000)}}), snap)
    assert caught.value.path == "payload.file.content_base64"
    assert agent.recorder.started == []  # the upstream was never tried: nothing counts against it
    await agent.pool.close()


@pytest.fixture
async def silent_upstream() -> AsyncIterator[str]:
    """Accepts connections and never answers: only a deadline ends a call to it."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_call_timeout_precedence() -> None:
    assert call_timeout(0, 0, 300, 30) == 300  # the seed's document_processing.timeout
    assert call_timeout(0, 120, 300, 30) == 120  # the service's own
    assert call_timeout(5, 120, 300, 30) == 5  # the caller's
    assert call_timeout(0, 0, 0, 30) == 30


async def test_the_category_policys_timeout_bounds_a_synchronous_document_call(silent_upstream: str) -> None:
    """The policy says 0.5 s; the default timeout (30 s) would let the call hang far longer."""
    svc = service(MappingProxyType({}), url=silent_upstream)
    snap = snapshot(svc, policy_timeout_s=0.5)
    agent = make_agent(snap)
    started = time.monotonic()
    with pytest.raises(CallFailed) as caught:
        await agent.invoker.invoke(call("partition", {"text": "hello"}), snap)
    elapsed = time.monotonic() - started
    assert caught.value.error.kind.value == "timeout"
    assert 0.4 <= elapsed < 5.0, elapsed
    await agent.pool.close()
