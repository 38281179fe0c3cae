"""Shared fixtures: model builders and an in-process control plane on an ephemeral port."""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from switchgear.controlplane import grpc_port, pg
from switchgear.controlplane.admin import AdminServicer
from switchgear.controlplane.agents import AgentTracker
from switchgear.controlplane.discovery import DiscoveryServicer, SnapshotFeed
from switchgear.controlplane.discovery import add_to_server as add_discovery_to_server
from switchgear.controlplane.grpc_port import GRPC_LIMITS
from switchgear.controlplane.model import Category, EndpointSpec, FallbackConfig, ServiceSpec
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore, Store
from switchgear.v1 import admin_pb2_grpc
from tests.servers import PostgresServer

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


def no_presets(registry: Registry) -> None:
    """Turn the seed's default LLM preset answer off, for tests of how a failed call fails."""
    state = registry.state
    settings = dataclasses.replace(state.settings, fallback=FallbackConfig(preset_responses=(("llm", ""),)))
    registry.replace(dataclasses.replace(state, settings=settings), "test", "no-presets")


@dataclass
class ControlPlane:
    registry: Registry
    tracker: AgentTracker
    address: str
    store: SqliteStore
    feed: SnapshotFeed | None = None


@pytest.fixture
def debounce_s() -> float:
    return 0.0


@pytest.fixture
def cp_grpc_server() -> str:
    """The `control_plane` fixture's gRPC server, the control plane's default (grpc_port.py);
    `pytest.mark.parametrize("cp_grpc_server", GRPC_SERVERS)` runs a test on each."""
    return "switchgear"


@pytest.fixture
async def control_plane(tmp_path: Path, debounce_s: float, cp_grpc_server: str) -> AsyncIterator[ControlPlane]:
    store = SqliteStore(tmp_path / "registry.db")
    registry = Registry(store)
    feed = SnapshotFeed(registry.snapshot)
    registry.subscribe(feed.publish)
    tracker = AgentTracker()
    server = grpc_port.server(cp_grpc_server, GRPC_LIMITS, ())
    add_discovery_to_server(DiscoveryServicer(feed, tracker, debounce_s=debounce_s), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(registry, tracker, {}), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield ControlPlane(registry, tracker, f"127.0.0.1:{port}", store, feed)
    finally:
        await server.stop(None)
        store.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole run (tests get a database each: `pg_dsn`)."""
    workdir = Path(tempfile.mkdtemp(prefix="switchgear-pg-"))  # not tmp_path: the postgres user must reach it
    server = PostgresServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test (dropped after it, whoever is still connected)."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_server.dsn(name)
    finally:
        with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class StoreBackend:
    """One fresh registry store of one backend. `open` gives another handle on it (its own
    connection, as a second replica or a restart would have), closed after the test; `query`
    reads it with raw SQL (the tables and columns are named alike in both backends)."""

    name: str
    factory: Callable[[Callable[[], float]], Store]
    query: Callable[[str], list[tuple[Any, ...]]]
    opened: list[Store] = field(default_factory=list)

    def open(self, clock: Callable[[], float] = time.time) -> Store:
        store = self.factory(clock)
        self.opened.append(store)
        return store


def _sqlite_query(path: Path) -> Callable[[str], list[tuple[Any, ...]]]:
    def query(sql: str) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(path)) as db:
            return db.execute(sql).fetchall()
    return query


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    if request.param == "sqlite":
        path = tmp_path / "registry.db"
        backend = StoreBackend("sqlite", lambda clock: SqliteStore(path, clock=clock), _sqlite_query(path))
        yield backend
    else:
        dsn = request.getfixturevalue("pg_dsn")
        with pg.connect(dsn) as admin:
            pg.migrate(admin)
            backend = StoreBackend("postgres", lambda clock: pg.PgStore(pg.connect(dsn), clock=clock,
                                                                        owns_connection=True),
                                   lambda sql: admin.execute(sql).fetchall())
            yield backend
    for store in backend.opened:
        store.close()


class Upstream:
    """POST /v1/chat/completions in OpenAI's shape; remembers every request's headers."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.fail_next = 0

    async def chat(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        if self.fail_next:
            self.fail_next -= 1
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)
        body = {"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
        return web.json_response(body)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    up = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield up, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
