"""Where the control plane's state lives: a SQLite file by default (PostgreSQL: pg.py).

The store keeps the registry (services and settings), the snapshot version counter, the hash
of the last config file applied at start-up, the overlay served with the current version, and
an append-only audit trail. Every change is one transaction: the state, the counter bump and
the audit row land together or not at all. A writer can name the version its change was based
on (`expected_seq`): when another writer (a second control-plane replica) committed first, the
commit raises StaleVersion and writes nothing, so no replica overwrites a change it never saw.
Secret values never reach it: services hold only secret references.

Threading: a store is used by one thread at a time — its `serial` (offloop.Serial), which the
control plane's event loop submits every call to, so a store that waits (a lock, a slow disk)
never stalls the loop, and calls run one at a time in the order they were made. Start-up code
and tests, with nothing else running, may call it directly.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from switchgear.controlplane import codec
from switchgear.controlplane.model import ApiKey, RegistryState, ServiceSpec, Settings, Tenant
from switchgear.controlplane.offloop import Serial
from switchgear.controlplane.sql import Db, SqliteDb

SCHEMA_VERSION = 2

#: The audit action of a change the control plane refused (nothing committed; see append_refused).
REFUSED = "refused"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tenant_usage (tenant TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, version TEXT NOT NULL, detail TEXT NOT NULL);
"""

#: Forward-only migrations: schema version reached -> statements that reach it.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (
        "ALTER TABLE audit ADD COLUMN before_json TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE audit ADD COLUMN after_json TEXT NOT NULL DEFAULT ''",
    ),
}

#: Model collections kept one row per item: table -> attribute of RegistryState, item key.
_COLLECTIONS = (("services", "services", "name"), ("tenants", "tenants", "id"), ("api_keys", "keys", "id"))


class StaleVersion(Exception):
    """A commit based on a version that is no longer the stored one (another replica committed
    first). Nothing was written."""


@dataclass(frozen=True)
class Stored:
    """What a store holds: the state, its version counter and content hash, and the overlay
    served with that version (its JSON text, "" for none; the registry encodes and decodes it)."""

    state: RegistryState
    seq: int
    content_hash: str
    config_hash: str
    overlay: str = ""


@dataclass(frozen=True)
class Change:
    """One committed change, as the audit trail records it: who, what, and the object's JSON
    before and after ("" when it did not exist)."""

    actor: str
    action: str
    target: str
    detail: str = ""
    before: str = ""
    after: str = ""


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    target: str
    version: str
    detail: str
    before: str = ""
    after: str = ""


class Store(Protocol):
    #: The one thread the store's calls run on once the control plane serves (see above).
    serial: Serial

    def load(self) -> Stored: ...

    def head(self) -> tuple[int, str]:
        """(seq, content hash) of the stored version: one cheap query, for polling."""
        ...

    def commit(
        self, state: RegistryState, seq: int, digest: str, version: str, change: Change,
        config_hash: str | None = None, *, overlay: str | None = None, expected_seq: int | None = None,
    ) -> None:
        """Store `state` as version `seq` with one audit row, in one transaction.

        `config_hash` / `overlay`: new values to keep (None keeps the stored ones).
        `expected_seq`: the stored seq this change was based on; when the stored seq differs,
        raise StaleVersion and write nothing (None: no check).
        """
        ...

    def append_audit(self, version: str, change: Change) -> None:
        """An audit row only: no state or version change."""
        ...

    def append_refused(self, version: str, change: Change, keep: int) -> None:
        """An audit row for a refused change (action REFUSED), keeping only the newest `keep` such
        rows: a flood of refusals cannot grow the store, and committed changes' rows are never pruned."""
        ...

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        """The newest `limit` audit rows, newest first."""
        ...

    def save_usage(self, rows: dict[str, str]) -> None: ...

    def load_usage(self) -> dict[str, str]: ...

    def close(self) -> None: ...


def collection_rows(state: RegistryState) -> dict[str, dict[str, str]]:
    """The state's model collections as stored: table -> {item key: item JSON}."""
    return {
        table: {getattr(item, key): codec.dumps_memo(item) for item in getattr(state, attribute)}
        for table, attribute, key in _COLLECTIONS
    }


def stored_from(meta: dict[str, str], settings: str | None, items: dict[str, list[str]]) -> Stored:
    """A Stored rebuilt from the meta rows, the settings JSON and each table's item JSONs (in key order)."""
    state = RegistryState(
        services=tuple(codec.loads(ServiceSpec, spec) for spec in items["services"]),
        settings=codec.loads(Settings, settings) if settings else Settings(),
        tenants=tuple(codec.loads(Tenant, spec) for spec in items["tenants"]),
        keys=tuple(codec.loads(ApiKey, spec) for spec in items["api_keys"]),
    )
    return Stored(
        state=state,
        seq=int(meta.get("version_seq") or 0),
        content_hash=meta.get("version_hash", ""),
        config_hash=meta.get("config_hash", ""),
        overlay=meta.get("overlay", ""),
    )


def meta_updates(seq: int, digest: str, config_hash: str | None, overlay: str | None) -> dict[str, str]:
    """The meta rows a commit writes: the version always, the others only when given."""
    meta = {"version_seq": str(seq), "version_hash": digest}
    if config_hash is not None:
        meta["config_hash"] = config_hash
    if overlay is not None:
        meta["overlay"] = overlay
    return meta


def check_base(expected_seq: int | None, stored_seq: int) -> None:
    """Raise StaleVersion when a change based on version `expected_seq` meets `stored_seq`."""
    if expected_seq is not None and expected_seq != stored_seq:
        raise StaleVersion(f"change based on version {expected_seq}, but version {stored_seq} is stored")


