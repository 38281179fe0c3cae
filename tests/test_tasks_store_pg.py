"""The task store on both backends (TaskStore on SQLite, PgTaskStore on PostgreSQL): every
method, the same answers, and the queue order checked against the pure queue module."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchgear.controlplane import pg
from switchgear.controlplane.tasks import queue
from switchgear.controlplane.tasks.model import Resources, Task, TaskError, TaskState, Usage
from switchgear.controlplane.tasks.store import _SCHEMA, Purged, TaskStore, TaskStoreLike
from switchgear.controlplane.tasks.store_pg import PgTaskStore


@dataclass
class Backend:
    name: str
    factory: Callable[[], TaskStoreLike]
    query: Callable[[str], list[tuple[Any, ...]]]
    opened: list[TaskStoreLike] = field(default_factory=list)

    def open(self) -> TaskStoreLike:
        self.opened.append(self.factory())
        return self.opened[-1]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "tasks.db"

        def query(sql: str) -> list[tuple[Any, ...]]:
            with closing(sqlite3.connect(path)) as db, db:  # committed
                return db.execute(sql).fetchall()

        made = Backend("sqlite", lambda: TaskStore(path), query)
        yield made
    else:
        dsn = request.getfixturevalue("pg_dsn")
        with pg.connect(dsn) as admin:
            pg.migrate(admin)
            made = Backend("postgres", lambda: PgTaskStore(pg.connect(dsn), owns_connection=True),
                           lambda sql: admin.execute(sql).fetchall())
            yield made
    for store in made.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> TaskStoreLike:
    return backend.open()


def task(tid: str, priority: int = 5, at: float = 0.0, service: str = "svc", **kw: Any) -> Task:
    return Task(id=tid, tenant=kw.pop("tenant", "t"), service=service, category="llm", method="m",
                priority=priority, requirements=Resources(cpu=1.0), submitted_at=at, **kw)


FULL = Task(
    id="full", tenant="acme", service="chat", category="document", method="parse", priority=7,
    requirements=Resources(cpu=1.5, memory_bytes=2.5 * 1024**3, gpu=0.5, disk_iops=100.0, network_mbps=12.5),
    submitted_at=1_700_000_000.25, payload=b"\x00\xffpayload", payload_blob_id="sha256:ab", timeout_s=30.5,
    idempotency_key="k", request_hash="rh", max_attempts=4, origin="http", state=TaskState.FAILED, attempts=2,
    not_before=1_700_000_010.5, lease_id="L2", agent="a1", lease_expires_at=1_700_000_020.0,
    started_at=1_700_000_001.0, finished_at=1_700_000_002.0, updated_at=1_700_000_003.0, progress=0.75,
    progress_message="three quarters", result=b'{"ok": true}', endpoint="e0",
    usage=Usage(10, 20, 0.0125, True), error=TaskError("client", "bad input"),
)


def lease(t: Task, lease_id: str, agent: str = "a1", state: TaskState = TaskState.LEASED) -> Task:
    return dataclasses.replace(t, state=state, lease_id=lease_id, agent=agent, attempts=t.attempts + 1)


def test_every_field_round_trips(store: TaskStoreLike) -> None:
    assert store.insert(FULL) == (FULL, True)
    assert store.get("full") == FULL
    assert store.get("ghost") is None


def test_an_idempotency_key_is_taken_once_per_tenant(store: TaskStoreLike) -> None:
    first, created = store.insert(task("a", idempotency_key="k"))
    assert created
    again, created = store.insert(task("b", priority=9, idempotency_key="k"))
    assert (again, created) == (first, False)
    assert store.get("b") is None
    assert store.insert(task("c", idempotency_key="k", tenant="other"))[1]
    assert store.insert(task("d"))[1] and store.insert(task("e"))[1]  # no key: never a conflict


def test_racing_inserts_of_one_key_create_one_task(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    barrier = threading.Barrier(4)
    results: list[tuple[Task, bool]] = []

    def submit(i: int) -> None:
        barrier.wait()
        results.append(stores[i].insert(task(f"r{i}", idempotency_key="same")))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(created for _, created in results) == [False, False, False, True]
    assert len({t.id for t, _ in results}) == 1
    assert backend.query("SELECT COUNT(*) FROM tasks") == [(1,)]


def test_save_writes_tasks_and_attempts_in_one_go(backend: Backend, store: TaskStoreLike) -> None:
    store.insert(task("x", payload=b"p"))
    leased = lease(store.get("x") or task("?"), "L1")
    store.save([leased], attempts_started=[(leased, 10.0)])
    store.save([leased], attempts_started=[(leased, 11.0)])  # a repeated start is ignored
    assert store.get("x") == leased
    assert store.lease_known("x", "L1") and not store.lease_known("x", "L2") and not store.lease_known("y", "L1")
    done = dataclasses.replace(leased, state=TaskState.SUCCEEDED, result=b"r")
    store.save([done], attempts_ended=[(done, "L1", 12.0, "succeeded")])
    store.save([], attempts_ended=[(done, "L1", 13.0, "expired")])  # an ended attempt stays ended
    store.save([], attempts_ended=[(done, "L1", 13.5, "failed")])
    assert store.get("x") == done
    rows = backend.query("SELECT task_id, lease_id, attempt, agent, leased_at, ended_at, outcome FROM task_attempts")
    assert rows == [("x", "L1", 1, "a1", 10.0, 12.0, "succeeded")]


def test_a_late_success_replaces_only_an_expiry(backend: Backend, store: TaskStoreLike) -> None:
    """A lease the plane expired whose agent then reports success: the record says succeeded
    (the task took that success). No other end is ever rewritten."""
    store.insert(task("x"))
    first = lease(store.get("x") or task("?"), "L1")
    store.save([first], attempts_started=[(first, 10.0)])
    store.save([], attempts_ended=[(first, "L1", 20.0, "expired")])
    second = lease(first, "L2")
    store.save([second], attempts_started=[(second, 21.0)])
    store.save([], attempts_ended=[(second, "L1", 22.0, "succeeded"), (second, "L2", 22.0, "superseded")])
    store.save([], attempts_ended=[(second, "L2", 23.0, "succeeded")])  # superseded stays superseded
    store.save([], attempts_ended=[(second, "L1", 24.0, "expired")])
    rows = backend.query("SELECT lease_id, ended_at, outcome FROM task_attempts ORDER BY lease_id")
    assert rows == [("L1", 22.0, "succeeded"), ("L2", 22.0, "superseded")]


def test_leases_holdings_and_counts(store: TaskStoreLike) -> None:
    for t in (task("q1", service="a"), task("q2", service="b"), task("l1", payload=b"big"), task("r1"),
              task("o1"), task("done")):
        store.insert(t)
    one, two = lease(task("l1", payload=b"big"), "L1"), lease(task("r1"), "L2", "a2", TaskState.RUNNING)
    other = lease(task("o1"), "L3", "a1", TaskState.RUNNING)
    store.save([one, two, other, dataclasses.replace(task("done"), state=TaskState.CANCELLED)])
    assert store.queued_services() == {"a", "b"}
    assert [t.id for t in store.queued_of("a")] == ["q1"] and store.queued_of("ghost") == []
    held = sorted(store.holding("a1"), key=lambda t: t.id)
    assert [t.id for t in held] == ["l1", "o1"] and held[0].payload == b""  # light: accounting only
    assert store.in_flight() == 3
    assert sorted(t.id for t in store.leased()) == ["l1", "o1", "r1"]
    assert next(t for t in store.leased() if t.id == "l1").payload == b"big"  # whole
    assert store.counts() == {"queued": 2, "leased": 1, "running": 2, "succeeded": 0, "failed": 0,
                              "cancelled": 1, "dead_lettered": 0}


def test_list_filters_and_orders_newest_first(store: TaskStoreLike) -> None:
    for t in (task("a", at=1.0), task("b", at=3.0, service="other"), task("c", at=2.0, tenant="u"),
              task("d", at=3.0), task("e", at=4.0, state=TaskState.SUCCEEDED)):
        store.insert(t)
    assert [t.id for t in store.list([], "", "", 10)] == ["e", "b", "d", "c", "a"]
    assert [t.id for t in store.list([TaskState.QUEUED], "t", "", 10)] == ["b", "d", "a"]
    assert [t.id for t in store.list([TaskState.QUEUED, TaskState.SUCCEEDED], "", "svc", 2)] == ["e", "d"]
    assert store.list([TaskState.FAILED], "", "", 10) == []


def test_blobs_are_content_addressed_and_stored_once(backend: Backend, store: TaskStoreLike) -> None:
    data = b"\x00\x01 document bytes"
    blob_id = store.put_blob(data, "application/pdf", 5.0)
    assert blob_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.put_blob(data, "text/plain", 6.0) == blob_id
    assert store.get_blob(blob_id) == data and store.get_blob("sha256:00") is None
    # Stored once, as first uploaded; its time is the last upload's (retention counts from it).
    assert backend.query("SELECT size, content_type, created_at FROM task_blobs") == [
        (len(data), "application/pdf", 6.0)]


def test_a_blob_is_owned_by_each_tenant_that_uploaded_it(store: TaskStoreLike) -> None:
    blob_id = store.put_blob(b"{}", "application/json", 1.0, tenant="acme")
    assert store.blob_owned(blob_id, "acme")
    assert not store.blob_owned(blob_id, "globex") and not store.blob_owned(blob_id, "")
    assert store.put_blob(b"{}", "application/json", 2.0, tenant="globex") == blob_id  # same bytes, stored once
    assert store.blob_owned(blob_id, "globex") and store.blob_owned(blob_id, "acme")
    assert not store.blob_owned("sha256:00", "acme")


def test_candidates_are_ready_queued_tasks_of_the_services_best_first(store: TaskStoreLike) -> None:
    for t in (task("low-old", 1, at=0.0), task("high", 9, at=590.0), task("mid", 5, at=400.0),
              task("later", 10, at=0.0, not_before=700.0), task("elsewhere", 10, service="x"),
              task("running", 10, state=TaskState.RUNNING), task("big", 5, at=400.0, payload=b"p")):
        store.insert(t)
    # at 600 with a 60 s interval: low-old 1 + 10 = 10 (capped), high 9 + 0.17, mid and big 5 + 3.33 (then id)
    found = store.candidates(["svc"], 600.0, 60.0, 10)
    assert [t.id for t in found] == ["low-old", "high", "big", "mid"]
    assert all(t.payload == b"" for t in found)  # light
    assert [t.id for t in store.candidates(["svc"], 600.0, 0.0, 10)] == ["high", "big", "mid", "low-old"]
    assert [t.id for t in store.candidates(["x", "svc"], 600.0, 60.0, 2)] == ["elsewhere", "low-old"]
    assert store.candidates([], 600.0, 60.0, 10) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(st.integers(1, 10), st.sampled_from([0.0, 30.0, 95.5, 300.0]),
                            st.sampled_from(["svc", "other"]), st.sampled_from([0.0, 250.0])),
                  max_size=12),
    now=st.sampled_from([100.0, 299.9, 600.0]),
    aging=st.sampled_from([0.0, 7.0, 60.0]),
    limit=st.integers(1, 8),
)
def test_candidates_follow_the_queue_order(backend: Backend, rows: list[tuple[int, float, str, float]],
                                           now: float, aging: float, limit: int) -> None:
    store = backend.opened[0] if backend.opened else backend.open()
    for table in ("tasks", "task_attempts"):
        backend.query(f"DELETE FROM {table} RETURNING 1")
    # ids whose byte order differs from a linguistic one: "B" < "a" < "a-b" < "ab"
    ids = ["B", "a", "a-b", "ab", "Z", "z", "_1", "1"]
    tasks = [task(f"{ids[i % len(ids)]}{i // len(ids)}", p, at, svc, not_before=nb)
             for i, (p, at, svc, nb) in enumerate(rows)]
    for t in tasks:
        store.insert(t)
    expected = queue.ordered([t for t in tasks if t.service == "svc" and queue.ready(t, now)], now, aging)
    assert [t.id for t in store.candidates(["svc"], now, aging, limit)] == [t.id for t in expected[:limit]]


FINAL = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.DEAD_LETTERED)
UNFINISHED = (TaskState.QUEUED, TaskState.LEASED, TaskState.RUNNING)


# -- retention and the per-tenant quotas' counts (tests/test_tasks_retention.py: the rest)


def test_the_purge_deletes_exactly_the_final_tasks_finished_before_the_cutoff(
        backend: Backend, store: TaskStoreLike) -> None:
    cutoff = 1000.0
    old_final = [task(f"old-{s.value}", state=s, finished_at=cutoff - 1) for s in FINAL]
    young_final = [task(f"young-{s.value}", state=s, finished_at=cutoff + 1) for s in FINAL]
    # Unfinished ones never go, however old (a task requeued by a retry keeps finished_at 0).
    unfinished = [task(f"open-{s.value}", state=s, finished_at=0.0) for s in UNFINISHED]
    for t in [*old_final, *young_final, *unfinished]:
        store.insert(t)
    store.save([], attempts_started=[(t, 1.0) for t in [*old_final, *young_final, *unfinished]])
    store.save([], attempts_started=[(dataclasses.replace(old_final[0], lease_id="L2"), 2.0)])

    assert store.purge_tasks(cutoff, 500) == Purged(tasks=len(FINAL), attempts=len(FINAL) + 1)
    left = {r[0] for r in backend.query("SELECT id FROM tasks")}
    assert left == {t.id for t in [*young_final, *unfinished]}
    assert {r[0] for r in backend.query("SELECT task_id FROM task_attempts")} == left
    assert store.purge_tasks(cutoff, 500) == Purged()


def test_a_backlog_is_purged_in_bites_oldest_first(backend: Backend, store: TaskStoreLike) -> None:
    for i in range(7):
        store.insert(task(f"t{i}", state=TaskState.SUCCEEDED, finished_at=100.0 + i))
    bites = [store.purge_tasks(1000.0, 3).tasks for _ in range(4)]
    assert bites == [3, 3, 1, 0]
    store.insert(task("late", state=TaskState.FAILED, finished_at=50.0))
    store.insert(task("later", state=TaskState.FAILED, finished_at=60.0))
    assert store.purge_tasks(1000.0, 1).tasks == 1
    assert [r[0] for r in backend.query("SELECT id FROM tasks")] == ["later"]  # the oldest went first


def test_the_purge_keeps_every_blob_an_unfinished_task_names(backend: Backend, store: TaskStoreLike) -> None:
    ids = {name: store.put_blob(name.encode(), "application/json", 10.0, tenant="t")
           for name in ("queued", "running", "finished", "loose", "young")}
    store.put_blob(b"young", "application/json", 2000.0, tenant="u")  # uploaded again: young again
    store.insert(task("q", payload_blob_id=ids["queued"]))
    store.insert(task("r", state=TaskState.RUNNING, payload_blob_id=ids["running"]))
    store.insert(task("f", state=TaskState.SUCCEEDED, payload_blob_id=ids["finished"], finished_at=1500.0))

    purged = store.purge_blobs(1000.0, 500)
    assert (purged.blobs, purged.blob_bytes) == (2, len(b"finished") + len(b"loose"))
    assert {r[0] for r in backend.query("SELECT id FROM task_blobs")} == {ids["queued"], ids["running"], ids["young"]}
    assert {r[0] for r in backend.query("SELECT blob_id FROM task_blob_owners")} == {
        ids["queued"], ids["running"], ids["young"]}
    assert store.get_blob(ids["finished"]) is None and not store.blob_owned(ids["loose"], "t")


def test_blob_purge_takes_bites_too(store: TaskStoreLike) -> None:
    for i in range(5):
        store.put_blob(f"blob {i}".encode(), "text/plain", float(i))
    assert [store.purge_blobs(100.0, 2).blobs for _ in range(4)] == [2, 2, 1, 0]


def test_a_tenants_oldest_finished_tasks_beyond_its_newest_n_go_in_bites(
        backend: Backend, store: TaskStoreLike) -> None:
    for i in range(7):
        store.insert(task(f"a{i}", tenant="acme", state=FINAL[i % 4], finished_at=100.0 + i))
    store.insert(task("a-open", tenant="acme"))
    for i in range(2):
        store.insert(task(f"g{i}", tenant="globex", state=TaskState.SUCCEEDED, finished_at=1.0 + i))
    store.save([], attempts_started=[(task("a0", tenant="acme"), 1.0)])
    assert store.tenants_over(2) == [("acme", 7)] and store.tenants_over(7) == []
    assert store.purge_oldest_finished("acme", 2, 3) == Purged(tasks=3, attempts=1)
    assert store.purge_oldest_finished("acme", 2, 3) == Purged(tasks=2)
    assert store.purge_oldest_finished("acme", 2, 3) == Purged()
    left = {r[0] for r in backend.query("SELECT id FROM tasks")}
    assert left == {"a5", "a6", "a-open", "g0", "g1"}  # acme's newest two, its unfinished one, globex's


def test_usage_counts_each_tenants_unfinished_tasks_and_blobs(store: TaskStoreLike) -> None:
    for i, state in enumerate([*UNFINISHED, *FINAL]):
        store.insert(task(f"a{i}", tenant="acme", state=state))
    store.insert(task("g", tenant="globex"))
    assert (store.unfinished_of("acme"), store.unfinished_of("globex"), store.unfinished_of("x")) == (3, 1, 0)
    store.put_blob(b"x" * 10, "t", 1.0, tenant="acme")
    store.put_blob(b"y" * 30, "t", 1.0, tenant="acme")
    store.put_blob(b"y" * 30, "t", 1.0, tenant="globex")  # shared: counts for each owner
    store.put_blob(b"y" * 30, "t", 2.0, tenant="acme")  # again: still once
    assert (store.blob_usage("acme"), store.blob_usage("globex"), store.blob_usage("x")) == ((2, 40), (1, 30), (0, 0))


INDEXES = {"tasks_finished", "tasks_tenant", "tasks_tenant_finished", "tasks_payload_blob", "task_blobs_created",
           "task_blob_owners_tenant"}


def test_the_purge_and_quota_indexes_exist_on_both_backends(backend: Backend, store: TaskStoreLike) -> None:
    if backend.name == "sqlite":
        names = {r[0] for r in backend.query("SELECT name FROM sqlite_master WHERE type = 'index'")}
    else:
        names = {r[0] for r in backend.query("SELECT indexname FROM pg_indexes")}
    assert names >= INDEXES


def test_an_existing_sqlite_file_gains_the_indexes_and_keeps_its_tasks(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as db:  # the tables as the last release made them
        db.executescript(_SCHEMA)
    old = TaskStore(path)
    old.insert(task("kept", state=TaskState.SUCCEEDED, finished_at=5.0))
    old.close()
    with closing(sqlite3.connect(path)) as db:
        db.executescript("DROP INDEX IF EXISTS tasks_finished; DROP INDEX IF EXISTS tasks_tenant")
    reopened = TaskStore(path)
    try:
        with closing(sqlite3.connect(path)) as db:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            plan = " ".join(str(r) for r in db.execute(
                "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM tasks WHERE tenant = 'a' AND state IN ('queued')"))
        assert names >= INDEXES and "tasks_tenant" in plan
        assert reopened.get("kept") is not None
    finally:
        reopened.close()


def test_postgres_migration_4_adds_the_indexes_to_a_version_3_database(pg_dsn: str) -> None:
    with pg.connect(pg_dsn) as conn:
        pg.migrate(conn)
        for name in INDEXES:
            conn.execute(f"DROP INDEX {name}")
        conn.execute("UPDATE schema_version SET version = 3")
        assert pg.migrate(conn) == 1 and pg.SCHEMA_VERSION == 4  # one migration applied
        names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes").fetchall()}
        assert names >= INDEXES



def test_a_pg_task_store_closes_only_a_connection_it_owns(pg_dsn: str) -> None:
    conn = pg.connect(pg_dsn)
    PgTaskStore(conn).close()
    assert not conn.closed
    PgTaskStore(conn, owns_connection=True).close()
    assert conn.closed
