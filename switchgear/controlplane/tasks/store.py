"""Tasks, their attempts and uploaded blobs: the task store's queries, and its tables in the
control plane's SQLite file (PostgreSQL: store_pg.py, on the tables pg.py creates).

SqlTaskStore runs every query on a Db (sql.py); TaskStore is it on SQLite, PgTaskStore on
PostgreSQL. Rows are encoded and decoded by the same functions, so a task reads back the same
from either backend.

Threading: a task store is used from its `serial` (offloop.Serial: one thread, calls in order),
which the scheduler submits every call to from the event loop; see offloop.py.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from switchgear.controlplane.offloop import Serial
from switchgear.controlplane.sql import Db, Dialect, SqliteDb, marks
from switchgear.controlplane.tasks.model import Resources, Task, TaskError, TaskState, Usage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, service TEXT NOT NULL, category TEXT NOT NULL,
    method TEXT NOT NULL, priority INTEGER NOT NULL,
    req_cpu REAL NOT NULL, req_memory REAL NOT NULL, req_gpu REAL NOT NULL, req_iops REAL NOT NULL,
    req_mbps REAL NOT NULL, submitted_at REAL NOT NULL, payload BLOB NOT NULL, payload_blob_id TEXT NOT NULL,
    timeout_s REAL NOT NULL, idempotency_key TEXT NOT NULL, request_hash TEXT NOT NULL,
    max_attempts INTEGER NOT NULL, origin TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    not_before REAL NOT NULL, lease_id TEXT NOT NULL, agent TEXT NOT NULL, lease_expires_at REAL NOT NULL,
    started_at REAL NOT NULL, finished_at REAL NOT NULL, updated_at REAL NOT NULL, progress REAL NOT NULL,
    progress_message TEXT NOT NULL, result BLOB NOT NULL, endpoint TEXT NOT NULL, usage TEXT NOT NULL,
    error_kind TEXT NOT NULL, error_message TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks(tenant, idempotency_key) WHERE idempotency_key != '';
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks(state, service, not_before);
CREATE INDEX IF NOT EXISTS tasks_agent ON tasks(agent, state);
CREATE TABLE IF NOT EXISTS task_attempts (
    task_id TEXT NOT NULL, lease_id TEXT NOT NULL, attempt INTEGER NOT NULL, agent TEXT NOT NULL,
    leased_at REAL NOT NULL, ended_at REAL NOT NULL DEFAULT 0, outcome TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (task_id, lease_id));
CREATE TABLE IF NOT EXISTS task_blobs (
    id TEXT PRIMARY KEY, size INTEGER NOT NULL, content_type TEXT NOT NULL, data BLOB NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS task_blob_owners (
    blob_id TEXT NOT NULL, tenant TEXT NOT NULL, PRIMARY KEY (blob_id, tenant));
"""
_FINAL = "('succeeded', 'failed', 'cancelled', 'dead_lettered')"
#: Indexes for the purge and the per-tenant quotas (pg.py's migration 4 makes the same);
#: CREATE ... IF NOT EXISTS, so an existing file gains them when it is next opened. The purge's
#: is partial over final states (the purge's own WHERE, written the same): an index on (state,
#: finished_at) cannot give four states' rows in finished_at order, and PostgreSQL scanned the
#: whole table for every bite instead (bench/taskstore).
_INDEXES = f"""
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_at) WHERE state IN {_FINAL};
CREATE INDEX IF NOT EXISTS tasks_tenant ON tasks(tenant, state);
CREATE INDEX IF NOT EXISTS tasks_tenant_finished ON tasks(tenant, finished_at) WHERE state IN {_FINAL};
CREATE INDEX IF NOT EXISTS tasks_payload_blob ON tasks(payload_blob_id) WHERE payload_blob_id <> '';
CREATE INDEX IF NOT EXISTS task_blobs_created ON task_blobs(created_at);
CREATE INDEX IF NOT EXISTS task_blob_owners_tenant ON task_blob_owners(tenant);
"""
_UNFINISHED = "('queued', 'leased', 'running')"

