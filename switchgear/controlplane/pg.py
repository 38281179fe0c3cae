"""PostgreSQL for the control plane's state, when several control-plane replicas share it.

One database holds what the SQLite file holds for a single control plane — the registry, its
version counter, the audit trail, tenants' usage, tasks and blobs — plus the tables the
replicas coordinate through (load reports, the leader row). Each replica keeps the registry
in memory; a commit takes a row lock on the version counter, so writers are serialised, a
writer whose change was based on an older version gets StaleVersion instead of overwriting a
change it never saw, and `NOTIFY switchgear_registry '<seq>'` tells the other replicas to
reload once the commit is visible (NOTIFY is delivered at commit, never on rollback).

Connections are sync psycopg 3 in autocommit mode, so every transaction is an explicit
`with conn.transaction():`. Each is used from one thread only, its owner's offloop.Serial (not
psycopg's async driver: see offloop.py for why), never from the event loop. The schema is
created and upgraded by `migrate`, once per process, under an advisory lock so replicas
starting together on an empty database do not race. Secret values never reach the database,
and a DSN (which may carry a password) is only ever logged as host, port and database name
(`describe`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import conninfo

from switchgear.controlplane.sql import POSTGRES, Db, Row
from switchgear.controlplane.store import SqlStore

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[Any, ...]]

#: Channel a commit notifies with the new version's seq as payload.
NOTIFY_CHANNEL = "switchgear_registry"

SCHEMA_VERSION = 4

#: pg_advisory_xact_lock key that serialises migrations across replicas (any fixed 64-bit value;
#: this one is "swgr-mig" in ASCII).
_MIGRATION_LOCK_KEY = 0x7377_6772_2D6D_6967

# Names that are keys and sort keys are COLLATE "C": byte order, like SQLite and Python's sort,
# whatever the database's locale (a linguistic order would reorder services on load and change
# the content hash).
_REGISTRY_TABLES = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # The version counter's row always exists: commits lock it (SELECT ... FOR UPDATE).
    "INSERT INTO meta(key, value) VALUES ('version_seq', '0')",
    *(
        f'CREATE TABLE {table} (name TEXT COLLATE "C" PRIMARY KEY, spec TEXT NOT NULL, '
        "updated_at DOUBLE PRECISION NOT NULL)"
        for table in ("services", "tenants", "api_keys")
    ),
    "CREATE TABLE settings (id INT PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL)",
    "CREATE TABLE tenant_usage (tenant TEXT PRIMARY KEY, body TEXT NOT NULL)",
    "CREATE TABLE audit (id BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL, "
    "action TEXT NOT NULL, target TEXT NOT NULL, version TEXT NOT NULL, detail TEXT NOT NULL, "
    "before_json TEXT NOT NULL DEFAULT '', after_json TEXT NOT NULL DEFAULT '')",
)

# Mirrors tasks/store.py's SQLite schema: REAL -> DOUBLE PRECISION, INTEGER -> BIGINT, BLOB -> BYTEA.
_TASK_TABLES = (
    """CREATE TABLE tasks (
    id TEXT COLLATE "C" PRIMARY KEY, tenant TEXT NOT NULL, service TEXT NOT NULL, category TEXT NOT NULL,
    method TEXT NOT NULL, priority BIGINT NOT NULL,
    req_cpu DOUBLE PRECISION NOT NULL, req_memory DOUBLE PRECISION NOT NULL, req_gpu DOUBLE PRECISION NOT NULL,
    req_iops DOUBLE PRECISION NOT NULL, req_mbps DOUBLE PRECISION NOT NULL, submitted_at DOUBLE PRECISION NOT NULL,
    payload BYTEA NOT NULL, payload_blob_id TEXT NOT NULL, timeout_s DOUBLE PRECISION NOT NULL,
    idempotency_key TEXT NOT NULL, request_hash TEXT NOT NULL, max_attempts BIGINT NOT NULL, origin TEXT NOT NULL,
    state TEXT NOT NULL, attempts BIGINT NOT NULL, not_before DOUBLE PRECISION NOT NULL, lease_id TEXT NOT NULL,
    agent TEXT NOT NULL, lease_expires_at DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, progress DOUBLE PRECISION NOT NULL,
    progress_message TEXT NOT NULL, result BYTEA NOT NULL, endpoint TEXT NOT NULL, usage TEXT NOT NULL,
    error_kind TEXT NOT NULL, error_message TEXT NOT NULL)""",
    "CREATE UNIQUE INDEX tasks_idempotency ON tasks(tenant, idempotency_key) WHERE idempotency_key <> ''",
    "CREATE INDEX tasks_queue ON tasks(state, service, not_before)",
    "CREATE INDEX tasks_agent ON tasks(agent, state)",
    "CREATE TABLE task_attempts (task_id TEXT NOT NULL, lease_id TEXT NOT NULL, attempt BIGINT NOT NULL, "
    "agent TEXT NOT NULL, leased_at DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION NOT NULL DEFAULT 0, "
    "outcome TEXT NOT NULL DEFAULT '', PRIMARY KEY (task_id, lease_id))",
    "CREATE TABLE task_blobs (id TEXT PRIMARY KEY, size BIGINT NOT NULL, content_type TEXT NOT NULL, "
    "data BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL)",
)

# How replicas coordinate: agents' load reports for the leader to score, and who leads.
_REPLICATION_TABLES = (
    "CREATE TABLE load_reports (id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL, gone BOOLEAN NOT NULL DEFAULT false, "
    "body BYTEA NOT NULL, at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE leader (id INT PRIMARY KEY CHECK (id = 1), replica TEXT NOT NULL, address TEXT NOT NULL, "
    "epoch BIGINT NOT NULL, since DOUBLE PRECISION NOT NULL)",
)

#: Forward-only migrations: schema version reached -> statements that reach it. Never edit a
#: released entry; add the next number.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE schema_version (id INT PRIMARY KEY CHECK (id = 1), version INT NOT NULL)",
        "INSERT INTO schema_version(id, version) VALUES (1, 0)",
        *_REGISTRY_TABLES,
        *_TASK_TABLES,
        *_REPLICATION_TABLES,
    ),
    # Which agents each replica serves, so ListAgents on any replica shows the whole fleet.
    2: (
        "CREATE TABLE replicas (replica TEXT PRIMARY KEY, address TEXT NOT NULL, seen_at DOUBLE PRECISION NOT NULL)",
        'CREATE TABLE agents (replica TEXT NOT NULL, node TEXT COLLATE "C" NOT NULL, status TEXT NOT NULL, '
        "PRIMARY KEY (replica, node))",
    ),
    # Which tenant uploaded each blob: a tenant's tasks may name only their own tenant's blobs.
    3: (
        "CREATE TABLE task_blob_owners (blob_id TEXT NOT NULL, tenant TEXT NOT NULL, PRIMARY KEY (blob_id, tenant))",
    ),
    # The retention purge and the per-tenant quotas (tasks/store.py's _INDEXES, the same).
    4: (
        "CREATE INDEX tasks_finished ON tasks(finished_at) "
        "WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead_lettered')",
        "CREATE INDEX tasks_tenant ON tasks(tenant, state)",
        "CREATE INDEX tasks_tenant_finished ON tasks(tenant, finished_at) "
        "WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead_lettered')",
        "CREATE INDEX tasks_payload_blob ON tasks(payload_blob_id) WHERE payload_blob_id <> ''",
        "CREATE INDEX task_blobs_created ON task_blobs(created_at)",
        "CREATE INDEX task_blob_owners_tenant ON task_blob_owners(tenant)",
    ),
}


def connect(dsn: str, *, connect_timeout_s: int = 10) -> Connection:
    """A sync connection in autocommit mode: transactions are explicit `with conn.transaction():`."""
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout_s)
    log.info("connected to PostgreSQL %s", describe(dsn))
    return conn


def describe(dsn: str) -> str:
    """host:port/dbname of a DSN (URL or key=value), for logs: never the password or user."""
    params = conninfo.conninfo_to_dict(dsn)
    host = str(params.get("host") or "localhost")
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"


def migrate(conn: Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; return how many migrations this call applied.

    One transaction under an advisory lock: of several replicas starting together on an empty
    database, one migrates and the others wait for it, then find nothing to do. A database
    whose schema is newer than this build raises RuntimeError and changes nothing.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        current = _schema_version(conn)
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"PostgreSQL schema {current} is newer than this build understands ({SCHEMA_VERSION}): "
                "run a newer switchgear"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = %s WHERE id = 1", (version,))
    if current < SCHEMA_VERSION:
        log.info("PostgreSQL schema migrated from version %d to %d", current, SCHEMA_VERSION)
    return SCHEMA_VERSION - current


def _schema_version(conn: Connection) -> int:
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    found = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    return int(found[0]) if found else 0


class Keeper:
    """One connection, opened again after it breaks (PostgreSQL restarted, failed over, or the
    network blinked). The call that meets the break fails; the next one reconnects. Call it for
    the connection each time rather than holding on to one."""

    def __init__(self, dsn: str, *, connect_timeout_s: int = 3) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout_s
        self._conn: Connection | None = None
        self.reconnects = 0

    def __call__(self) -> Connection:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
                self.reconnects += 1
                log.warning("PostgreSQL connection lost; reconnecting to %s", describe(self._dsn))
            self._conn = conn = connect(self._dsn, connect_timeout_s=self._timeout)
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def getter(conn: Connection | Callable[[], Connection]) -> Callable[[], Connection]:
    """A fixed connection, or a Keeper: either way, something to call for the connection."""
    if isinstance(conn, psycopg.Connection):
        return lambda: conn
    return conn


class PgDb:
    """sql.Db on a connection from `connect` (autocommit mode), or on a Keeper. Outside a
    transaction each statement asks for the connection anew (a Keeper may have reconnected in
    between); a transaction's statements all run on the one connection it began on."""

    dialect = POSTGRES

    def __init__(self, conn: Connection | Callable[[], Connection]) -> None:
        self._get = getter(conn)

    @contextmanager
    def transaction(self) -> Iterator[PgDb]:
        conn = self._get()
        with conn.transaction():
            yield PgDb(conn)

    @contextmanager
    def snapshot(self) -> Iterator[PgDb]:
        """Never inside an outer transaction: there conn.transaction() would be a savepoint,
        where PostgreSQL refuses SET TRANSACTION."""
        conn = self._get()
        with conn.transaction():
            # One snapshot for every statement, while other replicas commit.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield PgDb(conn)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._get().execute(_placeholders(sql), args).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._get().cursor() as cur:
            cur.executemany(_placeholders(sql), rows)

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return self._get().execute(_placeholders(sql), args).fetchone()

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._get().execute(_placeholders(sql), args).fetchall()

    def close(self) -> None:
        self._get().close()


