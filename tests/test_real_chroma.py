"""The Chroma adapter against a real Chroma server (from .venv-upstreams, `make upstreams`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest

from switchgear.adapters.base import AdapterRequest, ErrorKind, OptionsError, Target, UpstreamError
from switchgear.adapters.chroma import ChromaAdapter, parse_options
from switchgear.emulators.real import RealServer, start_chroma


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    server = start_chroma(tmp_path_factory.mktemp("chroma"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


async def call(
    adapter: ChromaAdapter, client: httpx.AsyncClient, url: str, method: str, payload: dict[str, object]
) -> object:
    response = await adapter.invoke(client, Target(url, options=parse_options({})), AdapterRequest(method, payload, 10))
    assert response.usage.input_tokens == 0 and not response.usage.estimated
    return orjson.loads(response.body)


async def test_collection_lifecycle_add_query_get_delete(chroma: RealServer, client: httpx.AsyncClient) -> None:
    adapter = ChromaAdapter()
    assert "nanosecond heartbeat" in await call(adapter, client, chroma.url, "heartbeat", {})  # type: ignore[operator]
    created = await call(
        adapter, client, chroma.url, "collections.create", {"name": "docs-life", "get_or_create": True}
    )
    assert created["name"] == "docs-life"  # type: ignore[index]
    await call(
        adapter,
        client,
        chroma.url,
        "add",
        {
            "collection": "docs-life",
            "ids": ["a", "b", "c"],
            "embeddings": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            "documents": ["apple", "banana", "cherry"],
            "metadatas": [{"k": 1}, {"k": 2}, {"k": 3}],
        },
    )
    assert await call(adapter, client, chroma.url, "count", {"collection": "docs-life"}) == 3
    found = await call(
        adapter,
        client,
        chroma.url,
        "query",
        {"collection": "docs-life", "query_embeddings": [[0.9, 0.1, 0]], "n_results": 2},
    )
    assert found["ids"] == [["a", "b"]] and found["documents"] == [["apple", "banana"]]  # type: ignore[index]
    got = await call(adapter, client, chroma.url, "get", {"collection": "docs-life", "where": {"k": 3}})
    assert got["ids"] == ["c"]  # type: ignore[index]
    await call(adapter, client, chroma.url, "delete", {"collection": "docs-life", "ids": ["a"]})
    assert await call(adapter, client, chroma.url, "count", {"collection": "docs-life"}) == 2
    listed = await call(adapter, client, chroma.url, "collections.list", {})
    assert "docs-life" in [c["name"] for c in listed]  # type: ignore[union-attr, index]


async def test_recreated_collection_id_is_resolved_again(chroma: RealServer, client: httpx.AsyncClient) -> None:
    adapter = ChromaAdapter()
    await call(adapter, client, chroma.url, "collections.create", {"name": "docs-again"})
    await call(adapter, client, chroma.url, "add", {"collection": "docs-again", "ids": ["x"], "embeddings": [[1, 2]]})
    raw = httpx.AsyncClient()
    base = f"{chroma.url}/api/v2/tenants/default_tenant/databases/default_database/collections"
    async with raw:
        assert (await raw.delete(f"{base}/docs-again")).status_code == 200
        assert (await raw.post(base, json={"name": "docs-again"})).status_code == 200
    await call(adapter, client, chroma.url, "add", {"collection": "docs-again", "ids": ["y"], "embeddings": [[3, 4]]})
    assert await call(adapter, client, chroma.url, "count", {"collection": "docs-again"}) == 1


@pytest.mark.parametrize(
    ("method", "payload", "status"),
    [
        ("query", {"collection": "missing-coll", "query_embeddings": [[1.0]]}, 404),
        ("collections.create", {"name": "x"}, 400),
    ],
)
async def test_client_errors_from_the_real_server(
    chroma: RealServer, client: httpx.AsyncClient, method: str, payload: dict[str, object], status: int
) -> None:
    with pytest.raises(UpstreamError) as caught:
        await call(ChromaAdapter(), client, chroma.url, method, payload)
    assert caught.value.kind is ErrorKind.CLIENT and caught.value.status == status
    assert "Error" in caught.value.message


async def test_dimension_mismatch_and_duplicate_are_client_errors(
    chroma: RealServer, client: httpx.AsyncClient
) -> None:
    adapter = ChromaAdapter()
    await call(adapter, client, chroma.url, "collections.create", {"name": "docs-dim"})
    await call(adapter, client, chroma.url, "add", {"collection": "docs-dim", "ids": ["a"], "embeddings": [[1, 2]]})
    with pytest.raises(UpstreamError) as dim:
        await call(
            adapter, client, chroma.url, "add", {"collection": "docs-dim", "ids": ["b"], "embeddings": [[1, 2, 3]]}
        )
    assert dim.value.kind is ErrorKind.CLIENT and "dimension" in dim.value.message
    with pytest.raises(UpstreamError) as dup:
        await call(adapter, client, chroma.url, "collections.create", {"name": "docs-dim"})
    assert dup.value.kind is ErrorKind.CLIENT and dup.value.status == 409


async def test_unreachable_server_is_connect(client: httpx.AsyncClient) -> None:
    with pytest.raises(UpstreamError) as caught:
        await call(ChromaAdapter(), client, "http://127.0.0.1:9", "heartbeat", {})
    assert caught.value.kind is ErrorKind.CONNECT


@pytest.mark.parametrize(
    ("status", "headers", "kind"),
    [
        (503, {}, ErrorKind.RETRYABLE),
        (500, {}, ErrorKind.RETRYABLE),
        (429, {"retry-after": "3"}, ErrorKind.RATE_LIMITED),
        (401, {}, ErrorKind.AUTH),
        (403, {}, ErrorKind.AUTH),
        (408, {}, ErrorKind.TIMEOUT),
    ],
)
async def test_server_side_failures_are_classified(status: int, headers: dict[str, str], kind: ErrorKind) -> None:
    # The real server cannot be made to fail like this; a mock transport answers Chroma's shape.
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, headers=headers, json={"error": "ChromaError", "message": "boom"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        with pytest.raises(UpstreamError) as caught:
            await ChromaAdapter().invoke(
                mock,
                Target("http://chroma:8000", api_key="tok-123456789", options=parse_options({})),
                AdapterRequest("heartbeat", {}, 5),
            )
    assert caught.value.kind is kind
    assert seen[0].headers["x-chroma-token"] == "tok-123456789"
    if kind is ErrorKind.RATE_LIMITED:
        assert caught.value.retry_after_s == 3


async def test_timeout_is_classified() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        with pytest.raises(UpstreamError) as caught:
            await ChromaAdapter().invoke(mock, Target("http://chroma:8000"), AdapterRequest("heartbeat", {}, 5))
    assert caught.value.kind is ErrorKind.TIMEOUT


def test_options() -> None:
    assert parse_options({"tenant": "t1"}).tenant == "t1"
    with pytest.raises(OptionsError) as caught:
        parse_options({"collections": ["a"]})
    assert caught.value.path == "collections"
