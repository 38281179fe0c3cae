"""Every setting of the seed's config takes effect: the limits its services declare are enforced
before the upstream, a category policy's timeout bounds synchronous calls too, and
service_discovery.cache_ttl bounds how long health verdicts outlive the control plane."""

from __future__ import annotations

import asyncio
import base64
import datetime
import time
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import grpc
import pytest

from switchgear.adapters import builtin_adapters
from switchgear.cli_config import agent_settings, describe
from switchgear.controlplane.config import load_config
from switchgear.dataplane.client import Applier, Backoff, SnapshotClient
from switchgear.dataplane.convert import Call, RequestError
from switchgear.dataplane.invoke import CallFailed
from switchgear.dataplane.resilience.backoff import BackoffPolicy, policy_for
from switchgear.dataplane.service_rules import check_request, document_size
from switchgear.dataplane.snapshot import (
    EXPIRED_SUFFIX,
    AgentSettings,
    AgentSnapshot,
    EndpointView,
    Holder,
    RetrySettings,
    SchedulingPolicy,
    ServiceView,
    without_health_verdicts,
)
from switchgear.v1 import common_pb2, discovery_pb2, discovery_pb2_grpc
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


# --- service_discovery.cache_ttl: how long health verdicts outlive the control plane ----------


class OneSnapshot(discovery_pb2_grpc.DiscoveryServiceServicer):
    """A control plane that sends one snapshot per stream (an ejected endpoint, a draining one)
    and reads the agent's answers until it is stopped."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.subscribed: list[str] = []

    async def StreamSnapshots(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        first = await anext(aiter(request_iterator))
        self.subscribed.append(first.version_info)
        states = (("a", common_pb2.HEALTH_STATE_EJECTED), ("b", common_pb2.HEALTH_STATE_DRAINING))
        endpoints = [common_pb2.Endpoint(id=name, url="http://127.0.0.1:9/v1", weight=1, health=health)
                     for name, health in states]
        snap = discovery_pb2.Snapshot(version="1.a", services=[common_pb2.Service(
            name="chat", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", endpoints=endpoints)])
        snap.settings.discovery_cache_ttl.FromTimedelta(datetime.timedelta(seconds=self.ttl_s))
        yield discovery_pb2.StreamSnapshotsResponse(version_info="1.a", nonce="n1", snapshot=snap)
        async for _ack in request_iterator:
            pass


async def cut_off_agent(ttl_s: float) -> tuple[Holder, list[str], asyncio.Event, asyncio.Task[None]]:
    """An agent's snapshot client that got one snapshot, then lost its control plane for good."""
    server = grpc.aio.server()
    plane = OneSnapshot(ttl_s)
    discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(plane, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    holder, applied = Holder(), []
    applier = Applier(holder, builtin_adapters(), lambda s: applied.append(s.version))
    client = SnapshotClient([f"127.0.0.1:{port}"], discovery_pb2.Node(id="n"), holder, applier,
                            backoff=Backoff(base_s=0.05, cap_s=0.1))
    stop = asyncio.Event()
    task = asyncio.ensure_future(client.run(stop))
    await poll(lambda: holder.current is not None, "the first snapshot")
    await server.stop(None)
    return holder, applied, stop, task


async def poll(predicate: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def health_of(holder: Holder) -> list[str]:
    assert holder.current is not None
    return [e.health for e in holder.current.services["chat"].endpoints]


async def test_cut_off_past_cache_ttl_the_agent_drops_the_health_verdicts_not_the_draining() -> None:
    holder, applied, stop, task = await cut_off_agent(ttl_s=0.3)
    assert health_of(holder) == ["ejected", "draining"]
    await poll(lambda: health_of(holder)[0] == "healthy", "the ejection to expire")
    assert health_of(holder) == ["healthy", "draining"]  # an operator's drain is not a health verdict
    assert holder.version == "1.a" + EXPIRED_SUFFIX and applied == ["1.a", "1.a" + EXPIRED_SUFFIX]
    stop.set()
    await task


async def test_within_cache_ttl_the_verdicts_stand() -> None:
    holder, applied, stop, task = await cut_off_agent(ttl_s=60.0)
    await asyncio.sleep(0.5)  # several failed reconnections (backoff 50..100 ms), well within the ttl
    assert health_of(holder) == ["ejected", "draining"] and applied == ["1.a"]
    stop.set()
    await task


def test_without_health_verdicts_is_idempotent_and_names_the_version() -> None:
    view = ServiceView(name="s", category="llm", protocol="openai",
                       endpoints=(EndpointView("a", "http://h", health="degraded"),))
    snap = AgentSnapshot("7.x", MappingProxyType({"s": view}))
    once = without_health_verdicts(snap)
    assert once.services["s"].endpoints[0].health == "healthy" and once.version == "7.x" + EXPIRED_SUFFIX
    assert without_health_verdicts(once) == once


def test_retry_delays_left_out_are_each_categorys_and_config_validate_prints_them() -> None:
    state = load_config("external_services:\n  communication:\n    retry_policy:\n      max_retries: 2\n", env={})
    agent = agent_settings(state.settings)
    assert (agent.retry.base_delay_s, agent.retry.max_delay_s) == (0.0, 0.0)  # not set, on the wire too
    assert policy_for("llm", agent.retry) == BackoffPolicy("exponential", 0.2, 2.0, max_retries=2)
    assert policy_for("document", agent.retry) == BackoffPolicy("exponential", 1.0, 10.0, max_retries=2)
    assert "retry: up to 2, exponential backoff llm 0.2s..2s, document 1s..10s, knowledge_graph 0.5s..5s, " \
           "vector_db 0.05s..0.5s, embedding 0.1s..1s" in describe(state)
