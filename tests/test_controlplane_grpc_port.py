"""The control plane's gRPC port on each of its servers (grpc_port.py), in-process and real.

On switchgear.rpc (the default) and grpc.aio alike: an anonymous snapshot stream and an
operator call without the admin token are refused, an agent with the token is served, pushed a
change and forgotten when it goes away, health and reflection answer. On switchgear.rpc, a flooding client is
bounded (connections over --grpc-max-connections and streams over --grpc-max-streams refused,
a PING flood ended, anonymous streams answered within a second) while the agents
already connected keep being served. Limits grpc.aio would not apply are refused at start, and
the connection cap is lowered to what the open-file limit allows, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from switchgear import cli, rpc
from switchgear.controlplane import grpc_port
from switchgear.controlplane.grpc_port import GRPC_LIMITS, GRPC_SERVERS
from switchgear.controlplane.server import SERVICE_NAMES, ControlPlane, Options, StartupError, build_control_plane
from switchgear.rpc import http2
from switchgear.v1 import admin_pb2, admin_pb2_grpc, discovery_pb2, discovery_pb2_grpc
from tests.conftest import service
from tests.test_rpc_limits import frames_until_ping, settled, until
from tests.test_rpc_server import Client, bounded

pytestmark = pytest.mark.timeout(60)

SNAPSHOTS = "/switchgear.v1.DiscoveryService/StreamSnapshots"


@dataclasses.dataclass
class Running:
    plane: ControlPlane
    address: str
    agent_token: str
    admin_token: str


@contextlib.asynccontextmanager
async def running(tmp_path: Path, kind: str, **options: Any) -> AsyncIterator[Running]:
    """A control plane with default authentication, on the `kind` gRPC server."""
    db = tmp_path / "r.db"
    plane = build_control_plane(Options(db_path=str(db), listen="127.0.0.1:0", active_probes=False,
                                        grpc_server=kind, **options))
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(plane.run(stop, on_ready=ready.set_result))
    try:
        address = await bounded(ready, 10)
        yield Running(plane, address, Path(f"{db}.agent-token").read_text().strip(),
                      Path(f"{db}.admin-token").read_text().strip())
    finally:
        stop.set()
        await bounded(task, 10)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Agent:
    """A snapshot stream on its own channel, as an agent holds one."""

    def __init__(self, cp: Running, node: str, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(cp.address)
        self.call = discovery_pb2_grpc.DiscoveryServiceStub(self.channel).StreamSnapshots(
            metadata=bearer(token) if token else ())
        self.node = discovery_pb2.Node(id=node)

    async def hello(self) -> None:
        await self.call.write(discovery_pb2.StreamSnapshotsRequest(node=self.node))

    async def read_and_ack(self) -> discovery_pb2.StreamSnapshotsResponse:
        response = await bounded(self.call.read())
        await self.call.write(discovery_pb2.StreamSnapshotsRequest(version_info=response.version_info,
                                                                   response_nonce=response.nonce))
        return response  # type: ignore[no-any-return]


def agents(cp: Running) -> dict[str, Any]:
    return {a.node.id: a for a in cp.plane.parts.tracker.list()}


@pytest.mark.parametrize("kind", GRPC_SERVERS)
async def test_every_service_and_interceptor_is_served_on_each_server(tmp_path: Path, kind: str) -> None:
    async with running(tmp_path, kind) as cp:
        assert isinstance(cp.plane.server, rpc.Server) == (kind == "switchgear")
        registry = cp.plane.parts.registry
        # Anonymous, with the admin token, with a wrong one: the snapshot stream is refused, no agent appears.
        for token in ("", cp.admin_token, cp.agent_token + "x"):
            anonymous = Agent(cp, "intruder", token)
            with contextlib.suppress(grpc.aio.AioRpcError):  # refused on its headers: the write may come late
                await anonymous.hello()
            assert await bounded(anonymous.call.code()) == grpc.StatusCode.UNAUTHENTICATED
            assert "agent token" in await anonymous.call.details()
            await anonymous.channel.close()
        assert "intruder" not in agents(cp)
        async with grpc.aio.insecure_channel(cp.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            for token in ("", cp.agent_token):  # the agent token opens no operator call
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await admin.ListServices(admin_pb2.ListServicesRequest(), metadata=bearer(token) if token else (),
                                             timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await admin.ListServices(admin_pb2.ListServicesRequest(), metadata=bearer(cp.admin_token), timeout=5)
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service="switchgear.v1.DiscoveryService"),
                                        timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [r async for r in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)]
            assert {s.name for s in replies[0].list_services_response.service} == set(SERVICE_NAMES)
        # An agent with the token: its report token in the headers, the snapshot, then a change.
        agent = Agent(cp, "agent-1", cp.agent_token)
        await agent.hello()
        assert dict(await bounded(agent.call.initial_metadata())).get("switchgear-report-token")
        first = await agent.read_and_ack()
        assert first.version_info == registry.snapshot.version
        changed = registry.register(service("chat"), "test").version
        assert (await agent.read_and_ack()).version_info == changed
        await until(lambda: agents(cp)["agent-1"].acked_version == changed, "the ACK recorded")
        # The agent goes away: its stream's handler ends and the tracker says so.
        await agent.channel.close()
        await until(lambda: not agents(cp)["agent-1"].connected, "the agent still counted as connected")


async def test_a_flooding_client_is_bounded_and_connected_agents_are_still_served(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limits = dataclasses.replace(GRPC_LIMITS, max_connections=3, max_concurrent_streams=4)
    async with running(tmp_path, "switchgear", grpc_limits=limits) as cp:
        assert isinstance(cp.plane.server, rpc.Server) and cp.plane.server.limits == limits
        agent = Agent(cp, "agent-1", cp.agent_token)
        await agent.hello()
        await agent.read_and_ack()
        server = cp.plane.server
        async with Client.open(cp.address) as pinger, Client.open(cp.address) as second:
            await until(lambda: len(server._connections) == 3, "three connections")
            for _ in range(3):  # connections over --grpc-max-connections: refused at once
                async with Client.open(cp.address) as extra:
                    assert await extra.closed_or_goaway() == http2.ENHANCE_YOUR_CALM
            await settled(pinger)
            for n in range(3):  # a PING flood with nothing sent between: the first is free, then strikes
                await frames_until_ping(pinger, b"ping%04d" % n)
            pinger.send(http2.frame(http2.PING, 0, 0, b"ping0003"))
            goaway = await pinger.until(http2.GOAWAY)
            assert goaway.code == http2.ENHANCE_YOUR_CALM and goaway.payload[8:] == b"too_many_pings"
            # Anonymous snapshot streams that send nothing: each is held for at most
            # DENY_FIRST_MESSAGE_S, at most --grpc-max-streams of them per connection.
            await settled(second)
            second.send(*(second.headers(sid, SNAPSHOTS) for sid in (1, 3, 5, 7, 9)))
            refused = await second.until(http2.RST_STREAM)
            assert (refused.sid, refused.code) == (9, http2.REFUSED_STREAM)
            for sid in (1, 3, 5, 7):
                answer = await second.response(sid)
                assert answer.headers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
        assert "refused a connection" in caplog.text
        # The agent connected before the flood is served still.
        changed = cp.plane.parts.registry.register(service("chat"), "test").version
        assert (await agent.read_and_ack()).version_info == changed
        await agent.channel.close()


def test_grpcio_refuses_the_limits_it_would_not_apply(tmp_path: Path) -> None:
    options = Options(db_path=str(tmp_path / "r.db"), grpc_server="grpcio",
                      grpc_limits=dataclasses.replace(GRPC_LIMITS, max_connections=10, ping_strikes=0))
    with pytest.raises(StartupError, match="grpcio does not apply --grpc-max-connections, --grpc-ping-strikes: "):
        build_control_plane(options)
    with pytest.raises(StartupError, match="--grpc-server: 'h2o' is not one of switchgear, grpcio"):
        build_control_plane(Options(db_path=str(tmp_path / "r.db"), grpc_server="h2o"))
    assert not (tmp_path / "r.db").exists()  # refused before anything was opened


def test_the_flags_and_their_defaults() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["controlplane", "--db", "r.db"])
    assert args.grpc_server == "switchgear" and cli._grpc_limits(args, "switchgear controlplane") == GRPC_LIMITS
    args = parser.parse_args(["controlplane", "--db", "r.db", "--grpc-max-connections", "20000",
                              "--grpc-ping-strikes", "0"])
    limits = cli._grpc_limits(args, "switchgear controlplane")
    assert (limits.max_connections, limits.ping_strikes) == (20000, 0)
    args = parser.parse_args(["controlplane", "--db", "r.db", "--grpc-max-connections", "0"])
    with pytest.raises(SystemExit, match="switchgear controlplane: --grpc-max-connections: 0 is out of range"):
        cli._grpc_limits(args, "switchgear controlplane")
    # The agent's defaults are its own.
    agent = parser.parse_args(["agent", "--control-plane", "127.0.0.1:1"])
    assert cli._grpc_limits(agent).max_connections == rpc.Limits().max_connections


def test_max_connections_is_what_the_open_file_limit_allows(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """By default as many as the open-file limit leaves (grpc.aio took any number); a flag above
    that is lowered with a warning; one below it is kept."""
    monkeypatch.setattr(grpc_port, "_open_file_limit", lambda: 1000)
    with caplog.at_level(logging.INFO, "switchgear.controlplane"):
        server = grpc_port.server("switchgear", GRPC_LIMITS, ())
    assert isinstance(server, rpc.Server) and server.limits.max_connections == 1000 - grpc_port.FD_RESERVE
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "at most 488 connections (the open-file limit 1000 less 512)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, "switchgear.controlplane"):
        server = grpc_port.server("switchgear", dataclasses.replace(GRPC_LIMITS, max_connections=20_000), ())
    assert server.limits.max_connections == 488
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "--grpc-max-connections lowered from 20000 to 488" in caplog.text
    caplog.clear()
    small = dataclasses.replace(GRPC_LIMITS, max_connections=100)
    assert grpc_port.server("switchgear", small, ()).limits == small and not caplog.text