_COLUMNS = (
    "id", "tenant", "service", "category", "method", "priority", "req_cpu", "req_memory", "req_gpu", "req_iops",
    "req_mbps", "submitted_at", "payload", "payload_blob_id", "timeout_s", "idempotency_key", "request_hash",
    "max_attempts", "origin", "state", "attempts", "not_before", "lease_id", "agent", "lease_expires_at",
    "started_at", "finished_at", "updated_at", "progress", "progress_message", "result", "endpoint", "usage",
    "error_kind", "error_message",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM tasks"
#: Idempotent through the unique (tenant, idempotency_key) index: a row whose key is taken is
#: not inserted (0 rows), while any other conflict (a task id taken) still raises.
_INSERT = (
    f"INSERT INTO tasks({', '.join(_COLUMNS)}) VALUES ({marks(_COLUMNS)}) "
    "ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key <> '' DO NOTHING"
)
_UPDATE = f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in _COLUMNS[1:])} WHERE id = ?"


def _select_light(dialect: Dialect) -> str:
    """_SELECT without the payload and result, which may be large: for deciding, never for saving."""
    columns = (dialect.empty_blob if c in ("payload", "result") else c for c in _COLUMNS)
    return f"SELECT {', '.join(columns)} FROM tasks"


def blob_id_of(data: bytes) -> str:
    """A blob's id: blobs are content-addressed."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Purged:
    """Rows one purge deleted: tasks, their attempt rows, blobs and the blobs' bytes."""

    tasks: int = 0
    attempts: int = 0
    blobs: int = 0
    blob_bytes: int = 0

    def __add__(self, other: Purged) -> Purged:
        return Purged(self.tasks + other.tasks, self.attempts + other.attempts, self.blobs + other.blobs,
                      self.blob_bytes + other.blob_bytes)


def _row(t: Task) -> tuple[Any, ...]:
    r = t.requirements
    usage = orjson.dumps([t.usage.input_tokens, t.usage.output_tokens, t.usage.cost_usd, t.usage.estimated])
    return (
        t.id, t.tenant, t.service, t.category, t.method, t.priority, r.cpu, r.memory_bytes, r.gpu, r.disk_iops,
        r.network_mbps, t.submitted_at, t.payload, t.payload_blob_id, t.timeout_s, t.idempotency_key,
        t.request_hash, t.max_attempts, t.origin, t.state.value, t.attempts, t.not_before, t.lease_id, t.agent,
        t.lease_expires_at, t.started_at, t.finished_at, t.updated_at, t.progress, t.progress_message, t.result,
        t.endpoint, usage.decode(), t.error.kind if t.error else "", t.error.message if t.error else "",
    )


def _task(row: Sequence[Any]) -> Task:
    v = dict(zip(_COLUMNS, row, strict=True))
    tokens_in, tokens_out, cost, estimated = orjson.loads(v["usage"])
    return Task(
        id=v["id"], tenant=v["tenant"], service=v["service"], category=v["category"], method=v["method"],
        priority=v["priority"],
        requirements=Resources(v["req_cpu"], v["req_memory"], v["req_gpu"], v["req_iops"], v["req_mbps"]),
        submitted_at=v["submitted_at"], payload=bytes(v["payload"]), payload_blob_id=v["payload_blob_id"],
        timeout_s=v["timeout_s"], idempotency_key=v["idempotency_key"], request_hash=v["request_hash"],
        max_attempts=v["max_attempts"], origin=v["origin"], state=TaskState(v["state"]), attempts=v["attempts"],
        not_before=v["not_before"], lease_id=v["lease_id"], agent=v["agent"],
        lease_expires_at=v["lease_expires_at"], started_at=v["started_at"], finished_at=v["finished_at"],
        updated_at=v["updated_at"], progress=v["progress"], progress_message=v["progress_message"],
        result=bytes(v["result"]), endpoint=v["endpoint"],
        usage=Usage(int(tokens_in), int(tokens_out), float(cost), bool(estimated)),
        error=TaskError(v["error_kind"], v["error_message"]) if v["error_kind"] else None,
    )


