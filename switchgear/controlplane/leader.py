"""Leader election among control-plane replicas: a PostgreSQL session advisory lock.

Every replica serves Admin and Discovery; exactly one, the leader, runs what must not run
twice: health scoring and alert evaluation (they publish the overlay), task dispatch and lease
sweeping, and the folding of all replicas' load reports. The lock is held by one database
session. When the leader process dies, the kernel closes its socket, PostgreSQL ends the
session and the lock is free at once; the next replica to try (every `interval_s`) takes it.

The session that holds the lock is handed to the leader's work (the task store writes through
it). That makes the lock a fence as well: a leader whose session is gone can no longer write
tasks, and a leader that still writes through its session still holds the lock. Each election
bumps `leader.epoch`, so logs and metrics tell one reign from the next, and records the
leader's address, which followers use to forward task RPCs to it.

Blocking database calls run on the election's own thread (`serial`, an offloop.Serial): a
dead or slow PostgreSQL must never stall the event loop that serves agents' snapshot streams.
Whatever else uses the lock's session (the leader's task store, the report drain) runs on that
same thread, so no statement of one lands inside another's transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psycopg

from switchgear.controlplane.offloop import Serial

log = logging.getLogger("switchgear.controlplane.leader")

#: The advisory lock's key (a 64-bit integer; advisory locks are per database).
LOCK_KEY = 0x5357_4C45_4144_0001  # "SWLEAD" 1


@dataclass(frozen=True)
class LeaderInfo:
    replica: str
    address: str
    epoch: int
    since: float


Connect = Callable[[], psycopg.Connection]


def current_leader(conn: psycopg.Connection) -> LeaderInfo | None:
    """Who last won the election (the row outlives a dead leader: check `epoch` moves)."""
    row = conn.execute("SELECT replica, address, epoch, since FROM leader WHERE id = 1").fetchone()
    return None if row is None else LeaderInfo(str(row[0]), str(row[1]), int(row[2]), float(row[3]))


def _try_take(conn: psycopg.Connection, replica: str, address: str) -> int | None:
    """The lock and a new epoch, or None when another session holds the lock."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
    if not row or not row[0]:
        return None
    with conn.transaction():
        epoch_row = conn.execute(
            "INSERT INTO leader(id, replica, address, epoch, since) VALUES (1, %s, %s, 1, %s) "
            "ON CONFLICT (id) DO UPDATE SET replica = excluded.replica, address = excluded.address, "
            "epoch = leader.epoch + 1, since = excluded.since RETURNING epoch",
            (replica, address, time.time()),
        ).fetchone()
    assert epoch_row is not None
    return int(epoch_row[0])


def _still_held(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
        "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = %s",
        (LOCK_KEY,),
    ).fetchone()
    return bool(row and row[0])


class LeaderElection:
    """Try for the lock every `interval_s`; while held, check it every `interval_s`.

    `on_elected(conn, epoch)` runs when this replica wins (conn: the lock's session, for
    fenced writes: use it from `serial` only); `on_deposed()` when it loses the session or
    stops. `run` once: its end closes `serial`.
    """

    def __init__(
        self,
        connect: Connect,
        replica: str,
        address: str,
        *,
        on_elected: Callable[[psycopg.Connection, int], Awaitable[None]],
        on_deposed: Callable[[], Awaitable[None]],
        interval_s: float = 0.5,
    ) -> None:
        self._connect = connect
        self.replica = replica
        self.address = address
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self.interval_s = interval_s
        self._conn: psycopg.Connection | None = None
        self.serial = Serial("leader")
        self.epoch = 0
        self.elections = 0

    @property
    def is_leader(self) -> bool:
        return self.epoch > 0

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    if self.is_leader:
                        if not await self.serial.run(self._check):
                            await self._step_down("lost its database session")
                    else:
                        await self._campaign()
                except Exception:  # the loop must outlive any one failure; the next round retries
                    log.exception("leader election round failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
        finally:
            if self.is_leader:
                await self._step_down("stopping")
            await self.serial.run(self._close)
            self.serial.close()

    async def _campaign(self) -> None:
        try:
            epoch = await self.serial.run(self._try)
        except psycopg.Error as exc:
            log.warning("cannot reach the database for the leader election: %s", type(exc).__name__)
            await self.serial.run(self._close)
            return
        if epoch is None:
            return
        assert self._conn is not None
        self.epoch = epoch
        self.elections += 1
        log.warning("replica %s (%s) is the leader, epoch %d", self.replica, self.address, epoch)
        try:
            await self._on_elected(self._conn, epoch)
        except Exception:
            log.exception("starting the leader's work failed; giving up the lead")
            await self._step_down("failed to start its work")

    def _try(self) -> int | None:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return _try_take(self._conn, self.replica, self.address)

    def _check(self) -> bool:
        conn = self._conn
        if conn is None or conn.closed:
            return False
        try:
            return _still_held(conn)
        except psycopg.Error:
            return False

    async def _step_down(self, why: str) -> None:
        log.warning("replica %s gives up the lead (epoch %d): %s", self.replica, self.epoch, why)
        self.epoch = 0
        try:
            await self._on_deposed()
        finally:
            await self.serial.run(self._close)  # ends the session: the lock is free for the others

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
