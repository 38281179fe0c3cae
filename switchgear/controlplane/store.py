"""Where the control plane's state lives: a SQLite file by default.

The store keeps the registry (services and settings), the snapshot version counter, the hash
of the last config file applied at start-up, and an append-only audit trail. Every change is
one transaction: the state, the counter bump and the audit row land together or not at all.
Secret values never reach it: services hold only secret references.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from switchgear.controlplane import codec
from switchgear.controlplane.model import ApiKey, RegistryState, ServiceSpec, Settings, Tenant

T = TypeVar("T")

SCHEMA_VERSION = 2

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


@dataclass(frozen=True)
class Stored:
    """What a store holds: the state, its version counter and content hash."""

    state: RegistryState
    seq: int
    content_hash: str
    config_hash: str


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
    def load(self) -> Stored: ...

    def commit(
        self, state: RegistryState, seq: int, digest: str, version: str, change: Change,
        config_hash: str | None = None,
    ) -> None: ...

    def audit(self, limit: int = 100) -> list[AuditEntry]: ...

    def close(self) -> None: ...


class SqliteStore:
    """A Store on one SQLite file (WAL mode). Not thread-safe: use it from one event loop."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._clock = clock
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._check_schema()

    def _check_schema(self) -> None:
        found = self._meta("schema_version")
        current = int(found) if found else 1  # _SCHEMA creates version 1's tables
        if current > SCHEMA_VERSION:
            raise RuntimeError(f"store schema {current} is newer than this build understands ({SCHEMA_VERSION})")
        with _transaction(self._db) as db:
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS.get(version, ()):
                    db.execute(statement)
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _items(self, table: str, cls: type[T]) -> tuple[T, ...]:
        return tuple(codec.loads(cls, spec) for (spec,) in self._db.execute(f"SELECT spec FROM {table} ORDER BY name"))

    def load(self) -> Stored:
        row = self._db.execute("SELECT body FROM settings WHERE id = 1").fetchone()
        settings = codec.loads(Settings, row[0]) if row else Settings()
        return Stored(
            state=RegistryState(
                services=self._items("services", ServiceSpec),
                settings=settings,
                tenants=self._items("tenants", Tenant),
                keys=self._items("api_keys", ApiKey),
            ),
            seq=int(self._meta("version_seq") or 0),
            content_hash=self._meta("version_hash") or "",
            config_hash=self._meta("config_hash") or "",
        )

    def commit(
        self, state: RegistryState, seq: int, digest: str, version: str, change: Change,
        config_hash: str | None = None,
    ) -> None:
        now = self._clock()
        with _transaction(self._db) as db:
            for table, attribute, key in _COLLECTIONS:
                rows = {getattr(item, key): codec.dumps(item) for item in getattr(state, attribute)}
                _sync(db, table, rows, now)
            db.execute(
                "INSERT INTO settings(id, body) VALUES (1, ?) "
                "ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                (codec.dumps(state.settings),),
            )
            meta = {"version_seq": str(seq), "version_hash": digest}
            if config_hash is not None:
                meta["config_hash"] = config_hash
            for key, value in meta.items():
                db.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            db.execute(
                "INSERT INTO audit(at, actor, action, target, version, detail, before_json, after_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now, change.actor, change.action, change.target, version, change.detail, change.before, change.after),
            )

    def save_usage(self, rows: dict[str, str]) -> None:
        """Per-tenant usage books (JSON), replaced whole; soft state kept across restarts."""
        with _transaction(self._db) as db:
            for tenant, body in rows.items():
                db.execute("INSERT INTO tenant_usage(tenant, body) VALUES (?, ?) "
                           "ON CONFLICT(tenant) DO UPDATE SET body = excluded.body", (tenant, body))

    def load_usage(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT tenant, body FROM tenant_usage").fetchall())

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        rows = self._db.execute(
            "SELECT id, at, actor, action, target, version, detail, before_json, after_json FROM audit "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [AuditEntry(*row) for row in rows]

    def close(self) -> None:
        self._db.close()


def _sync(db: sqlite3.Connection, table: str, rows: dict[str, str], now: float) -> None:
    """Make `table` hold exactly `rows` (name -> JSON), touching only what changed."""
    old = dict(db.execute(f"SELECT name, spec FROM {table}").fetchall())
    for name in old.keys() - rows.keys():
        db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))
    for name, spec in rows.items():
        if old.get(name) != spec:
            db.execute(
                f"INSERT INTO {table}(name, spec, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
                (name, spec, now),
            )


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")