class TaskStoreLike(Protocol):
    """What the scheduler needs of a task store: TaskStore (SQLite) and PgTaskStore (PostgreSQL)."""

    #: The one thread its calls run on; `owns_serial`: whether closing the store ends it too.
    serial: Serial
    owns_serial: bool

    def close(self) -> None: ...

    def insert(self, task: Task) -> tuple[Task, bool]: ...

    def get(self, task_id: str) -> Task | None: ...

    def save(self, tasks: Iterable[Task], attempts_started: Iterable[tuple[Task, float]] = (),
             attempts_ended: Iterable[tuple[Task, str, float, str]] = ()) -> None: ...

    def lease_known(self, task_id: str, lease_id: str) -> bool: ...

    def candidates(self, services: Iterable[str], now: float, aging_interval_s: float, limit: int) -> list[Task]: ...

    def queued_services(self) -> set[str]: ...

    def queued_of(self, service: str) -> list[Task]: ...

    def holding(self, agent: str) -> list[Task]: ...

    def in_flight(self) -> int: ...

    def leased(self) -> list[Task]: ...

    def list(self, states: Sequence[TaskState], tenant: str, service: str, limit: int) -> list[Task]: ...

    def counts(self) -> dict[str, int]: ...

    def put_blob(self, data: bytes, content_type: str, now: float, tenant: str = "") -> str: ...

    def get_blob(self, blob_id: str) -> bytes | None: ...

    def blob_owned(self, blob_id: str, tenant: str) -> bool: ...

    def by_idempotency_key(self, tenant: str, key: str) -> Task | None: ...

    def unfinished_of(self, tenant: str) -> int: ...

    def blob_usage(self, tenant: str) -> tuple[int, int]: ...

    def purge_tasks(self, finished_before: float, limit: int) -> Purged: ...

    def purge_blobs(self, uploaded_before: float, limit: int) -> Purged: ...

    def tenants_over(self, keep: int) -> Sequence[tuple[str, int]]: ...

    def purge_oldest_finished(self, tenant: str, keep: int, limit: int) -> Purged: ...


