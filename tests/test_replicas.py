"""The parts that make replicas one control plane, on a real PostgreSQL, without processes:
registries that serialise concurrent changes and adopt each other's, the NOTIFY follower, the
leader election (and its takeover when the leader's session dies), the load-report relay and
task routing with no leader.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from switchgear.controlplane import pg
from switchgear.controlplane.agents import AgentTracker, NodeInfo
from switchgear.controlplane.leader import LeaderElection, current_leader
from switchgear.controlplane.pg import PgStore
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.replicas import FleetView, LeaderLink, RegistryFollower, ReportRelay, TasksRouter
from switchgear.v1 import loadreport_pb2, tasks_pb2, tasks_pb2_grpc
from tests.conftest import service
from tests.servers import PostgresServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def connect(pg_dsn: str) -> Iterator[Callable[[], psycopg.Connection]]:
    opened: list[psycopg.Connection] = []

    def open_one() -> psycopg.Connection:
        conn = pg.connect(pg_dsn)
        opened.append(conn)
        return conn

    pg.migrate(open_one())
    yield open_one
    for conn in opened:
        conn.close()


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_two_registries_serialise_changes_and_adopt_each_others(connect: Callable[[], psycopg.Connection]) -> None:
    a, b = Registry(PgStore(connect())), Registry(PgStore(connect()))
    assert a.snapshot.version == b.snapshot.version  # the second start found the first's version
    one = a.register(service("one"), "replica-a")
    # b has not seen `one`: its change is based on an older version, is refused by the store,
    # recomputed on what the store holds, and keeps `one` (no lost update).
    two = b.register(service("two"), "replica-b")
    assert {s.name for s in two.state.services} == {"one", "two"}
    assert two.seq == one.seq + 1
    assert a.refresh() and a.snapshot == b.snapshot
    assert not a.refresh()  # nothing newer
    versions = [e.version for e in a.audit(10) if e.action == "register_service"]
    assert versions == [two.version, one.version]


async def test_follower_adopts_a_change_from_another_replica_by_notify(
    pg_dsn: str, connect: Callable[[], psycopg.Connection]
) -> None:
    a, b = Registry(PgStore(connect())), Registry(PgStore(connect()))
    published: list[str] = []
    b.subscribe(lambda snap: published.append(snap.version))
    follower = RegistryFollower(pg_dsn, b, poll_s=30.0)  # a poll this slow cannot be what delivers it
    stop = asyncio.Event()
    running = asyncio.ensure_future(follower.run(stop))
    try:
        await asyncio.sleep(0.3)  # the listening session connects (the change must come after it)
        started = time.monotonic()
        changed = a.register(service("chat"), "replica-a")
        await until(lambda: b.snapshot.version == changed.version, 5, "the follower to adopt the change")
        took = time.monotonic() - started
    finally:
        stop.set()
        await running
    assert published == [changed.version] and took < 2.0


async def test_one_leader_and_a_takeover_when_its_session_dies(connect: Callable[[], psycopg.Connection]) -> None:
    events: list[tuple[str, str, int]] = []
    sessions: dict[str, psycopg.Connection] = {}

    def election(name: str) -> LeaderElection:
        async def elected(conn: psycopg.Connection, epoch: int) -> None:
            sessions[name] = conn
            events.append(("elected", name, epoch))

        async def deposed() -> None:
            events.append(("deposed", name, 0))

        return LeaderElection(connect, name, f"{name}:1", on_elected=elected, on_deposed=deposed, interval_s=0.05)

    first, second = election("r1"), election("r2")
    stop = asyncio.Event()
    runs = [asyncio.ensure_future(e.run(stop)) for e in (first, second)]
    try:
        await until(lambda: first.is_leader or second.is_leader, 5, "a leader")
        await asyncio.sleep(0.3)  # many rounds: still exactly one
        assert first.is_leader != second.is_leader
        leader, other = (first, second) if first.is_leader else (second, first)
        info = current_leader(connect())
        assert info is not None and (info.replica, info.epoch) == (leader.replica, leader.epoch)
        # The leader's database session dies (as when its process is killed).
        with connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (sessions[leader.replica].info.backend_pid,))
        await until(lambda: other.is_leader and not leader.is_leader, 5, "the other replica to take over")
        assert other.epoch == info.epoch + 1
        assert ("deposed", leader.replica, 0) in events
    finally:
        stop.set()
        await asyncio.gather(*runs)
    assert not first.is_leader and not second.is_leader


def test_relay_delivers_each_report_once_and_drops_stale_ones(connect: Callable[[], psycopg.Connection]) -> None:
    now = [1000.0]
    follower = ReportRelay(connect(), clock=lambda: now[0], stale_s=10.0)
    leader = ReportRelay(connect(), clock=lambda: now[0], stale_s=10.0)
    report = loadreport_pb2.StreamLoadStatsRequest(endpoint_loads=[loadreport_pb2.EndpointLoad(
        service="chat", endpoint="a", requests_issued=7, requests_succeeded=7)])
    follower.record("agent-1", report)
    follower.gone("agent-2")
    follower.flush()
    conn = connect()
    taken = leader.drain(conn)
    assert [(n, r.endpoint_loads[0].requests_issued if r else None) for n, r in taken] == [("agent-1", 7),
                                                                                          ("agent-2", None)]
    assert leader.drain(conn) == []  # taken once
    follower.record("agent-1", report)
    follower.flush()
    now[0] += 11.0  # drained too late: a delta scored as current would lie
    assert leader.drain(conn) == [] and leader.dropped_stale == 1


def test_relay_buffer_is_bounded_while_the_database_waits(connect: Callable[[], psycopg.Connection]) -> None:
    relay = ReportRelay(connect(), max_buffered=3)
    report = loadreport_pb2.StreamLoadStatsRequest()
    for _ in range(5):
        relay.record("agent-1", report)
    relay.gone("agent-1")
    assert relay.dropped_full == 3
    relay.flush()
    assert relay.relayed == 3  # the first three; room again after the flush
    relay.record("agent-1", report)
    assert relay.dropped_full == 3


async def test_a_follower_without_a_leader_answers_unavailable(connect: Callable[[], psycopg.Connection]) -> None:
    link = LeaderLink(connect(), "127.0.0.1:1")
    router = TasksRouter(link)
    server = grpc.aio.server()
    tasks_pb2_grpc.add_TasksServiceServicer_to_server(router, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await tasks_pb2_grpc.TasksServiceStub(channel).GetTask(tasks_pb2.GetTaskRequest(id="x"), timeout=5)
    finally:
        await server.stop(None)
        await link.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "no control-plane replica leads" in (
        caught.value.details() or "")


async def test_a_replica_rides_out_a_postgres_restart(postgres_server: PostgresServer, pg_dsn: str) -> None:
    keeper = pg.Keeper(pg_dsn)
    pg.migrate(keeper())
    writer, reader = Registry(PgStore(keeper)), Registry(PgStore(pg.Keeper(pg_dsn)))
    follower = RegistryFollower(pg_dsn, reader, poll_s=0.2)
    stop = asyncio.Event()
    running = asyncio.ensure_future(follower.run(stop))
    try:
        writer.register(service("before"), "op")
        await until(lambda: reader.state.service("before") is not None, 5, "the follower to see 'before'")
        postgres_server.stop()
        postgres_server.start()
        with pytest.raises(psycopg.OperationalError):  # the call that meets the broken session fails...
            writer.register(service("after"), "op")
        after = writer.register(service("after"), "op")  # ...and the next one reconnects
        await until(lambda: reader.snapshot.version == after.version, 10, "the follower to catch up after it")
    finally:
        stop.set()
        await running
        keeper.close()
    assert keeper.reconnects == 1 and {s.name for s in reader.state.services} == {"before", "after"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "--admin-token-file is required with a shared store"),
        (["--admin-token-file", "TOKEN"], "--agent-token-file is required with a shared store"),
        (["--admin-token-file", "TOKEN", "--agent-token-file", "AGENT"],
         "cannot open the shared store 127.0.0.1:1/nothing"),
    ],
)
def test_a_replica_that_cannot_share_refuses_to_start(tmp_path: Path, extra: list[str], expected: str) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    (tmp_path / "agent").write_text("a\n")
    args = [arg.replace("TOKEN", str(token)).replace("AGENT", str(tmp_path / "agent")) for arg in extra]
    done = subprocess.run(
        [sys.executable, "-m", "switchgear", "controlplane", "--store",
         "postgresql://operator:s3cret@127.0.0.1:1/nothing", "--listen", "127.0.0.1:0", *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PGCONNECT_TIMEOUT": "2"})
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert "s3cret" not in done.stderr + done.stdout  # the DSN's password never reaches a log


def test_fleet_view_lists_every_replicas_agents_and_forgets_a_dead_replica(
    connect: Callable[[], psycopg.Connection],
) -> None:
    now = [1000.0]
    trackers = {name: AgentTracker(clock=lambda: now[0]) for name in ("r1", "r2")}
    views = {name: FleetView(connect(), name, f"{name}:1", trackers[name], clock=lambda: now[0]) for name in trackers}
    trackers["r1"].connected(NodeInfo("agent-a"), "peer-a", "1.aaa")
    trackers["r2"].connected(NodeInfo("agent-b"), "peer-b", "1.aaa")
    for view in views.values():
        view.publish()
    assert [(a.node.id, a.connected, a.replica) for a in views["r1"].agents()] == [
        ("agent-a", True, "r1"), ("agent-b", True, "r2")]
    # agent-b's replica dies; agent-b comes back through r1 and is listed once, connected there.
    now[0] += 1.0
    trackers["r1"].connected(NodeInfo("agent-b"), "peer-b2", "1.aaa")
    views["r1"].publish()
    assert [(a.node.id, a.peer, a.replica) for a in views["r1"].agents()] == [
        ("agent-a", "peer-a", "r1"), ("agent-b", "peer-b2", "r1")]
    now[0] += 10.0  # r2's heartbeat is stale: its list no longer counts
    trackers["r1"].disconnected("agent-b")
    views["r1"].publish()
    assert [(a.node.id, a.connected) for a in views["r1"].agents()] == [("agent-a", True), ("agent-b", False)]
    now[0] += views["r1"].forget_s  # long gone: no longer listed by the others
    views["r1"].publish()
    third = FleetView(connect(), "r3", "r3:1", AgentTracker(clock=lambda: now[0]), clock=lambda: now[0])
    assert [a.node.id for a in third.agents()] == ["agent-a"]
