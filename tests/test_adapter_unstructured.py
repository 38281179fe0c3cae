"""The Unstructured adapter against the partition-API emulator."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from switchgear.adapters.base import AdapterRequest, ErrorKind, Target, UpstreamError
from switchgear.adapters.unstructured import UnstructuredAdapter, parse_options
from switchgear.emulators import unstructured as emu
from switchgear.emulators.common import Faults, Running

KEY = "un-key-123456"
DOC = "Quarterly Report\n\nRevenue grew by ten percent this quarter.\n\n- first point\n- second point\n"


@pytest.fixture
async def upstream() -> AsyncIterator[Running]:
    async with await emu.start(api_key=KEY) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


def target(up: Running, key: str = KEY) -> Target:
    return Target(up.url, api_key=key, options=parse_options({"default_strategy": "fast"}))


async def test_partition_file_and_text(upstream: Running, client: httpx.AsyncClient) -> None:
    adapter = UnstructuredAdapter()
    payload = {
        "file": {"name": "report.md", "content_base64": base64.b64encode(DOC.encode()).decode()},
        "languages": ["eng"],
        "coordinates": False,
    }
    response = await adapter.invoke(client, target(upstream), AdapterRequest("partition", payload, 5))
    elements = orjson.loads(response.body)
    assert [e["type"] for e in elements] == ["Title", "NarrativeText", "ListItem", "ListItem"]
    assert elements[1]["metadata"]["parent_id"] == elements[0]["element_id"]
    assert elements[0]["metadata"]["filename"] == "report.md"
    assert response.usage.estimated and response.usage.output_tokens > 0
    html = await adapter.invoke(
        client,
        target(upstream),
        AdapterRequest("partition", {"text": "<h1>T</h1><p>Body text.</p>", "filename": "a.html"}, 5),
    )
    assert [e["type"] for e in orjson.loads(html.body)] == ["Title", "NarrativeText"]


async def test_wire_format(client: httpx.AsyncClient) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[])

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        await UnstructuredAdapter().invoke(
            mock,
            Target("http://unstructured:8000", api_key=KEY),
            AdapterRequest("partition", {"text": "x", "languages": ["eng", "deu"]}, 5),
        )
    request = seen[0]
    assert str(request.url) == "http://unstructured:8000/general/v0/general"
    assert request.headers["unstructured-api-key"] == KEY
    body = request.content.decode()
    assert 'name="files"; filename="document.txt"' in body
    assert body.count('name="languages"') == 2 and 'name="strategy"\r\n\r\nauto' in body


async def test_errors(upstream: Running, client: httpx.AsyncClient) -> None:
    adapter = UnstructuredAdapter()
    with pytest.raises(UpstreamError) as unsupported:
        await adapter.invoke(
            client,
            target(upstream),
            AdapterRequest("partition", {"file": {"name": "a.pdf", "content_base64": "JVBERi0="}}, 5),
        )
    assert unsupported.value.kind is ErrorKind.CLIENT and unsupported.value.status == 400
    with pytest.raises(UpstreamError) as strategy:
        await adapter.invoke(
            client, target(upstream), AdapterRequest("partition", {"text": "x", "strategy": "magic"}, 5)
        )
    assert strategy.value.kind is ErrorKind.CLIENT and strategy.value.status == 422
    with pytest.raises(UpstreamError) as no_file:
        await adapter.invoke(client, target(upstream), AdapterRequest("partition", {}, 5))
    assert no_file.value.kind is ErrorKind.CLIENT
    with pytest.raises(UpstreamError) as auth:
        await adapter.invoke(client, target(upstream, "bad-key-123"), AdapterRequest("partition", {"text": "x"}, 5))
    assert auth.value.kind is ErrorKind.AUTH
    upstream.set_faults(Faults(rate_limit_rate=1.0, retry_after_s=3))
    with pytest.raises(UpstreamError) as limited:
        await adapter.invoke(client, target(upstream), AdapterRequest("partition", {"text": "x"}, 5))
    assert limited.value.kind is ErrorKind.RATE_LIMITED and limited.value.retry_after_s == 3
    upstream.set_faults(Faults(fail_next=1, error_status=500))
    with pytest.raises(UpstreamError) as server:
        await adapter.invoke(client, target(upstream), AdapterRequest("partition", {"text": "x"}, 5))
    assert server.value.kind is ErrorKind.RETRYABLE
    upstream.set_faults(Faults(latency_ms=300))
    with pytest.raises(UpstreamError) as slow:
        await adapter.invoke(client, target(upstream), AdapterRequest("partition", {"text": "x"}, 0.05))
    assert slow.value.kind is ErrorKind.TIMEOUT
