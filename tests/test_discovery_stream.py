"""The snapshot stream's protocol, driven by a fake agent speaking the real wire protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from switchgear.controlplane.grpc_port import GRPC_SERVERS
from switchgear.v1 import discovery_pb2, discovery_pb2_grpc
from tests.conftest import ControlPlane, service

READ_TIMEOUT_S = 5.0

# On the control plane's gRPC servers both (grpc_port.py): what a handler sees must not differ.
pytestmark = pytest.mark.parametrize("cp_grpc_server", GRPC_SERVERS)


class FakeAgent:
    """A raw StreamSnapshots call: write requests, read responses with a deadline."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str = "fake-1") -> None:
        self.call = discovery_pb2_grpc.DiscoveryServiceStub(channel).StreamSnapshots()
        self.node = discovery_pb2.Node(id=node_id, protocols=["openai"])

    async def hello(self, held: str = "") -> None:
        await self.call.write(discovery_pb2.StreamSnapshotsRequest(node=self.node, version_info=held))

    async def read(self) -> discovery_pb2.StreamSnapshotsResponse:
        response = await asyncio.wait_for(self.call.read(), READ_TIMEOUT_S)
        assert response is not grpc.aio.EOF
        return response

    async def ack(self, response: discovery_pb2.StreamSnapshotsResponse) -> None:
        await self.call.write(
            discovery_pb2.StreamSnapshotsRequest(version_info=response.version_info, response_nonce=response.nonce)
        )

    async def nack(self, response: discovery_pb2.StreamSnapshotsResponse, held: str, message: str) -> None:
        await self.call.write(
            discovery_pb2.StreamSnapshotsRequest(
                version_info=held, response_nonce=response.nonce,
                error_detail=discovery_pb2.NackDetail(field_path="services[x].options_json.bad", message=message),
            )
        )


@pytest.fixture
async def channel(control_plane: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(control_plane.address) as ch:
        yield ch


async def wait_for(predicate, timeout_s: float = READ_TIMEOUT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def status(cp: ControlPlane, node_id: str = "fake-1"):  # type: ignore[no-untyped-def]
    return {a.node.id: a for a in cp.tracker.list()}[node_id]


async def test_first_request_must_name_the_node(channel: grpc.aio.Channel) -> None:
    call = discovery_pb2_grpc.DiscoveryServiceStub(channel).StreamSnapshots()
    await call.write(discovery_pb2.StreamSnapshotsRequest(version_info=""))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.id" in (info.value.details() or "")


async def test_new_agent_gets_current_snapshot_and_ack_is_recorded(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    control_plane.registry.register(service("chat"), "test")
    agent = FakeAgent(channel)
    await agent.hello()
    response = await agent.read()
    assert response.version_info == control_plane.registry.snapshot.version
    assert [s.name for s in response.snapshot.services] == ["chat"]
    assert response.nonce
    await agent.ack(response)
    await wait_for(lambda: status(control_plane).acked_version == response.version_info)
    assert status(control_plane).connected
    assert status(control_plane).pending_version == ""


async def test_agent_holding_current_version_gets_nothing_until_a_change(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    held = control_plane.registry.register(service("chat"), "test").version
    agent = FakeAgent(channel)
    await agent.hello(held=held)
    await wait_for(lambda: any(a.connected for a in control_plane.tracker.list()))
    newer = control_plane.registry.register(service("chat", "http://127.0.0.1:10/v1"), "test").version
    response = await agent.read()  # the first thing sent is the change, not `held` again
    assert response.version_info == newer != held


async def test_nack_is_recorded_and_the_version_never_resent(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    first = control_plane.registry.register(service("chat"), "test").version
    agent = FakeAgent(channel)
    await agent.hello()
    response = await agent.read()
    await agent.ack(response)
    # The control plane accepts it, the (older) agent does not: version skew.
    rejected = control_plane.registry.register(service("chat", "http://127.0.0.1:10/v1"), "test").version
    response = await agent.read()
    assert response.version_info == rejected
    await agent.nack(response, held=first, message="unknown option")
    await wait_for(lambda: status(control_plane).nacked_version == rejected)
    st = status(control_plane)
    assert st.acked_version == first
    assert st.last_nack is not None and st.last_nack.message == "unknown option"
    assert st.last_nack.field_path == "services[x].options_json.bad"

    # A reconnect holding the old version does not bring the rejected one back ...
    agent.call.cancel()
    again = FakeAgent(channel)
    await again.hello(held=first)
    await wait_for(lambda: status(control_plane).connected and status(control_plane).acked_version == first)
    # ... only the next version does.
    fixed = control_plane.registry.register(service("chat", "http://127.0.0.1:11/v1"), "test").version
    response = await again.read()
    assert response.version_info == fixed


async def test_stale_nonce_is_ignored(control_plane: ControlPlane, channel: grpc.aio.Channel) -> None:
    control_plane.registry.register(service("chat"), "test")
    agent = FakeAgent(channel)
    await agent.hello()
    response = await agent.read()
    await agent.call.write(
        discovery_pb2.StreamSnapshotsRequest(version_info=response.version_info, response_nonce="not-the-nonce")
    )
    await agent.ack(response)
    await wait_for(lambda: status(control_plane).acked_version == response.version_info)
    # the stale answer did not count as the answer: exactly one ACK moved the state
    assert status(control_plane).pending_version == ""


async def test_a_newer_version_waits_for_the_answer_to_the_pending_one(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    control_plane.registry.register(service("chat"), "test")
    agent = FakeAgent(channel)
    await agent.hello()
    first = await agent.read()
    newer = control_plane.registry.register(service("chat", "http://127.0.0.1:12/v1"), "test").version
    assert status(control_plane).pending_version == first.version_info
    await agent.ack(first)
    second = await agent.read()
    assert second.version_info == newer
    assert second.nonce != first.nonce


@pytest.mark.parametrize("debounce_s", [0.3])
async def test_burst_of_changes_goes_out_as_one_snapshot(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    control_plane.registry.register(service("chat"), "test")
    agent = FakeAgent(channel)
    await agent.hello()
    await agent.ack(await agent.read())
    await wait_for(lambda: status(control_plane).pending_version == "" and status(control_plane).acked_version != "")
    for port in range(20, 25):
        last = control_plane.registry.register(service("chat", f"http://127.0.0.1:{port}/v1"), "test").version
    response = await agent.read()
    assert response.version_info == last
    assert [e.url for e in response.snapshot.services[0].endpoints] == ["http://127.0.0.1:24/v1"]
