"""The control plane's event loop never waits on its store (issue 14, item 9).

A real control plane (in this process, on this test's loop) over a real PostgreSQL: another
session holds the row lock every registry commit takes (the version counter) for 5 s, and an
admin change is made meanwhile, so the registry's commit waits on that lock. While it waits,
the loop must go on serving: a loop-latency probe ticking every 10 ms, a new agent's
subscription (answered with the version already served), task heartbeats and an unrelated
read. Once the lock is released the waiting change commits and reaches the connected agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import psycopg
import pytest

from switchgear.controlplane import convert, pg
from switchgear.controlplane.offloop import Serial, call_on
from switchgear.controlplane.pg import PgStore
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.server import Options, _UsageHolder, serve
from switchgear.controlplane.store import SqliteStore
from switchgear.controlplane.tasks.store import TaskStore
from switchgear.controlplane.usage import UsageBook, UsageDelta
from switchgear.v1 import admin_pb2, admin_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from tests.conftest import service
from tests.test_discovery_stream import FakeAgent

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

LOCK_S = 5.0
#: What "keeps flowing" means here: each call answered within this, the loop never stalled longer.
ANSWER_S = 0.5
MAX_GAP_S = 0.2


@dataclass
class Plane:
    address: str
    channel: grpc.aio.Channel

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def tasks(self) -> tasks_pb2_grpc.TasksServiceStub:
        return tasks_pb2_grpc.TasksServiceStub(self.channel)


@pytest.fixture
async def plane(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Plane]:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    options = Options(db_path=str(tmp_path / "unused.db"), listen="127.0.0.1:0", store_url=pg_dsn, admin_auth=False, agent_auth=False,
                      active_probes=False, election_interval_s=0.1, replica_id="cp-under-test")
    running = asyncio.ensure_future(serve(options, stop, on_ready=ready.set_result))
    address = await asyncio.wait_for(ready, 30)
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            yield Plane(address, channel)
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)


class LoopProbe:
    """A coroutine ticking every 10 ms on the loop; `worst` is the longest gap it saw."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.worst = max(self.worst, now - last)
            last = now

    def __enter__(self) -> LoopProbe:
        self._task = asyncio.ensure_future(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


class RowLock:
    """Another session holding `SELECT ... FOR UPDATE` on the version counter's row, from a
    thread of its own (so that a loop that did block could not release it either)."""

    def __init__(self, dsn: str, hold_s: float) -> None:
        self._dsn = dsn
        self._hold_s = hold_s
        self.held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.backend_pid = 0

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn, conn.transaction():
            self.backend_pid = conn.info.backend_pid
            conn.execute("SELECT value FROM meta WHERE key = 'version_seq' FOR UPDATE")
            self.held.set()
            self._release.wait(self._hold_s)

    def start(self) -> None:
        self._thread.start()
        assert self.held.wait(10), "could not take the row lock"

    def release(self) -> None:
        self._release.set()
        self._thread.join(10)


async def timed(what: str, call: Awaitable[T]) -> T:
    started = time.monotonic()
    result = await asyncio.wait_for(call, 5)
    took = time.monotonic() - started
    assert took < ANSWER_S, f"{what} took {took:.2f} s while the store waited on a lock"
    return result


async def waiting_on_lock(dsn: str, blocker: int) -> bool:
    """Whether some session waits for a lock `blocker` holds (asked from a thread: the probe
    must not be what blocks the loop)."""
    def ask() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                               (blocker,)).fetchone()
        return bool(row and row[0])
    return await asyncio.to_thread(ask)


