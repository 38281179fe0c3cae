"""A key allowed a vector service reaches only its own data there (adapters/_scope.py).

Two tenants, acme and globex, both allowed every service, call a real Chroma server and the
Pinecone emulator through both doors (HTTP POST /v1/invoke and gRPC Invoke). Whatever a
payload names (Chroma tenant, database, collection id; Pinecone index, namespace; ids,
filters), globex neither reads, overwrites nor deletes acme's vectors; each refusal is a 400 /
INVALID_ARGUMENT naming the payload field and counts against nothing shared."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import httpx
import orjson
import pytest

from switchgear.adapters.base import AdapterRequest, ErrorKind, OptionsError, Target, UpstreamError
from switchgear.adapters.chroma import ChromaAdapter, ChromaOptions
from switchgear.adapters.chroma import parse_options as chroma_options
from switchgear.adapters.pinecone import parse_options as pinecone_options
from switchgear.cli_config import describe
from switchgear.controlplane.agent_check import agent_problems
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.dataplane import http as front_door
from switchgear.dataplane.cache import MemoryCache
from switchgear.dataplane.cache_shared import ResponseCache
from switchgear.dataplane.gateway import GatewayServicer
from switchgear.dataplane.governance import Governance, TenantView
from switchgear.dataplane.http_door import DoorLimits
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer
from switchgear.dataplane.snapshot import SecretRef, ServiceView
from switchgear.dataplane.worker import TaskWorker, WorkerOptions
from switchgear.emulators import pinecone as pinecone_emu
from switchgear.emulators.real import RealServer, start_chroma
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc, tasks_pb2
from tests.test_stream import Agent, make_agent, snapshot, view

PC_KEY = "pc-vector-scope-key"
KEYS = {"acme": "sg-ka-acme-vector-secret", "globex": "sg-kg-globex-vector-secret"}
A_VECTORS = [{"id": "a1", "values": [1, 0, 0], "metadata": {"owner": "acme"}},
             {"id": "a2", "values": [0, 1, 0], "metadata": {"owner": "acme"}}]


def governance() -> Governance:
    return Governance(
        tenants=MappingProxyType({t: TenantView(t) for t in KEYS}),
        keys=MappingProxyType({f"k{t[0]}": (t, hashlib.sha256(k.encode()).digest()) for t, k in KEYS.items()}))


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    server = start_chroma(tmp_path_factory.mktemp("chroma"))
    try:
        yield server
    finally:
        server.stop()


class Doors:
    """Both doors of one agent in front of the Pinecone emulator and the real Chroma server."""

    def __init__(self, http_url: str, stub: Any, agent: Agent, index: Any, chroma_url: str) -> None:
        self.http_url, self.stub, self.agent, self.index, self.chroma_url = http_url, stub, agent, index, chroma_url

    async def http(self, tenant: str, service: str, method: str, payload: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(timeout=20) as client:
            return await client.post(f"{self.http_url}/v1/invoke", json={
                "service": service, "method": method, "payload": payload},
                headers={"Authorization": f"Bearer {KEYS[tenant]}"})

    async def ok(self, tenant: str, service: str, method: str, payload: dict[str, Any]) -> Any:
        answer = await self.http(tenant, service, method, payload)
        assert answer.status_code == 200, answer.text
        return answer.json()["payload"]

    async def refused(self, tenant: str, service: str, method: str, payload: dict[str, Any], field: str) -> None:
        """Refused at both doors, naming `field`, as the caller's own mistake."""
        answer = await self.http(tenant, service, method, payload)
        assert answer.status_code == 400, answer.text
        assert field in answer.json()["error"]["message"] and answer.json()["error"]["param"] == field, answer.text
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.grpc(tenant, service, method, payload)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in (caught.value.details() or "")

    async def grpc(self, tenant: str, service: str, method: str, payload: dict[str, Any]) -> Any:
        request = gateway_pb2.InvokeRequest(service=service, method=method, payload=orjson.dumps(payload))
        answer = await self.stub.Invoke(request, metadata=(("authorization", f"Bearer {KEYS[tenant]}"),), timeout=20)
        return orjson.loads(answer.payload)

    def pinecone_space(self, namespace: str) -> dict[str, Any]:
        return dict(self.index.runner.app[pinecone_emu._INDEX]["namespaces"].get(namespace, {}))


