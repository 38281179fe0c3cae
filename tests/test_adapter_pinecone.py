"""The Pinecone adapter against the emulator: host resolution, data ops, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from switchgear.adapters.base import AdapterRequest, ErrorKind, OptionsError, Target, UpstreamError
from switchgear.adapters.pinecone import PineconeAdapter, index_environment, parse_options
from switchgear.emulators import pinecone as emu
from switchgear.emulators.common import Faults, Running

KEY = "pc-test-key-0001"


@pytest.fixture
async def upstream() -> AsyncIterator[Running]:
    async with await emu.start(api_key=KEY, index="knowledge-base", dimension=3, environment="us-west1-gcp") as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


def target(up: Running, key: str = KEY, **options: str) -> Target:
    parsed = parse_options({"index_name": "knowledge-base", "environment": "us-west1-gcp", **options})
    return Target(up.url, api_key=key, options=parsed)


async def call(
    adapter: PineconeAdapter, client: httpx.AsyncClient, t: Target, method: str, payload: dict[str, object]
) -> object:
    return orjson.loads((await adapter.invoke(client, t, AdapterRequest(method, payload, 5))).body)


async def test_describe_upsert_query_fetch_delete(upstream: Running, client: httpx.AsyncClient) -> None:
    adapter, t = PineconeAdapter(), target(upstream, namespace="ns1")  # (payloads repeating it are fine)
    described = await call(adapter, client, t, "describe_index", {})
    assert described["host"] == f"127.0.0.1:{upstream.port}" and described["dimension"] == 3  # type: ignore[index]
    vectors = [
        {"id": "a", "values": [1, 0, 0], "metadata": {"genre": "news"}},
        {"id": "b", "values": [0, 1, 0], "metadata": {"genre": "drama"}},
    ]
    assert await call(adapter, client, t, "upsert", {"vectors": vectors, "namespace": "ns1"}) == {"upsertedCount": 2}
    found = await call(
        adapter, client, t, "query", {"vector": [0.9, 0.1, 0], "topK": 1, "namespace": "ns1", "includeMetadata": True}
    )
    assert [m["id"] for m in found["matches"]] == ["a"] and found["matches"][0]["metadata"] == {"genre": "news"}  # type: ignore[index]
    filtered = await call(
        adapter,
        client,
        t,
        "query",
        {"vector": [1, 0, 0], "topK": 5, "namespace": "ns1", "filter": {"genre": {"$eq": "drama"}}},
    )
    assert [m["id"] for m in filtered["matches"]] == ["b"]  # type: ignore[index]
    fetched = await call(adapter, client, t, "fetch", {"ids": ["a", "zz"], "namespace": "ns1"})
    assert list(fetched["vectors"]) == ["a"]  # type: ignore[index]
    await call(adapter, client, t, "delete", {"ids": ["a"], "namespace": "ns1"})
    stats = await call(adapter, client, t, "describe_index_stats", {})
    assert stats["totalVectorCount"] == 1  # type: ignore[index]
    assert upstream.instance.by_path["/indexes/{name}"] == 1  # the host was resolved once, then cached


async def test_headers(upstream: Running) -> None:
    seen: list[httpx.Request] = []

    async def hook(request: httpx.Request) -> None:
        seen.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [hook]}) as client:
        await PineconeAdapter().invoke(
            client, target(upstream), AdapterRequest("query", {"vector": [1, 0, 0], "topK": 1}, 5)
        )
    assert all(r.headers["Api-Key"] == KEY and r.headers["X-Pinecone-API-Version"] == "2025-04" for r in seen)
    assert [r.url.path for r in seen] == ["/indexes/knowledge-base", "/query"]


async def test_errors_are_classified(upstream: Running, client: httpx.AsyncClient) -> None:
    adapter = PineconeAdapter()
    with pytest.raises(UpstreamError) as auth:
        await adapter.invoke(client, target(upstream, key="pc-wrong-key"), AdapterRequest("describe_index", {}, 5))
    assert auth.value.kind is ErrorKind.AUTH and "pc-wrong-key" not in auth.value.message
    with pytest.raises(UpstreamError) as missing:
        await adapter.invoke(client, target(upstream, index_name="nope"), AdapterRequest("describe_index", {}, 5))
    assert (
        missing.value.kind is ErrorKind.CLIENT and missing.value.status == 404 and "NOT_FOUND" in missing.value.message
    )
    with pytest.raises(UpstreamError) as dim:
        await adapter.invoke(
            client, target(upstream), AdapterRequest("upsert", {"vectors": [{"id": "x", "values": [1]}]}, 5)
        )
    assert dim.value.kind is ErrorKind.CLIENT and "dimension" in dim.value.message
    upstream.set_faults(Faults(rate_limit_rate=1.0, retry_after_s=2))
    with pytest.raises(UpstreamError) as limited:
        await adapter.invoke(client, target(upstream), AdapterRequest("describe_index", {}, 5))
    assert limited.value.kind is ErrorKind.RATE_LIMITED and limited.value.retry_after_s == 2
    upstream.set_faults(Faults(fail_next=1, error_status=503))
    with pytest.raises(UpstreamError) as unavailable:
        await adapter.invoke(client, target(upstream), AdapterRequest("describe_index", {}, 5))
    assert unavailable.value.kind is ErrorKind.RETRYABLE
    upstream.set_faults(Faults(latency_ms=400))
    with pytest.raises(UpstreamError) as slow:
        await adapter.invoke(client, target(upstream), AdapterRequest("describe_index", {}, 0.1))
    assert slow.value.kind is ErrorKind.TIMEOUT


async def test_missing_key_is_config_and_unknown_option_is_refused(client: httpx.AsyncClient) -> None:
    with pytest.raises(UpstreamError) as caught:
        await PineconeAdapter().invoke(
            client,
            Target("http://127.0.0.1:9", options=parse_options({"index_name": "i"})),
            AdapterRequest("query", {}, 5),
        )
    assert caught.value.kind is ErrorKind.CONFIG
    with pytest.raises(OptionsError):
        parse_options({"indexname": "x"})


# --- options.environment: where the index must be ----------------------------------------------


@pytest.mark.parametrize(("described", "where"), [
    ({"spec": {"pod": {"environment": "us-west1-gcp", "pods": 1}}}, "us-west1-gcp"),
    ({"spec": {"serverless": {"cloud": "aws", "region": "us-east-1"}}}, "us-east-1-aws"),
    ({"spec": {"byoc": {"environment": "aws-us-east-1-b92"}}}, "aws-us-east-1-b92"),
    ({"spec": {"serverless": {"cloud": "gcp"}}}, ""),  # half an answer says nothing
    ({"spec": {"pod": {"environment": 7}}}, ""),
    ({"spec": "pod"}, ""),
    ({"host": "h"}, ""),
    ([], ""),
    ({"spec": {"pod": {"environment": "x" * 500}}}, "x" * 64),  # bounded: it may reach an error message
])
def test_index_environment(described: object, where: str) -> None:
    assert index_environment(described) == where


def located(up: Running, environment: str) -> Target:
    return Target(up.url, api_key=KEY, options=parse_options({"index_name": "knowledge-base",
                                                               "environment": environment}))


@pytest.mark.parametrize("method", ["describe_index", "query"])
async def test_an_index_in_another_environment_is_refused_before_any_data_call(
        upstream: Running, client: httpx.AsyncClient, method: str) -> None:
    adapter = PineconeAdapter()
    with pytest.raises(UpstreamError) as caught:
        await call(adapter, client, located(upstream, "us-east-1-aws"), method, {"vector": [1, 0, 0], "topK": 1})
    assert caught.value.kind is ErrorKind.CONFIG  # an operator's mistake: trips no breaker
    assert "options.environment is 'us-east-1-aws'" in str(caught.value) and "'us-west1-gcp'" in str(caught.value)
    assert upstream.instance.by_path.get("/query", 0) == 0
    # nothing was cached: the same adapter, told the right environment, resolves and serves
    found = await call(adapter, client, located(upstream, "US-West1-GCP "), "query", {"vector": [1, 0, 0], "topK": 1})
    assert found["matches"] == []  # type: ignore[index]
    assert upstream.instance.by_path["/indexes/{name}"] == 2


async def test_a_serverless_index_matches_its_region_and_cloud(client: httpx.AsyncClient) -> None:
    async with await emu.start(api_key=KEY, index="knowledge-base", dimension=3) as serverless:
        adapter = PineconeAdapter()
        described = await call(adapter, client, located(serverless, "us-east-1-aws"), "describe_index", {})
        assert described["spec"] == {"serverless": {"cloud": "aws", "region": "us-east-1"}}  # type: ignore[index]
        with pytest.raises(UpstreamError, match=r"options\.environment"):
            await call(adapter, client, located(serverless, "us-west1-gcp"), "describe_index", {})
        # no environment set: no check, as before
        await call(adapter, client, located(serverless, ""), "describe_index", {})