async def until(predicate: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def leased_task(plane: Plane) -> tasks_pb2.LeasedTask:
    """A task leased by agent-1, once this (only) replica leads."""
    async def leads() -> bool:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await plane.tasks.GetTaskStats(tasks_pb2.GetTaskStatsRequest(), timeout=2)
            return True
        return False
    await until(leads, "the replica to lead")
    await plane.tasks.SubmitTask(tasks_pb2.SubmitTaskRequest(service="chat", method="chat.completions",
                                                             payload=b'{"messages": []}'))
    leased = await plane.tasks.LeaseTasks(tasks_pb2.LeaseTasksRequest(agent="agent-1", capacity=1, services=["chat"],
                                                                      max_tasks=1))
    (lease,) = leased.leases
    return lease


async def test_a_commit_waiting_on_a_row_lock_stalls_neither_streams_nor_heartbeats(
    plane: Plane, pg_dsn: str
) -> None:
    registered = await plane.admin.RegisterService(admin_pb2.RegisterServiceRequest(
        service=convert.service_to_proto(service("chat", "http://127.0.0.1:9/v1"))))
    served = registered.version
    lease = await leased_task(plane)
    connected = FakeAgent(plane.channel, "connected")
    await connected.hello()
    first = await connected.read()
    assert first.version_info == served
    await connected.ack(first)

    lock = RowLock(pg_dsn, LOCK_S)
    with LoopProbe() as probe:
        lock.start()
        started = time.monotonic()
        # An admin change: its commit needs the locked row, so it waits (on the store's thread).
        change = asyncio.ensure_future(plane.admin.RegisterService(admin_pb2.RegisterServiceRequest(
            service=convert.service_to_proto(service("later", "http://127.0.0.1:10/v1"))), timeout=30))
        await until(lambda: waiting_on_lock(pg_dsn, lock.backend_pid), "the commit to wait on the row lock", 4.0)
        assert not change.done()

        # While it waits: a new agent subscribes and is served the current version at once ...
        newcomer = FakeAgent(plane.channel, "newcomer")
        await newcomer.hello()
        pushed = await timed("a snapshot push to a new subscriber", newcomer.read())
        assert probe.worst < MAX_GAP_S, f"the event loop stalled {probe.worst:.2f} s"
        assert pushed.version_info == served
        # ... reads that need no store answer ...
        agents = await timed("ListAgents", plane.admin.ListAgents(admin_pb2.ListAgentsRequest()))
        assert agents.current_version == served
        # ... and the agent's task heartbeats keep flowing, every one, until the lock is gone.
        beats = 0
        while time.monotonic() - started < LOCK_S - 1.0:
            beat = await timed("a task heartbeat", plane.tasks.HeartbeatTask(tasks_pb2.HeartbeatTaskRequest(
                task_id=lease.task.id, lease_id=lease.lease_id, progress=beats / 100)))
            assert beat.lease_valid
            beats += 1
            await asyncio.sleep(0.1)
        assert beats >= 10
        assert not change.done(), "the change committed while the row was locked"
        assert probe.worst < MAX_GAP_S, f"the event loop stalled {probe.worst:.2f} s"

        lock.release()
        # The change that waited commits, in order, and reaches the connected agent.
        later = await asyncio.wait_for(change, 10)
        assert later.version != served and later.version.split(".")[0] == str(int(served.split(".")[0]) + 1)
        update = await connected.read()
        assert update.version_info == later.version
        assert {s.name for s in update.snapshot.services} == {"chat", "later"}
    assert probe.worst < MAX_GAP_S, f"the event loop stalled {probe.worst:.2f} s"
    await connected.call.done_writing()
    await newcomer.call.done_writing()


# -- the building blocks ------------------------------------------------------------------------


async def test_a_serial_runs_calls_in_order_on_one_thread_off_the_loop() -> None:
    serial = Serial("test")
    seen: list[tuple[int, int]] = []
    loop_thread = threading.get_ident()

    def record(i: int) -> int:
        time.sleep(0.002 * (5 - i))  # earlier calls are slower: order must still hold
        seen.append((i, threading.get_ident()))
        return i

    try:
        assert await asyncio.gather(*(serial.run(record, i) for i in range(5))) == [0, 1, 2, 3, 4]
        assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
        threads = {t for _, t in seen}
        assert len(threads) == 1 and loop_thread not in threads
        with pytest.raises(ZeroDivisionError):
            await serial.run(lambda: 1 / 0)
    finally:
        serial.close()


async def test_call_on_hands_work_to_the_loop_in_order() -> None:
    loop = asyncio.get_running_loop()
    got: list[tuple[int, bool]] = []
    done = asyncio.Event()

    def note(i: int) -> None:
        got.append((i, threading.get_ident() == loop_thread))
        if i == 9:
            done.set()

    loop_thread = threading.get_ident()

    def from_thread() -> None:
        for i in range(10):
            call_on(loop, note, i)

    await asyncio.to_thread(from_thread)
    await asyncio.wait_for(done.wait(), 5)
    assert got == [(i, True) for i in range(10)]
    call_on(loop, note, 10)  # on the loop's own thread: at once
    assert got[-1] == (10, True)



async def test_the_sqlite_stores_threads_wait_for_each_other_instead_of_failing(tmp_path: Path) -> None:
    """The registry store and the task store write one SQLite file, each from its own thread:
    a commit that meets the other's write transaction waits for it (sqlite3's busy timeout,
    5 s by default) instead of failing with "database is locked", which could not happen when
    both ran on the loop."""
    path = tmp_path / "cp.db"
    store, tasks = SqliteStore(path), TaskStore(path)
    registry = Registry(store)
    in_write = threading.Event()

    def long_task_write() -> None:
        with tasks._db.transaction() as db:  # what a lease or a completion holds, made slow
            db.execute("DELETE FROM task_blobs WHERE id = 'none'")
            in_write.set()
            time.sleep(0.3)

    try:
        writing = asyncio.ensure_future(tasks.serial.run(long_task_write))
        await asyncio.to_thread(in_write.wait, 5)
        snapshot = await registry.call(lambda: registry.register(service("chat"), "test"))
        await writing
        assert snapshot.state.service("chat") is not None and store.load().seq == snapshot.seq
    finally:
        await store.serial.run(store.close)
        await tasks.serial.run(tasks.close)
        store.serial.close()
        tasks.serial.close()


async def test_usage_saves_never_wait_on_a_locked_usage_row_and_coalesce(pg_dsn: str) -> None:
    """The usage book is saved behind the store's other calls, without the loop waiting: with
    its row locked by another session, 200 load reports' usage is booked at once, at most one
    save waits (one row per tenant), and the last book is what is stored once the lock goes."""
    keeper = pg.Keeper(pg_dsn)
    pg.migrate(keeper())
    store = PgStore(keeper)
    seed = UsageBook()
    seed.add(UsageDelta("t1"), time.time())
    store.save_usage({"t1": seed.dump("t1")})  # the row exists, so that it can be locked
    holder = _UsageHolder(store, live=True)
    release = threading.Event()
    locked = threading.Event()

    def hold_row() -> None:
        with psycopg.connect(pg_dsn, autocommit=True) as conn, conn.transaction():
            conn.execute("SELECT body FROM tenant_usage WHERE tenant = 't1' FOR UPDATE")
            locked.set()
            release.wait(LOCK_S)

    holder_thread = threading.Thread(target=hold_row, daemon=True)
    holder_thread.start()
    try:
        assert await asyncio.to_thread(locked.wait, 10)
        with LoopProbe() as probe:
            for _ in range(200):
                started = time.monotonic()
                holder.add([UsageDelta("t1", requests=1, tokens=10)])
                assert time.monotonic() - started < 0.05, "booking usage waited on the store"
                await asyncio.sleep(0.002)
            assert len(holder._unsaved) <= 1  # coalesced: one pending row for the one tenant
            assert probe.worst < MAX_GAP_S, f"the event loop stalled {probe.worst:.2f} s"
        release.set()
        await asyncio.to_thread(holder_thread.join, 10)
        await store.serial.run(lambda: None)  # every save queued before this has run
        stored = await store.serial.run(store.load_usage)
        assert stored["t1"] == holder.book.dump("t1") and json.loads(stored["t1"])["requests"] == 200
    finally:
        release.set()
        await store.serial.run(keeper.close)
        store.serial.close()