def _services(index_url: str, chroma_url: str) -> list[ServiceView]:
    pc = {"index_name": "knowledge-base"}
    return [
        dataclasses.replace(view("pc", "pinecone", [index_url], category="vector_db",
                                 options={**pc, "namespace_scope": "tenant", "scope_prefix": "t-"}),
                            api_key=SecretRef(env="PC_KEY"), metadata=MappingProxyType({"cache.ttl": "60"})),
        dataclasses.replace(view("pc-fixed", "pinecone", [index_url], category="vector_db",
                                 options={**pc, "namespace": "shared"}), api_key=SecretRef(env="PC_KEY")),
        dataclasses.replace(view("pc-inside", "pinecone", [index_url], category="vector_db",
                                 options={**pc, "namespace_scope": "tenant", "caller_namespaces": True}),
                            api_key=SecretRef(env="PC_KEY")),
        view("chroma", "chroma", [chroma_url], category="vector_db", options={"database_scope": "tenant"}),
        view("chroma-fixed", "chroma", [chroma_url], category="vector_db", options={"database": "fixed-db"}),
    ]


@contextlib.asynccontextmanager
async def serving(chroma_url: str) -> AsyncIterator[Doors]:
    async with await pinecone_emu.start(api_key=PC_KEY, index="knowledge-base", dimension=3) as index:
        snap = snapshot(*_services(index.url, chroma_url))
        snap = dataclasses.replace(snap, governance=governance(),
                                   settings=dataclasses.replace(snap.settings, cache_enabled=True))
        agent = make_agent(snap, env={"PC_KEY": PC_KEY})
        pipeline = Pipeline(agent.invoker.invoke, auth_required=True, quotas=QuotaEnforcer(LocalCounters()),
                            cache=ResponseCache(MemoryCache(1 << 20)))
        limits = DoorLimits(max_body_bytes=64 * 1024, max_buffered_bytes=1024 * 1024, body_timeout_s=2)
        runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0",
                                                 pipeline, limits=limits)
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            GatewayServicer(agent.holder, agent.invoker, agent.streamer, pipeline), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Doors(f"http://{address}", gateway_pb2_grpc.GatewayServiceStub(channel), agent, index, chroma_url)
        finally:
            await channel.close()
            await server.stop(None)
            await runner.cleanup()
            await agent.pool.close()


@pytest.fixture
async def doors(chroma: RealServer) -> AsyncIterator[Doors]:
    async with serving(chroma.url) as running:
        yield running


# --- Pinecone -----------------------------------------------------------------------------


async def test_pinecone_tenants_reach_only_their_own_namespace(doors: Doors) -> None:
    assert (await doors.ok("acme", "pc", "upsert", {"vectors": A_VECTORS}))["upsertedCount"] == 2
    assert set(doors.pinecone_space("t-acme")) == {"a1", "a2"}
    # globex without overrides: its own, empty namespace
    query = {"vector": [1, 0, 0], "topK": 5, "includeMetadata": True}
    assert (await doors.ok("globex", "pc", "query", query))["matches"] == []
    assert (await doors.grpc("globex", "pc", "query", {**query, "filter": {"owner": "acme"}}))["matches"] == []
    assert (await doors.ok("globex", "pc", "fetch", {"ids": ["a1", "a2"]}))["vectors"] == {}
    # ... and any override of the scope is refused, naming the field
    for field, value in (("namespace", "t-acme"), ("namespace", ""), ("namespace", None), ("index", "other")):
        for method, payload in (("query", query), ("fetch", {"ids": ["a1"]}), ("delete", {"deleteAll": True}),
                                ("upsert", {"vectors": [{"id": "a1", "values": [0, 0, 1]}]})):
            await doors.refused("globex", "pc", method, {**payload, field: value}, f"payload.{field}")
    # globex's writes and deletes of the same ids stay in its own namespace
    await doors.ok("globex", "pc", "upsert", {"vectors": [{"id": "a1", "values": [0, 0, 1]}]})
    await doors.ok("globex", "pc", "delete", {"deleteAll": True})
    await doors.ok("globex", "pc", "delete", {"ids": ["a2"]})
    assert doors.pinecone_space("t-acme")["a1"]["values"] == [1, 0, 0] and set(doors.pinecone_space("t-acme")) == {
        "a1", "a2"}
    # acme repeating its own namespace and the index is fine (clients that always send them)
    mine = await doors.ok("acme", "pc", "query", {**query, "namespace": "t-acme", "index": "knowledge-base"})
    assert [m["id"] for m in mine["matches"]] == ["a1", "a2"]
    # stats name only the caller's namespace
    stats = await doors.grpc("globex", "pc", "describe_index_stats", {})
    assert set(stats["namespaces"]) <= {"t-globex"} and stats["totalVectorCount"] == 0
    assert (await doors.ok("acme", "pc", "describe_index_stats", {}))["totalVectorCount"] == 2


