"""The GraphRAG adapter against the emulator of the API it defines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from switchgear.adapters.base import AdapterRequest, ErrorKind, Target, UpstreamError
from switchgear.adapters.graphrag import GraphRAGAdapter
from switchgear.emulators import graphrag as emu
from switchgear.emulators.common import Faults, Running

KEY = "gr-key-123456"
DOCS = [
    {"id": "d1", "text": "Alice works with Bob at Contoso. Bob founded Contoso."},
    {"id": "d2", "text": "Carol lives in Paris."},
]


@pytest.fixture
async def upstream() -> AsyncIterator[Running]:
    async with await emu.start(api_key=KEY, max_documents=3) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


async def test_index_job_then_query_with_usage(upstream: Running, client: httpx.AsyncClient) -> None:
    adapter, t = GraphRAGAdapter(), Target(upstream.url, api_key=KEY)
    queued = await adapter.invoke(client, t, AdapterRequest("index", {"documents": DOCS}, 5))
    assert queued.status == 202
    job = orjson.loads(queued.body)["job_id"]
    for _ in range(100):
        status = orjson.loads(
            (await adapter.invoke(client, t, AdapterRequest("index.status", {"job_id": job}, 5))).body
        )
        if status["status"] == "succeeded":
            break
        await asyncio.sleep(0.02)
    assert status["status"] == "succeeded"
    answer = await adapter.invoke(
        client, t, AdapterRequest("query", {"query": "Who founded Contoso?", "method": "local"}, 5)
    )
    body = orjson.loads(answer.body)
    assert body["context"]["sources"] == ["d1"] and "Bob" in body["context"]["entities"]
    assert answer.usage.input_tokens == body["usage"]["prompt_tokens"] > 0 and not answer.usage.estimated
    health = await adapter.invoke(client, t, AdapterRequest("health", {}, 5))
    assert orjson.loads(health.body) == {"status": "ok"}


async def test_errors(upstream: Running, client: httpx.AsyncClient) -> None:
    adapter, t = GraphRAGAdapter(), Target(upstream.url, api_key=KEY)
    with pytest.raises(UpstreamError) as bad:
        await adapter.invoke(client, t, AdapterRequest("query", {"query": "x", "method": "fuzzy"}, 5))
    assert bad.value.kind is ErrorKind.CLIENT  # refused before any I/O
    with pytest.raises(UpstreamError) as too_many:
        await adapter.invoke(client, t, AdapterRequest("index", {"documents": DOCS * 2}, 5))
    assert too_many.value.kind is ErrorKind.CLIENT and too_many.value.status == 413
    with pytest.raises(UpstreamError) as unknown_job:
        await adapter.invoke(client, t, AdapterRequest("index.status", {"job_id": "nope"}, 5))
    assert unknown_job.value.status == 404
    with pytest.raises(UpstreamError) as auth:
        await adapter.invoke(client, Target(upstream.url, api_key="wrong-key-99"), AdapterRequest("health", {}, 5))
    assert auth.value.kind is ErrorKind.AUTH
    upstream.set_faults(Faults(rate_limit_rate=1.0, retry_after_s=4))
    with pytest.raises(UpstreamError) as limited:
        await adapter.invoke(client, t, AdapterRequest("query", {"query": "q"}, 5))
    assert limited.value.kind is ErrorKind.RATE_LIMITED and limited.value.retry_after_s == 4
    upstream.set_faults(Faults(fail_next=1, error_status=502))
    with pytest.raises(UpstreamError) as server:
        await adapter.invoke(client, t, AdapterRequest("query", {"query": "q"}, 5))
    assert server.value.kind is ErrorKind.RETRYABLE
    upstream.set_faults(Faults(latency_ms=300))
    with pytest.raises(UpstreamError) as slow:
        await adapter.invoke(client, t, AdapterRequest("query", {"query": "q"}, 0.05))
    assert slow.value.kind is ErrorKind.TIMEOUT
