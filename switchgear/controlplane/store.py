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
from typing import Protocol

from switchgear.controlplane import codec
from switchgear.controlplane.model import RegistryState, ServiceSpec, Settings

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, version TEXT NOT NULL, detail TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Stored:
    """What a store holds: the state, its version counter and content hash."""

    state: RegistryState
    seq: int
    content_hash: str
    config_hash: str


@dataclass(frozen=True)
class Change:
    """One committed change, as the audit trail records it."""

    actor: str
    action: str
    target: str
    detail: str = ""


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    target: str
    version: str
    detail: str


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
        if found is None:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(found) > SCHEMA_VERSION:
            raise RuntimeError(
                f"store schema {found} is newer than this build understands ({SCHEMA_VERSION})"
            )

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def load(self) -> Stored:
        services = tuple(
            codec.loads(ServiceSpec, spec)
            for (spec,) in self._db.execute("SELECT spec FROM services ORDER BY name")
        )
        row = self._db.execute("SELECT body FROM settings WHERE id = 1").fetchone()
        settings = codec.loads(Settings, row[0]) if row else Settings()
        return Stored(
            state=RegistryState(services=services, settings=settings),
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
            old = {name: spec for name, spec in db.execute("SELECT name, spec FROM services")}
            new = {s.name: codec.dumps(s) for s in state.services}
            for name in old.keys() - new.keys():
                db.execute("DELETE FROM services WHERE name = ?", (name,))
            for name, spec in new.items():
                if old.get(name) != spec:
                    db.execute(
                        "INSERT INTO services(name, spec, updated_at) VALUES (?, ?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, "
                        "updated_at = excluded.updated_at",
                        (name, spec, now),
                    )
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
                "INSERT INTO audit(at, actor, action, target, version, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (now, change.actor, change.action, change.target, version, change.detail),
            )

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        rows = self._db.execute(
            "SELECT id, at, actor, action, target, version, detail FROM audit "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [AuditEntry(*row) for row in rows]

    def close(self) -> None:
        self._db.close()


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