async def test_refusals_count_against_nothing_shared(doors: Doors) -> None:
    before = sum(doors.index.instance.by_path.values())
    for _ in range(12):
        await doors.refused("globex", "pc", "query", {"vector": [1, 0, 0], "topK": 1, "namespace": "x"},
                            "payload.namespace")
    assert sum(doors.index.instance.by_path.values()) == before  # refused before any upstream request
    answer = await doors.http("globex", "pc", "query", {"vector": [1, 0, 0], "topK": 1})
    assert answer.status_code == 200 and answer.json()["attempts"] == 1 and answer.json()["endpoint"] == "e0"


async def test_a_cached_answer_is_never_another_tenants(doors: Doors) -> None:
    """"pc" caches its answers (cache.ttl): acme's query answer is not served to globex."""
    await doors.ok("acme", "pc", "upsert", {"vectors": A_VECTORS})
    query = {"vector": [1, 0, 0], "topK": 1}
    first = await doors.http("acme", "pc", "query", query)
    again = await doors.http("acme", "pc", "query", query)
    assert again.json()["cached"] is True and again.json()["payload"] == first.json()["payload"]
    other = await doors.http("globex", "pc", "query", query)
    assert other.status_code == 200 and other.json()["cached"] is False and other.json()["payload"]["matches"] == []
    # the scope is part of the key: re-pointed at other namespaces, the service answers afresh
    snap = doors.agent.holder.current
    assert snap is not None
    moved = dataclasses.replace(snap.services["pc"], options=pinecone_options(
        {"index_name": "knowledge-base", "namespace_scope": "tenant", "scope_prefix": "u-"}))
    doors.agent.holder.current = dataclasses.replace(snap, services=MappingProxyType({**snap.services, "pc": moved}))
    after = await doors.http("acme", "pc", "query", query)
    assert after.json()["cached"] is False and after.json()["payload"]["matches"] == []


async def test_a_service_scope_is_the_configured_namespace_for_everyone(doors: Doors) -> None:
    await doors.ok("acme", "pc-fixed", "upsert", {"vectors": A_VECTORS, "namespace": "shared"})
    assert set(doors.pinecone_space("shared")) == {"a1", "a2"}
    await doors.refused("globex", "pc-fixed", "fetch", {"ids": ["a1"], "namespace": "t-acme"}, "payload.namespace")


