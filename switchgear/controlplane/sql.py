"""One way to run the stores' SQL on SQLite or PostgreSQL, so that each query is written once.

The registry store (store.py) and the task store (tasks/store.py) run their queries on a Db:
SqliteDb here, or pg.PgDb. Queries are written with SQLite's `?` placeholders (PgDb turns them
into psycopg's `%s`, so no query may hold a `?` or `%` of its own) in SQL both databases accept,
such as `INSERT ... ON CONFLICT ... DO NOTHING` and `IN (?, ?)`. What they spell differently is
a Dialect, both side by side below. The schemas are not shared: their types differ (store.py and
tasks/store.py for SQLite, pg.py for PostgreSQL).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence, Sized
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Dialect:
    """SQL fragments the two databases spell differently."""

    least: str  # the smallest of its arguments (a scalar function, not the aggregate)
    greatest: str  # the largest of its arguments
    empty_blob: str  # an empty binary literal


SQLITE = Dialect(least="MIN", greatest="MAX", empty_blob="X''")
POSTGRES = Dialect(least="LEAST", greatest="GREATEST", empty_blob="''::bytea")


class Db(Protocol):
    """A connection to run queries on (see the module docstring for how they are written).

    Outside `transaction()` and `snapshot()` every statement is its own transaction.
    """

    dialect: Dialect

    def transaction(self) -> AbstractContextManager[Db]:
        """A read-write transaction whose writers are serialised from its start; committed at the
        end of the block, rolled back on any exception. Run its statements on the Db it yields."""
        ...

    def snapshot(self) -> AbstractContextManager[Db]:
        """A read-only transaction whose statements all see one snapshot of the database."""
        ...

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; return how many rows it inserted, updated or deleted."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    def close(self) -> None: ...


def marks(values: Sized) -> str:
    """One `?` per value, for `IN (...)` and `VALUES (...)`."""
    return ", ".join("?" * len(values))


class SqliteDb:
    """Db on a sqlite3 connection opened with isolation_level=None: the module never opens a
    transaction on its own, so each one here is an explicit BEGIN ... COMMIT."""

    dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def transaction(self) -> AbstractContextManager[SqliteDb]:
        # BEGIN IMMEDIATE takes the write lock at once: writers are serialised from here on.
        return self._begin("BEGIN IMMEDIATE")

    def snapshot(self) -> AbstractContextManager[SqliteDb]:
        # A deferred BEGIN: in WAL mode the first read takes a snapshot that holds until COMMIT.
        return self._begin("BEGIN")

    @contextmanager
    def _begin(self, begin: str) -> Iterator[SqliteDb]:
        """`begin` ... COMMIT, rolled back on any exception."""
        self._conn.execute(begin)
        try:
            yield self
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, args).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(sql, args).fetchone()
        return row

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        self._conn.close()