class SqlTaskStore:
    """TaskStoreLike on a Db whose task tables exist. Every mutating method is one transaction.

    Ownership: close() closes the connection only when `owns_connection`. Not thread-safe: use
    it from `serial` — its own, or the one its connection's other user runs on (the leader's
    election session).
    """

    def __init__(self, db: Db, *, owns_connection: bool, serial: Serial | None = None) -> None:
        self._db = db
        self._owns_connection = owns_connection
        self.serial = serial or Serial(type(self).__name__)
        self.owns_serial = serial is None
        self._select_light = _select_light(db.dialect)

    def close(self) -> None:
        if self._owns_connection:
            self._db.close()

    # -- tasks

    def insert(self, task: Task) -> tuple[Task, bool]:
        """Insert `task`, or return the task already holding its (tenant, idempotency key).

        The unique index decides rather than a read-then-write, so this holds even when two
        replicas insert the same key at once."""
        with self._db.transaction() as db:
            if db.execute(_INSERT, _row(task)):
                return task, True
            # The key is taken: the conflicting row is committed (PostgreSQL's ON CONFLICT waited
            # for it; on SQLite no other writer runs inside BEGIN IMMEDIATE).
            found = db.one(f"{_SELECT} WHERE tenant = ? AND idempotency_key = ?", (task.tenant, task.idempotency_key))
        assert found is not None
        return _task(found), False

    def get(self, task_id: str) -> Task | None:
        row = self._db.one(f"{_SELECT} WHERE id = ?", (task_id,))
        return None if row is None else _task(row)

    def save(self, tasks: Iterable[Task], attempts_started: Iterable[tuple[Task, float]] = (),
             attempts_ended: Iterable[tuple[Task, str, float, str]] = ()) -> None:
        """Write tasks and attempt records in one transaction.

        `attempts_started`: (leased task, at); `attempts_ended`: (task, lease id, at, outcome).
        An ended attempt stays ended, but for one case: a success reported under a lease this
        plane had expired replaces the "expired" end (the expiry was the plane's inference from
        silence, for instance while no replica led; the success is what happened, and the task
        took it, so its record says so).
        """
        with self._db.transaction() as db:
            db.executemany(_UPDATE, [(*row[1:], row[0]) for row in map(_row, tasks)])
            db.executemany(
                "INSERT INTO task_attempts(task_id, lease_id, attempt, agent, leased_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(t.id, t.lease_id, t.attempts, t.agent, at) for t, at in attempts_started],
            )
            db.executemany(
                "UPDATE task_attempts SET ended_at = ?, outcome = ? "
                "WHERE task_id = ? AND lease_id = ? AND (ended_at = 0 OR outcome = ?)",
                [(at, outcome, t.id, lease_id, "expired" if outcome == "succeeded" else "")
                 for t, lease_id, at, outcome in attempts_ended],
            )

    def lease_known(self, task_id: str, lease_id: str) -> bool:
        row = self._db.one("SELECT 1 FROM task_attempts WHERE task_id = ? AND lease_id = ?", (task_id, lease_id))
        return row is not None

    def candidates(self, services: Iterable[str], now: float, aging_interval_s: float, limit: int) -> list[Task]:
        """Ready queued tasks of `services`, best first by the queue's order (queue.order_key).

        Loaded without payload and result: load a chosen one with `get` before changing it."""
        names = sorted(services)
        if not names:
            return []
        aged, aging = "priority", tuple[float, ...]()
        if aging_interval_s > 0:
            least, greatest = self._db.dialect.least, self._db.dialect.greatest
            aged, aging = f"{least}(10.0, priority + {greatest}(0.0, ? - submitted_at) / ?)", (now, aging_interval_s)
        rows = self._db.all(
            f"{self._select_light} WHERE state = 'queued' AND not_before <= ? AND service IN ({marks(names)}) "
            f"ORDER BY {aged} DESC, submitted_at, id LIMIT ?",
            (now, *names, *aging, limit),
        )
        return [_task(r) for r in rows]

    def queued_services(self) -> set[str]:
        return {str(r[0]) for r in self._db.all("SELECT DISTINCT service FROM tasks WHERE state = 'queued'")}

    def queued_of(self, service: str) -> list[Task]:
        return [_task(r) for r in self._db.all(f"{_SELECT} WHERE state = 'queued' AND service = ?", (service,))]

    def holding(self, agent: str) -> list[Task]:
        """Tasks `agent` holds a lease on (loaded light: for accounting only)."""
        rows = self._db.all(f"{self._select_light} WHERE agent = ? AND state IN ('leased', 'running')", (agent,))
        return [_task(r) for r in rows]

    def in_flight(self) -> int:
        row = self._db.one("SELECT COUNT(*) FROM tasks WHERE state IN ('leased', 'running')")
        return int(row[0]) if row else 0

    def leased(self) -> list[Task]:
        return [_task(r) for r in self._db.all(f"{_SELECT} WHERE state IN ('leased', 'running')")]

    def list(self, states: Sequence[TaskState], tenant: str, service: str, limit: int) -> list[Task]:
        where, args = ["1 = 1"], list[object]()
        if states:
            where.append(f"state IN ({marks(states)})")
            args += [s.value for s in states]
        if tenant:
            where.append("tenant = ?")
            args.append(tenant)
        if service:
            where.append("service = ?")
            args.append(service)
        rows = self._db.all(f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY submitted_at DESC, id LIMIT ?",
                            (*args, limit))
        return [_task(r) for r in rows]

    def by_idempotency_key(self, tenant: str, key: str) -> Task | None:
        row = self._db.one(f"{self._select_light} WHERE tenant = ? AND idempotency_key = ?", (tenant, key))
        return None if row is None else _task(row)

    def unfinished_of(self, tenant: str) -> int:
        """`tenant`'s queued, leased and running tasks (index tasks_tenant)."""
        row = self._db.one(f"SELECT COUNT(*) FROM tasks WHERE tenant = ? AND state IN {_UNFINISHED}", (tenant,))
        return int(row[0]) if row else 0

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = dict(self._db.all("SELECT state, COUNT(*) FROM tasks GROUP BY state"))
        return {s.value: int(found.get(s.value, 0)) for s in TaskState}

    # -- blobs

    def put_blob(self, data: bytes, content_type: str, now: float, tenant: str = "") -> str:
        """Store `data` (once: blobs are content-addressed) and record that `tenant` uploaded it
        ("" = an operator): the tenant's tasks may then name it (`blob_owned`). Uploading stored
        content again makes it new for retention (`created_at` is its last upload)."""
        blob_id = blob_id_of(data)
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO task_blobs(id, size, content_type, data, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET created_at = excluded.created_at",
                (blob_id, len(data), content_type, data, now),
            )
            db.execute("INSERT INTO task_blob_owners(blob_id, tenant) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (blob_id, tenant))
        return blob_id

    def blob_owned(self, blob_id: str, tenant: str) -> bool:
        """Whether `tenant` uploaded the blob `blob_id` (identical content uploaded by several
        tenants is stored once and owned by each)."""
        row = self._db.one("SELECT 1 FROM task_blob_owners WHERE blob_id = ? AND tenant = ?", (blob_id, tenant))
        return row is not None

    def get_blob(self, blob_id: str) -> bytes | None:
        row = self._db.one("SELECT data FROM task_blobs WHERE id = ?", (blob_id,))
        return None if row is None else bytes(row[0])

    def blob_usage(self, tenant: str) -> tuple[int, int]:
        """(blobs, bytes) `tenant` uploaded: a blob several tenants uploaded counts for each."""
        row = self._db.one(
            "SELECT COUNT(*), COALESCE(SUM(b.size), 0) FROM task_blob_owners o "
            "JOIN task_blobs b ON b.id = o.blob_id WHERE o.tenant = ?", (tenant,))
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # -- retention

    def purge_tasks(self, finished_before: float, limit: int) -> Purged:
        """Delete up to `limit` final tasks that finished before `finished_before`, oldest first,
        with their attempt rows: one transaction, so a backlog is taken in bounded bites."""
        with self._db.transaction() as db:
            ids = [str(r[0]) for r in db.all(
                f"SELECT id FROM tasks WHERE state IN {_FINAL} AND finished_at < ? ORDER BY finished_at LIMIT ?",
                (finished_before, limit))]
            return self._delete_tasks(db, ids)

    @staticmethod
    def _delete_tasks(db: Db, ids: Sequence[str]) -> Purged:
        if not ids:
            return Purged()
        attempts = db.execute(f"DELETE FROM task_attempts WHERE task_id IN ({marks(ids)})", ids)
        tasks = db.execute(f"DELETE FROM tasks WHERE id IN ({marks(ids)})", ids)
        return Purged(tasks=tasks, attempts=attempts)

    def tenants_over(self, keep: int) -> Sequence[tuple[str, int]]:
        """(tenant, finished tasks) of each tenant with more than `keep` finished tasks."""
        rows = self._db.all(f"SELECT tenant, COUNT(*) FROM tasks WHERE state IN {_FINAL} GROUP BY tenant "
                            "HAVING COUNT(*) > ? ORDER BY tenant", (keep,))
        return [(str(r[0]), int(r[1])) for r in rows]

    def purge_oldest_finished(self, tenant: str, keep: int, limit: int) -> Purged:
        """Delete up to `limit` of `tenant`'s finished tasks beyond its newest `keep`, oldest
        first, with their attempt rows (one transaction)."""
        where = f"FROM tasks WHERE tenant = ? AND state IN {_FINAL}"
        with self._db.transaction() as db:
            row = db.one(f"SELECT COUNT(*) {where}", (tenant,))
            excess = min(limit, int(row[0]) - keep) if row else 0
            if excess <= 0:
                return Purged()
            ids = [str(r[0]) for r in db.all(f"SELECT id {where} ORDER BY finished_at, id LIMIT ?", (tenant, excess))]
            return self._delete_tasks(db, ids)

    def purge_blobs(self, uploaded_before: float, limit: int) -> Purged:
        """Delete up to `limit` blobs last uploaded before `uploaded_before` that no unfinished
        task names (a final task's payload is never read again), with their owner rows."""
        with self._db.transaction() as db:
            rows = db.all(
                "SELECT b.id, b.size FROM task_blobs b WHERE b.created_at < ? AND NOT EXISTS ("
                "SELECT 1 FROM tasks t WHERE t.payload_blob_id = b.id AND t.payload_blob_id <> '' "
                f"AND t.state IN {_UNFINISHED}) "
                "ORDER BY b.created_at LIMIT ?", (uploaded_before, limit))
            ids = [str(r[0]) for r in rows]
            if not ids:
                return Purged()
            db.execute(f"DELETE FROM task_blob_owners WHERE blob_id IN ({marks(ids)})", ids)
            blobs = db.execute(f"DELETE FROM task_blobs WHERE id IN ({marks(ids)})", ids)
        return Purged(blobs=blobs, blob_bytes=sum(int(r[1]) for r in rows))


class TaskStore(SqlTaskStore):
    """SqlTaskStore on a second connection to the registry's SQLite file (WAL mode), so the task
    tables live and move with the rest of the control plane's state without the registry's
    store knowing them. Creates its tables; close() closes its connection."""

    def __init__(self, path: str | Path) -> None:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA + _INDEXES)
        super().__init__(SqliteDb(db), owns_connection=True)