async def test_caller_namespaces_are_inside_the_tenants_own(doors: Doors) -> None:
    await doors.ok("acme", "pc-inside", "upsert", {"vectors": A_VECTORS, "namespace": "docs"})
    assert set(doors.pinecone_space("acme/docs")) == {"a1", "a2"}
    await doors.ok("globex", "pc-inside", "delete", {"deleteAll": True, "namespace": "docs"})
    await doors.ok("globex", "pc-inside", "delete", {"deleteAll": True, "namespace": "../acme/docs"})
    assert (await doors.ok("globex", "pc-inside", "fetch", {"ids": ["a1"], "namespace": "acme/docs"}))[
        "vectors"] == {}
    assert set(doors.pinecone_space("acme/docs")) == {"a1", "a2"}
    stats = await doors.ok("acme", "pc-inside", "describe_index_stats", {})
    assert set(stats["namespaces"]) == {"acme/docs"}
    await doors.refused("globex", "pc-inside", "query", {"vector": [1, 0, 0], "topK": 1, "namespace": ["docs"]},
                        "payload.namespace")


# --- Chroma -------------------------------------------------------------------------------


async def test_chroma_tenants_reach_only_their_own_database(doors: Doors) -> None:
    created = await doors.ok("acme", "chroma", "collections.create", {"name": "docs", "get_or_create": True})
    await doors.ok("acme", "chroma", "add", {"collection": "docs", "ids": ["s1"], "embeddings": [[1, 2]],
                                             "documents": ["acme's secret"]})
    async with httpx.AsyncClient(base_url=f"{doors.chroma_url}/api/v2/tenants/default_tenant") as raw:
        assert (await raw.get("/databases/acme")).status_code == 200  # created on first use
    # globex: its own database, where acme's collection does not exist
    assert await doors.ok("globex", "chroma", "collections.list", {}) == []
    missing = await doors.http("globex", "chroma", "get", {"collection": "docs"})
    assert missing.status_code in (400, 404), missing.text
    # overrides of tenant and database, and acme's collection id, are refused naming the field
    for payload, field in (({"collection": "docs", "database": "acme"}, "payload.database"),
                           ({"collection": "docs", "tenant": "other_tenant"}, "payload.tenant"),
                           ({"collection_id": created["id"]}, "payload.collection_id"),
                           ({"collection_id": created["id"], "database": "acme"}, "payload.database")):
        for method in ("get", "query", "delete", "upsert", "count"):
            body = {**payload, **({"query_embeddings": [[1, 2]]} if method == "query" else {}),
                    **({"ids": ["s1"], "embeddings": [[0, 0]]} if method == "upsert" else {})}
            await doors.refused("globex", "chroma", method, body, field)
    # globex's own "docs" is another collection (the name → id cache is per scope)
    await doors.ok("globex", "chroma", "collections.create", {"name": "docs"})
    await doors.ok("globex", "chroma", "upsert", {"collection": "docs", "ids": ["s1"], "embeddings": [[9, 9]],
                                                  "documents": ["globex's"]})
    await doors.ok("globex", "chroma", "delete", {"collection": "docs", "ids": ["s1"]})
    got = await doors.ok("acme", "chroma", "get", {"collection": "docs", "include": ["documents"]})
    assert got["documents"] == ["acme's secret"]
    # acme may name its collection by id, and repeat its own database
    assert await doors.ok("acme", "chroma", "count", {"collection_id": created["id"], "database": "acme"}) == 1


async def test_chroma_collection_ids_of_other_databases_are_refused_in_a_service_scope(doors: Doors) -> None:
    """Chroma serves any collection by id whatever database the URL names: the adapter checks."""
    async with httpx.AsyncClient(base_url=f"{doors.chroma_url}/api/v2/tenants/default_tenant") as raw:
        for db in ("fixed-db", "elsewhere"):
            assert (await raw.post("/databases", json={"name": db})).status_code in (200, 409)
        other = (await raw.post("/databases/elsewhere/collections", json={"name": "private"})).json()["id"]
        await raw.post(f"/databases/elsewhere/collections/{other}/add", json={"ids": ["p"], "embeddings": [[1, 1]]})
    await doors.refused("acme", "chroma-fixed", "get", {"collection_id": other}, "payload.collection_id")
    await doors.refused("acme", "chroma-fixed", "delete", {"collection_id": other, "ids": ["p"]},
                        "payload.collection_id")
    # an id of the service's own database is found by listing it (another agent may have made it)
    async with httpx.AsyncClient(base_url=f"{doors.chroma_url}/api/v2/tenants/default_tenant") as raw:
        mine = (await raw.post("/databases/fixed-db/collections", json={"name": "mine"})).json()["id"]
    assert await doors.ok("acme", "chroma-fixed", "count", {"collection_id": mine}) == 0


