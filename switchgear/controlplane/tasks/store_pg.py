"""Tasks, their attempts and uploaded blobs in PostgreSQL, for control-plane replicas.

The same interface and semantics as store.py's TaskStore (TaskStoreLike), on the tables
`pg.migrate` creates; rows are encoded and decoded by the same functions, so a task reads back
the same from either backend. Every mutating method is one transaction. Idempotent submission
relies on the unique (tenant, idempotency_key) index rather than a read-then-write, so it
holds even when two replicas insert the same key at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from switchgear.controlplane.pg import Connection
from switchgear.controlplane.tasks.model import Task, TaskState
from switchgear.controlplane.tasks.store import _COLUMNS, _row, _task

_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM tasks"
#: Without the payload and result, which may be large: for deciding, never for saving.
_LIGHT_COLUMNS = tuple("''::bytea" if c in ("payload", "result") else c for c in _COLUMNS)
_SELECT_LIGHT = f"SELECT {', '.join(_LIGHT_COLUMNS)} FROM tasks"
_INSERT = (
    f"INSERT INTO tasks({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
    "ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key <> '' DO NOTHING RETURNING id"
)
_UPDATE = f"UPDATE tasks SET {', '.join(f'{c} = %s' for c in _COLUMNS[1:])} WHERE id = %s"


class PgTaskStore:
    """TaskStoreLike on a psycopg connection whose schema `pg.migrate` has already created
    (the constructor never migrates: the process does that once).

    Ownership: `conn` stays the caller's unless `owns_connection`; `close()` closes only a
    connection it owns. Not thread-safe: use it from the control plane's event loop.
    """

    def __init__(self, conn: Connection, *, owns_connection: bool = False) -> None:
        self._conn = conn
        self._owns_connection = owns_connection

    def close(self) -> None:
        if self._owns_connection:
            self._conn.close()

    # -- tasks

    def insert(self, task: Task) -> tuple[Task, bool]:
        """Insert `task`, or return the task already holding its (tenant, idempotency key)."""
        with self._conn.transaction():
            if self._conn.execute(_INSERT, _row(task)).fetchone() is not None:
                return task, True
            # The key is taken: the conflicting row is committed (ON CONFLICT waited for it).
            found = self._conn.execute(f"{_SELECT} WHERE tenant = %s AND idempotency_key = %s",
                                       (task.tenant, task.idempotency_key)).fetchone()
        assert found is not None
        return _task(found), False

    def get(self, task_id: str) -> Task | None:
        row = self._conn.execute(f"{_SELECT} WHERE id = %s", (task_id,)).fetchone()
        return None if row is None else _task(row)

    def save(self, tasks: Iterable[Task], attempts_started: Iterable[tuple[Task, float]] = (),
             attempts_ended: Iterable[tuple[Task, str, float, str]] = ()) -> None:
        """Write tasks and attempt records in one transaction.

        `attempts_started`: (leased task, at); `attempts_ended`: (task, lease id, at, outcome).
        """
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.executemany(_UPDATE, [(*row[1:], row[0]) for row in map(_row, tasks)])
            cur.executemany(
                "INSERT INTO task_attempts(task_id, lease_id, attempt, agent, leased_at) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(t.id, t.lease_id, t.attempts, t.agent, at) for t, at in attempts_started],
            )
            cur.executemany(
                "UPDATE task_attempts SET ended_at = %s, outcome = %s "
                "WHERE task_id = %s AND lease_id = %s AND ended_at = 0",
                [(at, outcome, t.id, lease_id) for t, lease_id, at, outcome in attempts_ended],
            )

    def lease_known(self, task_id: str, lease_id: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM task_attempts WHERE task_id = %s AND lease_id = %s",
                                 (task_id, lease_id)).fetchone()
        return row is not None

    def candidates(self, services: Iterable[str], now: float, aging_interval_s: float, limit: int) -> list[Task]:
        """Ready queued tasks of `services`, best first by the queue's order (queue.order_key).

        Loaded without payload and result: load a chosen one with `get` before changing it."""
        names = sorted(services)
        if not names:
            return []
        aged, aging = "priority", tuple[float, ...]()
        if aging_interval_s > 0:  # the same formula as TaskStore's, in PostgreSQL's spelling
            aged, aging = "LEAST(10.0, priority + GREATEST(0.0, %s - submitted_at) / %s)", (now, aging_interval_s)
        rows = self._conn.execute(
            f"{_SELECT_LIGHT} WHERE state = 'queued' AND not_before <= %s AND service = ANY(%s) "
            f"ORDER BY {aged} DESC, submitted_at, id LIMIT %s",
            (now, names, *aging, limit),
        )
        return [_task(r) for r in rows]

    def queued_services(self) -> set[str]:
        return {str(r[0]) for r in self._conn.execute("SELECT DISTINCT service FROM tasks WHERE state = 'queued'")}

    def queued_of(self, service: str) -> list[Task]:
        return [_task(r) for r in self._conn.execute(f"{_SELECT} WHERE state = 'queued' AND service = %s", (service,))]

    def holding(self, agent: str) -> list[Task]:
        """Tasks `agent` holds a lease on (loaded light: for accounting only)."""
        rows = self._conn.execute(f"{_SELECT_LIGHT} WHERE agent = %s AND state IN ('leased', 'running')", (agent,))
        return [_task(r) for r in rows]

    def in_flight(self) -> int:
        row = self._conn.execute("SELECT COUNT(*) FROM tasks WHERE state IN ('leased', 'running')").fetchone()
        return int(row[0]) if row else 0

    def leased(self) -> list[Task]:
        return [_task(r) for r in self._conn.execute(f"{_SELECT} WHERE state IN ('leased', 'running')")]

    def list(self, states: Sequence[TaskState], tenant: str, service: str, limit: int) -> list[Task]:
        where, args = ["true"], list[object]()
        if states:
            where.append("state = ANY(%s)")
            args.append([s.value for s in states])
        if tenant:
            where.append("tenant = %s")
            args.append(tenant)
        if service:
            where.append("service = %s")
            args.append(service)
        rows = self._conn.execute(
            f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY submitted_at DESC, id LIMIT %s", (*args, limit))
        return [_task(r) for r in rows]

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = dict(self._conn.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
        return {s.value: int(found.get(s.value, 0)) for s in TaskState}

    # -- blobs

    def put_blob(self, data: bytes, content_type: str, now: float) -> str:
        blob_id = "sha256:" + hashlib.sha256(data).hexdigest()
        self._conn.execute(  # one statement: its own transaction
            "INSERT INTO task_blobs(id, size, content_type, data, created_at) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO NOTHING",
            (blob_id, len(data), content_type, data, now),
        )
        return blob_id

    def get_blob(self, blob_id: str) -> bytes | None:
        row = self._conn.execute("SELECT data FROM task_blobs WHERE id = %s", (blob_id,)).fetchone()
        return None if row is None else bytes(row[0])