def _placeholders(sql: str) -> str:
    """A query written with SQLite's `?` placeholders (see sql.py), in psycopg's `%s`."""
    return sql.replace("?", "%s")


class PgStore(SqlStore):
    """The Store protocol (see store.py) on PostgreSQL, behaving as SqliteStore does.

    Ownership: `conn` (from `connect`, schema already migrated; or a Keeper) stays the caller's
    unless `owns_connection`; `close()` closes only a connection it owns. Not thread-safe: use
    it from its `serial` (see store.py), like SqliteStore; nothing else may use its connection
    meanwhile (the control plane gives other users of PostgreSQL a connection of their own), and
    `load` must not run inside a transaction open on it (see PgDb.snapshot).
    """

    def __init__(
        self, conn: Connection | Callable[[], Connection], *, clock: Callable[[], float] = time.time,
        owns_connection: bool = False,
    ) -> None:
        super().__init__(PgDb(conn), clock=clock, owns_connection=owns_connection)

    def _lock_version(self, db: Db) -> int:
        # The row lock serialises writers from every replica until this transaction ends.
        row = db.one("SELECT value FROM meta WHERE key = 'version_seq' FOR UPDATE")
        if row is None:
            raise RuntimeError("PostgreSQL schema is not migrated: call pg.migrate first")
        return int(row[0])

    def _announce(self, db: Db, seq: int) -> None:
        db.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, str(seq)))  # delivered at COMMIT, never on rollback