async def test_a_collection_name_cannot_climb_out_of_its_collections(doors: Doors) -> None:
    """A collection name goes into the URL's path: "." and ".." are dot segments the HTTP client
    resolves, so `collections.delete {"name": ".."}` was DELETE …/databases/{db} — the whole
    database every caller of the service shares — and `collections.get` answered the database.
    A name that is not one Chroma takes is refused naming the field, before any request."""
    async with httpx.AsyncClient(base_url=f"{doors.chroma_url}/api/v2/tenants/default_tenant") as raw:
        assert (await raw.post("/databases", json={"name": "fixed-db"})).status_code in (200, 409)
    await doors.ok("acme", "chroma-fixed", "collections.create", {"name": "kept", "get_or_create": True})
    for name in ("..", ".", "a/../..", "x" * 513):
        await doors.refused("globex", "chroma-fixed", "collections.delete", {"name": name}, "payload.name")
        await doors.refused("globex", "chroma-fixed", "collections.get", {"name": name}, "payload.name")
        await doors.refused("globex", "chroma-fixed", "count", {"collection": name}, "payload.collection")
    async with httpx.AsyncClient(base_url=f"{doors.chroma_url}/api/v2/tenants/default_tenant") as raw:
        assert (await raw.get("/databases/fixed-db")).status_code == 200
        assert (await raw.get("/databases/fixed-db/collections/kept")).status_code == 200
    assert await doors.ok("globex", "chroma-fixed", "count", {"collection": "kept"}) == 0


