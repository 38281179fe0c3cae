"""Control-plane process wiring: store, registry, discovery and admin on one gRPC server.

Start-up config rule: `--config FILE` is applied when its content differs from the last file
applied at start-up (the store remembers its hash). Restarting with the same file therefore
keeps changes made through the Admin API since; editing the file and restarting applies it.
An invalid file never replaces a stored registry: with a non-empty store the control plane
logs the problems and serves what it has; with an empty store it refuses to start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from switchgear.controlplane.admin import AdminServicer, config_hash
from switchgear.controlplane.agents import AgentTracker
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.discovery import DiscoveryServicer, SnapshotFeed
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.controlplane.validate import ValidationError
from switchgear.v1 import admin_pb2, admin_pb2_grpc, discovery_pb2, discovery_pb2_grpc

log = logging.getLogger("switchgear.controlplane")


#: Let agents' keepalive pings through, so a silent network loss is noticed in seconds.
SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)


class StartupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Options:
    db_path: str
    listen: str = "127.0.0.1:50051"
    config_path: str | None = None
    debounce_s: float = 0.05


def apply_startup_config(registry: Registry, path: str, env: Mapping[str, str]) -> None:
    text = Path(path).read_text(encoding="utf-8")
    digest = config_hash(text)
    if digest == registry.config_hash:
        log.info("config %s unchanged since it was last applied; serving the stored registry", path)
        return
    try:
        state = load_config(text, source=path, env=env)
        snapshot, change = registry.replace(state, "controlplane", path, config_hash=digest)
    except (ConfigError, ValidationError) as exc:
        if not registry.state.services:
            raise StartupError(f"invalid config, and no stored registry to serve:\n{exc}") from exc
        log.error("invalid config %s ignored; serving the stored registry:\n%s", path, exc)
        return
    log.info(
        "applied %s as version %s (added %d, changed %d, removed %d)",
        path, snapshot.version, len(change.added), len(change.changed), len(change.removed),
    )


async def serve(
    options: Options,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT when `stop` is None).

    `on_ready` receives the address actually listened on (the port is chosen when it is 0).
    """
    store = SqliteStore(options.db_path)
    registry = Registry(store)
    if options.config_path:
        apply_startup_config(registry, options.config_path, os.environ)
    feed = SnapshotFeed(registry.snapshot)
    registry.subscribe(feed.publish)
    tracker = AgentTracker()

    server = grpc.aio.server(options=SERVER_OPTIONS)
    discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(
        DiscoveryServicer(feed, tracker, debounce_s=options.debounce_s), server
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(registry, tracker, os.environ), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name,
        admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(options.listen)
    await server.start()
    for name in ("", *names[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{options.listen.rsplit(':', 1)[0]}:{port}"
    log.info("control plane listening on %s, serving version %s", address, registry.snapshot.version)
    if on_ready is not None:
        on_ready(address)
    try:
        await (stop or _signal_event()).wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=1.0)
        store.close()
        log.info("control plane stopped")


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
