"""Delta delivery on the snapshot stream, driven by a fake agent speaking the real wire protocol:
what a delta carries after each kind of change, when the whole snapshot is sent instead, NACKs
and per-service rejections of deltas, and callers that abuse the stream."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest

from switchgear.controlplane import grpc_port
from switchgear.controlplane.agents import AgentTracker
from switchgear.controlplane.discovery import BOUNDED_PUSH_BYTES, DiscoveryServicer, SnapshotFeed, add_to_server
from switchgear.controlplane.grpc_port import GRPC_LIMITS, GRPC_SERVERS
from switchgear.controlplane.model import ApiKey, Category, EndpointSpec, RegistryState, ServiceSpec, Tenant
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import Change, SqliteStore
from switchgear.v1 import discovery_pb2, discovery_pb2_grpc
from tests.conftest import ControlPlane, service
from tests.test_discovery_stream import READ_TIMEOUT_S, FakeAgent, channel, status, wait_for

__all__ = ["channel"]  # the fixture, re-used

# On the control plane's gRPC servers both (grpc_port.py): what a handler sees must not differ.
pytestmark = pytest.mark.parametrize("cp_grpc_server", GRPC_SERVERS)

DELTA = discovery_pb2.SNAPSHOT_DELIVERY_DELTA


class DeltaAgent(FakeAgent):
    async def hello(self, held: str = "", delivery: int = DELTA) -> None:  # type: ignore[override]
        await self.call.write(discovery_pb2.StreamSnapshotsRequest(node=self.node, version_info=held,
                                                                   delivery=delivery))  # type: ignore[arg-type]

    async def synced(self, cp: ControlPlane) -> discovery_pb2.StreamSnapshotsResponse:
        """Read the first (whole) snapshot and ACK it; return it."""
        first = await self.read()
        await self.ack(first)
        await wait_for(lambda: status(cp, self.node.id).acked_version == first.version_info)
        return first


async def synced_agent(cp: ControlPlane, channel: grpc.aio.Channel) -> tuple[DeltaAgent, str]:
    """A delta agent on a registry holding 'chat', past its first (whole) snapshot: (it, the version it holds)."""
    cp.registry.register(service("chat"), "test")
    agent = DeltaAgent(channel)
    await agent.hello()
    return agent, (await agent.synced(cp)).version_info


async def test_deltas_name_what_each_change_touched(control_plane: ControlPlane, channel: grpc.aio.Channel) -> None:
    cp = control_plane
    cp.registry.register(service("chat"), "test")
    cp.registry.register(service("other", "http://127.0.0.1:11/v1"), "test")
    agent = DeltaAgent(channel)
    await agent.hello()
    first = await agent.synced(cp)
    assert first.HasField("snapshot") and not first.HasField("delta")  # nothing held: whole

    async def next_delta() -> discovery_pb2.SnapshotDelta:
        response = await agent.read()
        assert response.HasField("delta") and not response.HasField("snapshot")
        assert response.delta.version == response.version_info == cp.registry.snapshot.version
        await agent.ack(response)
        return response.delta

    held = first.version_info
    cp.registry.register(service("third", "http://127.0.0.1:12/v1"), "test")  # register
    delta = await next_delta()
    assert delta.base_version == held
    assert [s.name for s in delta.services] == ["third"] and not delta.removed_services
    assert not delta.HasField("settings") and not delta.HasField("governance")

    cp.registry.register(service("chat", "http://127.0.0.1:13/v1"), "test")  # update
    delta = await next_delta()
    assert [(s.name, s.endpoints[0].url) for s in delta.services] == [("chat", "http://127.0.0.1:13/v1")]

    cp.registry.deregister("other", "test")  # deregister: named, not sent
    delta = await next_delta()
    assert not delta.services and list(delta.removed_services) == ["other"]

    state = cp.registry.state  # settings: whole, only when they changed
    settings = dataclasses.replace(state.settings, default_strategy="round_robin")
    cp.registry.change(dataclasses.replace(state, settings=settings), Change("test", "settings", "*"))
    delta = await next_delta()
    assert not delta.services and delta.settings.default_strategy == "round_robin"

    state = cp.registry.state  # a tenant and its key: governance, whole
    cp.registry.change(dataclasses.replace(state, tenants=(Tenant(id="acme"),),
                                           keys=(ApiKey(id="0a1b2c3d4e5f6a7b", tenant="acme", sha256="ab" * 32),)),
                       Change("test", "tenant", "acme"))
    delta = await next_delta()
    assert not delta.services and not delta.HasField("settings")
    assert [t.id for t in delta.governance.tenants] == ["acme"]
    assert [k.id for k in delta.governance.keys] == ["0a1b2c3d4e5f6a7b"]


async def test_agents_not_asking_or_at_an_unknown_version_get_whole_snapshots(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    cp = control_plane
    cp.registry.register(service("chat"), "test")
    whole = DeltaAgent(channel, "whole-1")
    await whole.hello(delivery=discovery_pb2.SNAPSHOT_DELIVERY_UNSPECIFIED)  # an agent from before deltas
    await whole.synced(cp)
    forged = DeltaAgent(channel, "forged-1")
    await forged.hello(held="999999." + "f" * 12)  # no control plane sent this version
    response = await forged.read()
    assert response.HasField("snapshot") and response.version_info == cp.registry.snapshot.version
    await forged.ack(response)
    await wait_for(lambda: status(cp, "forged-1").acked_version == response.version_info)

    assert (status(cp, "whole-1").delivery, status(cp, "forged-1").delivery) == ("whole", "delta")  # ListAgents
    cp.registry.register(service("more", "http://127.0.0.1:12/v1"), "test")
    to_whole, to_forged = await whole.read(), await forged.read()
    assert to_whole.HasField("snapshot") and sorted(s.name for s in to_whole.snapshot.services) == ["chat", "more"]
    assert to_forged.HasField("delta") and [s.name for s in to_forged.delta.services] == ["more"]  # now it's known


async def test_a_nacked_delta_is_not_resent_and_the_next_one_spans_both_changes(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    cp = control_plane
    agent, held = await synced_agent(cp, channel)
    rejected = cp.registry.register(service("a", "http://127.0.0.1:12/v1"), "test").version
    response = await agent.read()
    assert response.HasField("delta") and response.version_info == rejected
    await agent.nack(response, held=held, message="settings it cannot take")
    await wait_for(lambda: status(cp).nacked_version == rejected)
    assert status(cp).acked_version == held
    fixed = cp.registry.register(service("b", "http://127.0.0.1:13/v1"), "test").version
    response = await agent.read()
    assert response.version_info == fixed and response.delta.base_version == held
    assert [s.name for s in response.delta.services] == ["a", "b"]  # since what it holds, not since `rejected`


async def test_a_resync_nack_gets_the_whole_snapshot_and_rejects_nothing(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    cp = control_plane
    agent, held = await synced_agent(cp, channel)
    version = cp.registry.register(service("a", "http://127.0.0.1:12/v1"), "test").version
    delta = await agent.read()
    await agent.call.write(discovery_pb2.StreamSnapshotsRequest(
        version_info=held + "~health-expired", response_nonce=delta.nonce,
        error_detail=discovery_pb2.NackDetail(field_path="base_version", message="not the version held")))
    again = await agent.read()
    assert again.version_info == version and again.HasField("snapshot")
    assert status(cp).nacked_version == ""  # a resync is no rejection of the version
    await agent.ack(again)
    cp.registry.register(service("b", "http://127.0.0.1:13/v1"), "test")
    assert (await agent.read()).HasField("delta")  # deltas again after the resync


async def test_per_service_rejections_of_a_delta_are_recorded(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    cp = control_plane
    agent, _ = await synced_agent(cp, channel)
    cp.registry.register(service("a", "http://127.0.0.1:12/v1"), "test")
    response = await agent.read()
    await agent.call.write(discovery_pb2.StreamSnapshotsRequest(
        version_info=response.version_info, response_nonce=response.nonce,
        rejected_services=[discovery_pb2.ServiceRejection(service="a", error_detail=discovery_pb2.NackDetail(
            field_path="services[a].options_json.x", message="unknown option"))]))
    await wait_for(lambda: status(cp).acked_version == response.version_info)
    assert [(r.service, r.field_path) for r in status(cp).rejections] == [("a", "services[a].options_json.x")]


async def test_a_flood_of_stale_answers_and_forged_versions_holds_no_memory_per_request(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    cp = control_plane
    cp.registry.register(service("chat"), "test")
    agents = [DeltaAgent(channel, f"flood-{i}") for i in range(20)]
    for i, agent in enumerate(agents):
        await agent.hello(held=f"{i}.{'0' * 12}" + "x" * 10_000)  # absurd, forged versions
    for agent in agents:
        response = await agent.read()
        assert response.HasField("snapshot")
        for _ in range(50):  # answers with nonces never sent
            await agent.call.write(discovery_pb2.StreamSnapshotsRequest(version_info="1.x", response_nonce="bogus"))
        await agent.ack(response)
    await wait_for(lambda: all(status(cp, f"flood-{i}").acked_version for i in range(20)))
    assert cp.feed is not None and len(cp.feed._bodies) == 1  # one whole body for the version, nothing per forged base


async def test_an_oversized_request_is_refused(channel: grpc.aio.Channel) -> None:
    agent = DeltaAgent(channel)
    huge = discovery_pb2.StreamSnapshotsRequest(node=agent.node, delivery=DELTA, version_info="v" * (5 << 20))
    await agent.call.write(huge)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(agent.call.read(), READ_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_grpc_stub_still_reads_responses(channel: grpc.aio.Channel, control_plane: ControlPlane) -> None:
    """The shared bodies and the per-stream nonce make one well-formed message on the wire."""
    control_plane.registry.register(service("chat"), "test")
    call = discovery_pb2_grpc.DiscoveryServiceStub(channel).StreamSnapshots()
    await call.write(discovery_pb2.StreamSnapshotsRequest(node=discovery_pb2.Node(id="n-1"), delivery=DELTA))
    response = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    assert len(response.nonce) == 16 and response.snapshot.version == response.version_info


async def test_only_large_pushes_wait_for_a_slot_of_the_push_bound(tmp_path: Path, cp_grpc_server: str) -> None:
    """--max-concurrent-pushes 1: a second whole snapshot of a large registry waits for the first
    one's answer; a small delta to a third agent does not."""
    store = SqliteStore(tmp_path / "r.db")
    registry = Registry(store)
    registry.replace(RegistryState(services=tuple(  # a whole snapshot above BOUNDED_PUSH_BYTES
        ServiceSpec(f"svc-{i:04d}", Category.LLM, "openai", (EndpointSpec("e", f"http://127.0.0.1:{10000 + i}/v1"),))
        for i in range(1500))), "test", "test")
    feed = SnapshotFeed(registry.snapshot)
    registry.subscribe(feed.publish)
    server = grpc_port.server(cp_grpc_server, GRPC_LIMITS, ())
    add_to_server(DiscoveryServicer(feed, AgentTracker(), debounce_s=0.0, max_concurrent_pushes=1), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert len(feed.body(None)[0]) >= BOUNDED_PUSH_BYTES
            small = DeltaAgent(ch, "small")
            await small.hello(held=registry.snapshot.version)  # holds the current version
            first, second = DeltaAgent(ch, "first"), DeltaAgent(ch, "second")
            await first.hello()
            large = await first.read()  # holds the one slot, unanswered
            await second.hello()
            registry.register(service("svc-0000", "http://127.0.0.1:9999/v1"), "test")  # a change
            delta = await small.read()
            assert delta.HasField("delta") and len(delta.SerializeToString()) < BOUNDED_PUSH_BYTES
            pending = asyncio.ensure_future(second.call.read())
            done, _ = await asyncio.wait({pending}, timeout=0.3)
            assert not done  # the second whole snapshot waits for the slot ...
            await first.ack(large)
            response = await asyncio.wait_for(pending, READ_TIMEOUT_S)  # ... until the first is answered
            assert response.HasField("snapshot")
    finally:
        await server.stop(None)
        store.close()