async def test_a_dot_collection_name_never_reaches_the_database_through_an_httpx_client(chroma: RealServer) -> None:
    """The adapter's contract is httpx's client, which resolves dot segments as a path-normalising
    proxy would: the name is refused before any request is made."""
    sent: list[str] = []

    async def hook(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    target = Target(chroma.url, options=chroma_options({"database": "dots-db"}))
    async with httpx.AsyncClient(base_url=f"{chroma.url}/api/v2/tenants/default_tenant") as raw:
        assert (await raw.post("/databases", json={"name": "dots-db"})).status_code in (200, 409)
    async with httpx.AsyncClient(event_hooks={"request": [hook]}) as client:
        for method in ("collections.delete", "collections.get"):
            with pytest.raises(UpstreamError) as caught:
                await ChromaAdapter().invoke(client, target, AdapterRequest(method, {"name": ".."}, 10, tenant="t"))
            assert caught.value.kind is ErrorKind.CLIENT and caught.value.message.startswith("payload.name: ")
    assert sent == []
    async with httpx.AsyncClient(base_url=f"{chroma.url}/api/v2/tenants/default_tenant") as raw:
        assert (await raw.get("/databases/dots-db")).status_code == 200


# --- tasks, options, config ---------------------------------------------------------------


async def test_a_task_reaches_its_tenants_namespace(doors: Doors) -> None:
    """A task run by an agent's worker (worker.py) calls the adapter as the task's tenant, so a
    deferred write lands in that tenant's namespace, and a payload override fails the task as
    the client's mistake."""
    worker = TaskWorker(None, "w1", doors.agent.holder, doors.agent.invoker, WorkerOptions())  # type: ignore[arg-type]

    def leased(payload: dict[str, Any]) -> tasks_pb2.LeasedTask:
        task = tasks_pb2.Task(id="t1", tenant="globex", service="pc", method="upsert", attempts=1,
                              payload=orjson.dumps(payload))
        task.timeout.FromSeconds(10)
        return tasks_pb2.LeasedTask(task=task, lease_id="l1")

    done = await worker._invoke(leased({"vectors": A_VECTORS}))
    assert done.outcome == tasks_pb2.TASK_OUTCOME_SUCCEEDED, done
    assert set(doors.pinecone_space("t-globex")) == {"a1", "a2"} and doors.pinecone_space("t-acme") == {}
    refused = await worker._invoke(leased({"vectors": A_VECTORS, "namespace": "t-acme"}))
    assert refused.outcome == tasks_pb2.TASK_OUTCOME_FAILED and refused.error.kind == "client"
    assert "payload.namespace" in refused.error.message and not refused.retryable
    assert doors.pinecone_space("t-acme") == {}


@pytest.mark.parametrize(("parse", "options", "key"), [
    (pinecone_options, {"namespace_scope": "tenants"}, "namespace_scope"),
    (pinecone_options, {"namespace_scope": True}, "namespace_scope"),
    (pinecone_options, {"scope_prefix": "t-"}, "scope_prefix"),  # without namespace_scope: tenant
    (pinecone_options, {"namespace_scope": "tenant", "scope_prefix": "x" * 65}, "scope_prefix"),
    (pinecone_options, {"caller_namespaces": "yes"}, "caller_namespaces"),
    (chroma_options, {"database_scope": "per-tenant"}, "database_scope"),
    (chroma_options, {"database_scope": "tenant", "scope_prefix": "-bad"}, "scope_prefix"),
    (chroma_options, {"database_scope": "tenant", "scope_prefix": "a/b"}, "scope_prefix"),
    (chroma_options, {"namespace_scope": "tenant"}, "namespace_scope"),
])
def test_bad_scope_options_are_refused_naming_the_key(parse: Any, options: dict[str, Any], key: str) -> None:
    with pytest.raises(OptionsError) as caught:
        parse(options)
    assert caught.value.path == key


def test_derived_chroma_databases_are_names_chroma_takes_and_distinct() -> None:
    options = ChromaOptions(database_per_tenant=True)
    names = {t: options.database_for(t) for t in ("a", "ab", "abc", "ab-", "ab-0", "a-0", "acme")}
    assert names == {"a": "a_0", "ab": "ab_0", "abc": "abc", "ab-": "ab-_0", "ab-0": "ab-0", "a-0": "a-0",
                     "acme": "acme"}
    assert options.database_for("") == "default_database"


def test_a_shared_cache_is_refused_for_a_tenant_scoped_service() -> None:
    from switchgear.adapters import builtin_adapters
    from switchgear.v1 import common_pb2
    from switchgear.wire import checks

    msg = common_pb2.Service(name="pc", protocol="pinecone", category=common_pb2.SERVICE_CATEGORY_VECTOR_DB,
                             endpoints=[common_pb2.Endpoint(id="e0", url="http://127.0.0.1:1", weight=1)],
                             options_json='{"index_name": "i", "namespace_scope": "tenant"}',
                             metadata={"cache.shared": "true"})
    rejected = checks.check_services([msg], builtin_adapters()).rejected
    assert rejected["pc"].path == "services[pc].metadata[cache.shared]"
    msg.options_json = '{"index_name": "i"}'
    assert checks.check_services([msg], builtin_adapters()).rejected == {}


CONFIG = """
external_services:
  services:
    vector_databases:
      pc:
        protocol: pinecone
        endpoint: https://api.pinecone.io
        api_key: ${PC}
        index_name: kb
        options: {namespace_scope: tenant, scope_prefix: t-, caller_namespaces: true}
      docs:
        protocol: chroma
        endpoint: http://chroma:8000
        options: {database_scope: tenant, scope_prefix: sg-}
"""


def test_config_validate_prints_the_effective_scope() -> None:
    state = load_config(CONFIG, env={"PC": "x"}, check=agent_problems)
    rows = {line.split()[0]: line for line in describe(state).splitlines()[1:] if line.startswith("  ")}
    assert ("scope=pinecone index kb, namespace t-<tenant> per Switchgear tenant ('' without one), callers' "
            "namespaces inside it") in rows["pc"]
    assert ("scope=chroma tenant default_tenant, database sg-<tenant> per Switchgear tenant (created on first use; "
            "default_database without one)") in rows["docs"]


@pytest.mark.parametrize(("bad", "key"), [("namespace_scope: everyone", "namespace_scope"),
                                          ("namespace_scope: tenant, caller_namespaces: 1", "caller_namespaces"),
                                          ("scope_prefix: t-", "scope_prefix")])
def test_config_refuses_bad_scope_options_naming_the_key(bad: str, key: str) -> None:
    text = CONFIG.replace("namespace_scope: tenant, scope_prefix: t-, caller_namespaces: true", bad)
    with pytest.raises(ConfigError) as caught:
        load_config(text, env={"PC": "x"}, check=agent_problems)
    assert key in str(caught.value)
    shared = CONFIG.replace("protocol: chroma", "protocol: chroma\n        metadata: {cache.shared: 'true'}")
    with pytest.raises(ConfigError, match=r"metadata\[cache\.shared\]"):
        load_config(shared, env={"PC": "x"}, check=agent_problems)


async def test_a_tenants_database_is_created_once_under_a_burst(chroma: RealServer) -> None:
    created: list[str] = []

    async def hook(request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path.endswith("/databases"):
            created.append(request.url.path)

    adapter = ChromaAdapter()
    target = Target(chroma.url, options=chroma_options({"database_scope": "tenant", "scope_prefix": "burst-"}))
    async with httpx.AsyncClient(event_hooks={"request": [hook]}) as client:
        answers = await asyncio.gather(*(adapter.invoke(client, target, AdapterRequest(
            "collections.list", {}, 10, tenant="initech")) for _ in range(8)))
        assert [orjson.loads(a.body) for a in answers] == [[]] * 8 and len(created) == 1
        await adapter.invoke(client, target, AdapterRequest("collections.list", {}, 10, tenant="initech"))
        assert len(created) == 1
        # another agent (a fresh adapter) meets the database already there: "exists" is success
        await ChromaAdapter().invoke(client, target, AdapterRequest("collections.list", {}, 10, tenant="initech"))
    assert len(created) == 2
    async with httpx.AsyncClient(base_url=f"{chroma.url}/api/v2/tenants/default_tenant") as raw:
        assert (await raw.get("/databases/burst-initech")).status_code == 200


# ---------------------------------------------------------------------------------------
# a tenant's derived scope must not be the one calls without a tenant reach


def test_a_tenant_whose_scope_is_the_no_tenant_one_is_refused_at_the_change(tmp_path: Path) -> None:
    from switchgear.controlplane import tenancy
    from switchgear.controlplane.model import Category, Tenant
    from switchgear.controlplane.registry import Registry
    from switchgear.controlplane.store import Change, SqliteStore
    from switchgear.controlplane.validate import ValidationError
    from tests.conftest import service

    registry = Registry(SqliteStore(tmp_path / "r.db"))
    # prefix "default_" + tenant "database" = Chroma's default database, which operator calls reach
    registry.register(dataclasses.replace(
        service("kb", "http://127.0.0.1:9", protocol="chroma",
                options_json='{"database_scope": "tenant", "scope_prefix": "default_"}'),
        category=Category.VECTOR_DB), "test")
    registry.register(dataclasses.replace(
        service("pc", "http://127.0.0.1:9", protocol="pinecone",
                options_json='{"index_name": "i", "namespace": "t-ops", "namespace_scope": "tenant", '
                             '"scope_prefix": "t-"}'),
        category=Category.VECTOR_DB), "test")
    registry.change(tenancy.create_tenant(registry.state, Tenant(id="acme")), Change("test", "create_tenant", "acme"))
    for clash, path in (("database", "services[kb].options_json.scope_prefix"),
                        ("ops", "services[pc].options_json.scope_prefix")):
        with pytest.raises(ValidationError) as refused:
            registry.change(tenancy.create_tenant(registry.state, Tenant(id=clash)),
                            Change("test", "create_tenant", clash))
        assert [p.path for p in refused.value.problems] == [path]
        assert "calls without a tenant" in refused.value.problems[0].message
    assert [t.id for t in registry.state.tenants] == ["acme"]
