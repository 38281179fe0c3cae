"""Agent process wiring: snapshot client, request path and the Gateway on one gRPC server.

Readiness goes through grpc.health.v1: NOT_SERVING until the first snapshot is applied, then
SERVING for good (a lost control plane does not make a serving agent unready).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from switchgear import __version__
from switchgear.adapters import builtin_adapters
from switchgear.dataplane.client import Applier, SnapshotClient
from switchgear.dataplane.events import AttemptObserver
from switchgear.dataplane.gateway import GatewayServicer
from switchgear.dataplane.invoke import Invoker
from switchgear.dataplane.router import RoundRobin
from switchgear.dataplane.snapshot import AgentSnapshot, Holder
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.v1 import discovery_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("switchgear.dataplane")

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


@dataclass(frozen=True)
class Options:
    control_planes: Sequence[str]
    listen: str = "127.0.0.1:50061"
    node_id: str = ""
    zone: str = ""


def default_node_id() -> str:
    return f"agent-{socket.gethostname()}-{os.getpid()}"


async def serve(
    options: Options, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve until `stop` is set. `on_ready` gets the listening address once the port is bound."""
    adapters = builtin_adapters()
    holder = Holder()
    pool = ClientPool()
    health_servicer = health.aio.HealthServicer()
    background: set[asyncio.Task[None]] = set()

    def applied(snapshot: AgentSnapshot) -> None:
        task = asyncio.ensure_future(_after_apply(snapshot, pool, health_servicer))
        background.add(task)
        task.add_done_callback(background.discard)

    node = discovery_pb2.Node(
        id=options.node_id or default_node_id(), zone=options.zone,
        build_version=__version__, protocols=sorted(adapters),
    )
    client = SnapshotClient(options.control_planes, node, holder, Applier(holder, adapters, applied))
    observers: list[AttemptObserver] = []  # live stats, load reports, metrics subscribe here
    invoker = Invoker(adapters, pool, SecretResolver(), RoundRobin(), observers=observers)

    server = grpc.aio.server(options=(("grpc.keepalive_permit_without_calls", 1),))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(holder, invoker), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (GATEWAY, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    for name in ("", GATEWAY):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(options.listen)
    await server.start()
    address = f"{options.listen.rsplit(':', 1)[0]}:{port}"
    log.info("agent %s listening on %s; control plane(s) %s", node.id, address, ", ".join(options.control_planes))
    if on_ready is not None:
        on_ready(address)
    subscription = asyncio.ensure_future(client.run(stop))
    try:
        await stop.wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=1.0)
        await subscription
        await pool.close()
        log.info("agent stopped")


async def _after_apply(snapshot: AgentSnapshot, pool: ClientPool, health_servicer: health.aio.HealthServicer) -> None:
    for name in ("", GATEWAY):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await pool.retain(snapshot)
