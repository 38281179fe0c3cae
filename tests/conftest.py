"""Shared fixtures: model builders and an in-process control plane on an ephemeral port."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from switchgear.controlplane.admin import AdminServicer
from switchgear.controlplane.agents import AgentTracker
from switchgear.controlplane.discovery import DiscoveryServicer, SnapshotFeed
from switchgear.controlplane.model import Category, EndpointSpec, ServiceSpec
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.v1 import admin_pb2_grpc, discovery_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def service(name: str, *urls: str, protocol: str = "openai", options_json: str = "{}", **extra: object) -> ServiceSpec:
    urls = urls or ("http://127.0.0.1:9/v1",)
    return ServiceSpec(
        name=name,
        category=Category.LLM,
        protocol=protocol,
        endpoints=tuple(EndpointSpec(id=f"e{i}", url=u) for i, u in enumerate(urls)),
        options_json=options_json,
        **extra,  # type: ignore[arg-type]
    )


@dataclass
class ControlPlane:
    registry: Registry
    tracker: AgentTracker
    address: str
    store: SqliteStore


@pytest.fixture
def debounce_s() -> float:
    return 0.0


@pytest.fixture
async def control_plane(tmp_path: Path, debounce_s: float) -> AsyncIterator[ControlPlane]:
    store = SqliteStore(tmp_path / "registry.db")
    registry = Registry(store)
    feed = SnapshotFeed(registry.snapshot)
    registry.subscribe(feed.publish)
    tracker = AgentTracker()
    server = grpc.aio.server()
    discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(
        DiscoveryServicer(feed, tracker, debounce_s=debounce_s), server
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(registry, tracker, {}), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield ControlPlane(registry, tracker, f"127.0.0.1:{port}", store)
    finally:
        await server.stop(None)
        store.close()