class SqlStore(ABC):
    """The Store protocol's queries on a Db (sql.py): SqliteStore and PgStore are this class on
    their backend, each adding how a commit reads the version counter so that writers are
    serialised, and whom it tells of the new version.

    Ownership: close() closes the connection only when `owns_connection`. Threading: see the
    module docstring; `serial` is this store's own.
    """

    def __init__(self, db: Db, *, clock: Callable[[], float], owns_connection: bool) -> None:
        self._db = db
        self._clock = clock
        self._owns_connection = owns_connection
        self.serial = Serial(type(self).__name__)

    @abstractmethod
    def _lock_version(self, db: Db) -> int:
        """The stored seq, read inside a commit's transaction `db` so that no other writer can
        commit until that transaction ends."""

    @abstractmethod
    def _announce(self, db: Db, seq: int) -> None:
        """Tell whoever else reads the store, once the commit in transaction `db` is visible,
        that version `seq` is stored."""

    def load(self) -> Stored:
        with self._db.snapshot() as db:  # one read snapshot across the tables
            row = db.one("SELECT body FROM settings WHERE id = 1")
            items = {table: [spec for (spec,) in db.all(f"SELECT spec FROM {table} ORDER BY name")]
                     for table, _, _ in _COLLECTIONS}
            meta: dict[str, str] = dict(db.all("SELECT key, value FROM meta"))
        return stored_from(meta, row[0] if row else None, items)

    def head(self) -> tuple[int, str]:
        meta: dict[str, str] = dict(
            self._db.all("SELECT key, value FROM meta WHERE key IN ('version_seq', 'version_hash')"))
        return int(meta.get("version_seq") or 0), meta.get("version_hash", "")

    def commit(
        self, state: RegistryState, seq: int, digest: str, version: str, change: Change,
        config_hash: str | None = None, *, overlay: str | None = None, expected_seq: int | None = None,
    ) -> None:
        now = self._clock()
        with self._db.transaction() as db:
            check_base(expected_seq, self._lock_version(db))
            for table, rows in collection_rows(state).items():
                _sync(db, table, rows, now)
            db.execute(
                "INSERT INTO settings(id, body) VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                (codec.dumps(state.settings),),
            )
            db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(meta_updates(seq, digest, config_hash, overlay).items()),
            )
            _insert_audit(db, now, version, change)
            self._announce(db, seq)

    def append_audit(self, version: str, change: Change) -> None:
        _insert_audit(self._db, self._clock(), version, change)  # one statement: its own transaction

    def append_refused(self, version: str, change: Change, keep: int) -> None:
        with self._db.transaction() as db:
            _insert_audit(db, self._clock(), version, dataclasses.replace(change, action=REFUSED))
            db.execute(
                "DELETE FROM audit WHERE action = ? AND id <= "
                "(SELECT id FROM audit WHERE action = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (REFUSED, REFUSED, max(keep, 0)),
            )

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        rows = self._db.all(
            "SELECT id, at, actor, action, target, version, detail, before_json, after_json FROM audit "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [AuditEntry(*row) for row in rows]

    def save_usage(self, rows: dict[str, str]) -> None:
        """Per-tenant usage books (JSON), replaced whole; soft state kept across restarts."""
        with self._db.transaction() as db:
            db.executemany(
                "INSERT INTO tenant_usage(tenant, body) VALUES (?, ?) "
                "ON CONFLICT(tenant) DO UPDATE SET body = excluded.body",
                list(rows.items()),
            )

    def load_usage(self) -> dict[str, str]:
        return dict(self._db.all("SELECT tenant, body FROM tenant_usage"))

    def close(self) -> None:
        if self._owns_connection:
            self._db.close()


class SqliteStore(SqlStore):
    """A Store on one SQLite file (WAL mode), creating and upgrading its tables; close() closes
    its connection. Not thread-safe: use it from its `serial`."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        super().__init__(SqliteDb(conn), clock=clock, owns_connection=True)
        self._check_schema()

    def _check_schema(self) -> None:
        found = _meta(self._db, "schema_version")
        current = int(found) if found else 1  # _SCHEMA creates version 1's tables
        if current > SCHEMA_VERSION:
            raise RuntimeError(f"store schema {current} is newer than this build understands ({SCHEMA_VERSION})")
        with self._db.transaction() as db:
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS.get(version, ()):
                    db.execute(statement)
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def _lock_version(self, db: Db) -> int:
        # The transaction began with BEGIN IMMEDIATE (SqliteDb.transaction): writers are
        # serialised from there on, so a plain read will do; no row before the first commit.
        return int(_meta(db, "version_seq") or 0)

    def _announce(self, db: Db, seq: int) -> None:
        pass  # SQLite cannot notify: a process sharing the file finds the version by polling head()


def _meta(db: Db, key: str) -> str | None:
    row = db.one("SELECT value FROM meta WHERE key = ?", (key,))
    return None if row is None else str(row[0])


def _insert_audit(db: Db, now: float, version: str, change: Change) -> None:
    db.execute(
        "INSERT INTO audit(at, actor, action, target, version, detail, before_json, after_json) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (now, change.actor, change.action, change.target, version, change.detail, change.before, change.after),
    )


def _sync(db: Db, table: str, rows: dict[str, str], now: float) -> None:
    """Make `table` hold exactly `rows` (name -> JSON), touching only what changed."""
    old: dict[str, str] = dict(db.all(f"SELECT name, spec FROM {table}"))
    db.executemany(f"DELETE FROM {table} WHERE name = ?", [(name,) for name in old.keys() - rows.keys()])
    db.executemany(
        f"INSERT INTO {table}(name, spec, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
        [(name, spec, now) for name, spec in rows.items() if old.get(name) != spec],
    )
