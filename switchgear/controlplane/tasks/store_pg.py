"""Tasks, their attempts and uploaded blobs in PostgreSQL, for control-plane replicas.

The task store of store.py (SqlTaskStore: the same queries, semantics and row encoding) on the
tables `pg.migrate` creates. Idempotent submission relies on the unique (tenant,
idempotency_key) index rather than a read-then-write, so it holds even when two replicas insert
the same key at once.
"""

from __future__ import annotations

from switchgear.controlplane.offloop import Serial
from switchgear.controlplane.pg import Connection, PgDb
from switchgear.controlplane.tasks.store import SqlTaskStore


class PgTaskStore(SqlTaskStore):
    """TaskStoreLike on a psycopg connection whose schema `pg.migrate` has already created
    (the constructor never migrates: the process does that once).

    Ownership: `conn` stays the caller's unless `owns_connection`; `close()` closes only a
    connection it owns. Not thread-safe: use it from `serial`, which must be the thread every
    other user of `conn` runs on (the leader election's, for the lock's session).
    """

    def __init__(self, conn: Connection, *, owns_connection: bool = False, serial: Serial | None = None) -> None:
        super().__init__(PgDb(conn), owns_connection=owns_connection, serial=serial)
