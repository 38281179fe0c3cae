"""What lets several control-plane replicas act as one, over a shared PostgreSQL.

- `RegistryFollower`: every replica LISTENs on the channel the store NOTIFYs on at each commit
  and adopts the newer version at once, so an admin change made through any replica reaches
  the agents of every replica; a slow poll of the version head covers a lost notification
  (say, while the listening session reconnects).
- `FleetView`: each replica publishes the agents it serves, so ListAgents anywhere shows all.
- `ReportRelay`: agents report load to whichever replica they are connected to, but only the
  leader scores health. Every replica writes the reports it receives to `load_reports`
  (buffered, one insert per flush); the leader drains the table and feeds each report to its
  collector exactly once (DELETE ... RETURNING under SKIP LOCKED). Reports older than
  `stale_s` when drained are dropped: a delta that arrives late would be scored as current.
- `TasksRouter`: TasksService on every replica. The leader answers from its scheduler; a
  follower forwards each call, with its metadata and deadline, to the leader's address (from
  the election's row), so agents may lease and report through any replica. `AdminRouter` does
  the same for the Admin reads only the leader can answer (GetStats, ListAlerts).

Threading: none of these runs a query on the event loop. FleetView, ReportRelay and LeaderLink
share one connection and one offloop.Serial (its thread); what they read from the loop's own
objects (the agent tracker, the report buffer) is taken on the loop first and handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg

from switchgear.controlplane import codec
from switchgear.controlplane.agents import AgentStatus, AgentTracker
from switchgear.controlplane.leader import current_leader
from switchgear.controlplane.offloop import Serial
from switchgear.controlplane.pg import NOTIFY_CHANNEL, getter
from switchgear.controlplane.registry import Registry
from switchgear.tls import ClientTls, aio_channel
from switchgear.v1 import admin_pb2_grpc, loadreport_pb2, tasks_pb2, tasks_pb2_grpc

log = logging.getLogger("switchgear.controlplane.replicas")


class RegistryFollower:
    def __init__(self, dsn: str, registry: Registry, *, poll_s: float = 1.0) -> None:
        self._dsn = dsn
        self._registry = registry
        self.poll_s = poll_s
        self.adopted = 0

    async def _refresh(self) -> None:
        try:
            if await self._registry.call(self._registry.refresh):
                self.adopted += 1
                log.info("adopted version %s from another replica", self._registry.snapshot.version)
        except psycopg.Error as exc:
            log.warning("cannot read the registry from the database: %s", type(exc).__name__)

    async def run(self, stop: asyncio.Event) -> None:
        listening = asyncio.ensure_future(self._listen_forever())
        try:
            while not stop.is_set():
                await self._refresh()  # the safety net under LISTEN/NOTIFY
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.poll_s)
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening

    async def _listen_forever(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")  # PgStore notifies in every commit
                    await self._refresh()  # anything committed before LISTEN took effect
                    async for _ in conn.notifies():
                        await self._refresh()
            except psycopg.Error as exc:
                log.warning("registry notifications lost (%s); reconnecting", type(exc).__name__)
                await asyncio.sleep(self.poll_s)


class FleetView:
    """Every replica's agents, so ListAgents on any replica lists the whole fleet.

    Each replica writes the agents it serves (the rows that changed) and a heartbeat, and stops
    listing an agent `forget_s` after its stream ended (restarted agents get new ids);
    `agents()` reads the lists of replicas seen in the last `fresh_s`, and for an agent listed
    twice (it moved from a dying replica) keeps the connected entry seen last.
    """

    def __init__(self, conn: psycopg.Connection | Callable[[], psycopg.Connection], replica: str, address: str,
                 tracker: AgentTracker, *, fresh_s: float = 5.0, forget_s: float = 600.0,
                 clock: Callable[[], float] = time.time, serial: Serial | None = None) -> None:
        self._conn = getter(conn)
        self.serial = serial or Serial("fleet")  # the thread `conn` is used on
        self._replica = replica
        self.address = address  # where other replicas reach this one
        self._tracker = tracker
        self.fresh_s = fresh_s
        self.forget_s = forget_s  # a disconnected agent is listed this long, then forgotten
        self._clock = clock
        self._published: dict[str, str] | None = None

    def publish(self) -> None:
        """Write this replica's agents (on the calling thread: tests; `run` uses `serial`)."""
        self._write(*self._rows())

    def _rows(self) -> tuple[dict[str, str], float]:
        """This replica's agents as rows, read from the tracker (on the loop)."""
        now = self._clock()
        rows = {a.node.id: codec.dumps(dataclasses.replace(a, replica=self._replica)) for a in self._tracker.list()
                if a.connected or now - a.last_seen < self.forget_s}
        return rows, now

    def _write(self, rows: dict[str, str], now: float) -> None:
        published = self._published or {}
        try:
            conn = self._conn()
            with conn.transaction():
                conn.execute("INSERT INTO replicas(replica, address, seen_at) VALUES (%s, %s, %s) ON CONFLICT "
                             "(replica) DO UPDATE SET address = excluded.address, seen_at = excluded.seen_at",
                             (self._replica, self.address, now))
                if self._published is None:  # first publish of this process: whatever an earlier one left
                    conn.execute("DELETE FROM agents WHERE replica = %s", (self._replica,))
                with conn.cursor() as cur:  # only what changed since the last publish
                    cur.executemany("DELETE FROM agents WHERE replica = %s AND node = %s",
                                    [(self._replica, node) for node in published.keys() - rows.keys()])
                    cur.executemany(
                        "INSERT INTO agents(replica, node, status) VALUES (%s, %s, %s) "
                        "ON CONFLICT (replica, node) DO UPDATE SET status = excluded.status",
                        [(self._replica, node, body) for node, body in rows.items() if published.get(node) != body])
            self._published = rows
        except psycopg.Error as exc:
            log.warning("could not publish this replica's agents: %s", type(exc).__name__)

    def agents(self) -> list[AgentStatus]:
        """The whole fleet (on the calling thread: tests; servicers use `agents_async`)."""
        return self._merge(self._read())

    async def agents_async(self) -> list[AgentStatus]:
        """`agents`, its query on `serial`."""
        return self._merge(await self.serial.run(self._read))

    def _read(self) -> list[tuple[str]] | None:
        try:
            rows: list[tuple[str]] = self._conn().execute(
                "SELECT a.status FROM agents a JOIN replicas r ON r.replica = a.replica WHERE r.seen_at >= %s",
                (self._clock() - self.fresh_s,)).fetchall()
        except psycopg.OperationalError:
            return None
        return rows

    def _merge(self, rows: list[tuple[str]] | None) -> list[AgentStatus]:
        if rows is None:
            return self._tracker.list()  # the store is away: what this replica knows
        best = {a.node.id: dataclasses.replace(a, replica=self._replica) for a in self._tracker.list()}
        for (body,) in rows:
            status = codec.loads(AgentStatus, body)
            known = best.get(status.node.id)
            if known is None or (status.connected, status.last_seen) > (known.connected, known.last_seen):
                best[status.node.id] = status
        return [best[node] for node in sorted(best)]

    async def run(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        while not stop.is_set():
            await self.serial.run(self._write, *self._rows())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every_s)


#: Reports a replica holds between flushes. The buffer fills only while a flush waits on the
#: database; past this it drops the newest (counted in `dropped_full`): reports are soft state,
#: and ones that old would be dropped as stale when drained anyway.
MAX_BUFFERED_REPORTS = 10_000


class ReportRelay:
    """Buffer reports (node, request), at most `max_buffered`, and write them to `load_reports`
    every `flush_s`."""

    def __init__(self, conn: psycopg.Connection | Callable[[], psycopg.Connection], *, flush_s: float = 0.1,
                 stale_s: float = 10.0, clock: Callable[[], float] = time.time, serial: Serial | None = None,
                 max_buffered: int = MAX_BUFFERED_REPORTS) -> None:
        self._conn = getter(conn)
        self.serial = serial or Serial("relay")  # the thread `conn` is used on
        self.max_buffered = max_buffered
        self.dropped_full = 0
        self._buffer: list[tuple[str, bool, bytes, float]] = []
        self.flush_s = flush_s
        self.stale_s = stale_s
        self._clock = clock
        self.relayed = 0
        self.dropped_stale = 0

    def record(self, node: str, request: loadreport_pb2.StreamLoadStatsRequest) -> None:
        self._add((node, False, request.SerializeToString(), self._clock()))

    def gone(self, node: str) -> None:
        self._add((node, True, b"", self._clock()))

    def _add(self, row: tuple[str, bool, bytes, float]) -> None:
        if len(self._buffer) >= self.max_buffered:
            if self.dropped_full % 1000 == 0:
                log.warning("load-report relay full (%d waiting on the database): dropping reports", len(self._buffer))
            self.dropped_full += 1
            return
        self._buffer.append(row)

    def flush(self) -> None:
        """Write the buffer (on the calling thread: tests; `run` uses `serial`)."""
        self._write(self._take())

    def _take(self) -> list[tuple[str, bool, bytes, float]]:
        rows, self._buffer = self._buffer, []
        return rows

    def _write(self, rows: list[tuple[str, bool, bytes, float]]) -> None:
        if not rows:
            return
        try:
            with self._conn().cursor() as cur:
                cur.executemany("INSERT INTO load_reports(node, gone, body, at) VALUES (%s, %s, %s, %s)", rows)
            self.relayed += len(rows)
        except psycopg.Error as exc:  # soft state: lose this interval rather than block the loop on it
            log.warning("could not relay %d load reports: %s", len(rows), type(exc).__name__)

    def drain(self, conn: psycopg.Connection, limit: int = 10_000
              ) -> list[tuple[str, loadreport_pb2.StreamLoadStatsRequest | None]]:
        """Take every relayed report (the leader only): (node, request), or (node, None) when
        the node's stream ended, oldest first."""
        rows = conn.execute(
            "DELETE FROM load_reports WHERE id IN (SELECT id FROM load_reports ORDER BY id LIMIT %s "
            "FOR UPDATE SKIP LOCKED) RETURNING id, node, gone, body, at", (limit,)).fetchall()
        fresh_after = self._clock() - self.stale_s
        out: list[tuple[str, loadreport_pb2.StreamLoadStatsRequest | None]] = []
        for _, node, gone, body, at in sorted(rows):
            if gone:
                out.append((str(node), None))
            elif at < fresh_after:
                self.dropped_stale += 1
            else:
                out.append((str(node), loadreport_pb2.StreamLoadStatsRequest.FromString(bytes(body))))
        return out

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.flush_s)
            rows = self._take()  # on the loop, where `record` appends
            if rows:
                await self.serial.run(self._write, rows)


class StoreOutageInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A unary call that meets a lost database connection answers UNAVAILABLE ("retry"), not
    UNKNOWN with a driver's traceback; the connection is re-opened by the next call."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(request, context)
            except psycopg.OperationalError as exc:
                log.warning("%s: the shared store is unreachable (%s)", details.method, type(exc).__name__)
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"the shared store is unreachable ({type(exc).__name__}); retry shortly")

        return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


# -- TasksService on every replica --------------------------------------------------------------


class NoLeader(RuntimeError):
    pass


class LeaderLink:
    """Where the leader is (the election's row) and one channel to it, re-made when it moves."""

    def __init__(self, conn: psycopg.Connection | Callable[[], psycopg.Connection], self_address: str,
                 tls: ClientTls | None = None, serial: Serial | None = None) -> None:
        self._conn = getter(conn)
        self.serial = serial or Serial("leader-link")  # the thread `conn` is used on
        self._self = self_address
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._channel_address = ""
        self._retired: set[asyncio.Future[None]] = set()
        self.forwarded = 0

    async def channel(self) -> grpc.aio.Channel:
        try:
            info = await self.serial.run(lambda: current_leader(self._conn()))
        except psycopg.OperationalError as exc:
            raise NoLeader(f"the shared store is unreachable ({type(exc).__name__}); retry shortly") from exc
        if info is None or info.address == self._self:  # no leader yet, or it was us and we lost it
            raise NoLeader("no control-plane replica leads right now; retry shortly")
        if self._channel is None or self._channel_address != info.address:
            if self._channel is not None:  # the old leader's: close it once its calls are done
                closing = asyncio.ensure_future(self._channel.close(grace=5.0))
                self._retired.add(closing)
                closing.add_done_callback(self._retired.discard)
            self._channel = aio_channel(info.address, self._tls)
            self._channel_address = info.address
        self.forwarded += 1
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class _Router:
    """Serves a method locally when `local` is set (this replica leads), else forwards it."""

    stub_class: Any = None

    def __init__(self, link: LeaderLink) -> None:
        self.link = link
        self.local: Any = None


class TasksRouter(_Router):
    """TasksService on every replica: the leader's scheduler answers; followers forward."""

    stub_class = tasks_pb2_grpc.TasksServiceStub


class AdminRouter(_Router):
    """AdminService on every replica. What only the leader knows (GetStats, ListAlerts: its
    collector and alert evaluator) is forwarded to it; everything else the replica answers."""

    stub_class = admin_pb2_grpc.AdminServiceStub
    LEADER_METHODS = ("GetStats", "ListAlerts")

    def __init__(self, link: LeaderLink, servicer: admin_pb2_grpc.AdminServiceServicer) -> None:
        super().__init__(link)
        self._servicer = servicer

    def __getattr__(self, name: str) -> Any:  # the methods served here whoever leads
        return getattr(self._servicer, name)


def _forwarding(name: str, streaming_request: bool, streaming_response: bool) -> Callable[..., Any]:
    """A servicer method for `name` that serves locally on the leader and forwards otherwise,
    with the caller's metadata (its token) and what is left of its deadline."""

    async def target(router: _Router, context: grpc.aio.ServicerContext) -> tuple[Any, dict[str, Any]]:
        stub = getattr(router.stub_class(await router.link.channel()), name)
        metadata = tuple((k, v) for k, v in context.invocation_metadata() or () if not k.startswith("grpc-"))
        return stub, {"metadata": metadata, "timeout": context.time_remaining()}

    if streaming_response:
        async def stream_out(self: _Router, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if self.local is not None:
                async for item in getattr(self.local, name)(request, context):
                    yield item
                return
            try:
                stub, kwargs = await target(self, context)
                async for item in stub(request, **kwargs):
                    yield item
            except NoLeader as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
        return stream_out

    async def unary(self: _Router, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.local is not None:
            return await getattr(self.local, name)(request, context)
        try:
            stub, kwargs = await target(self, context)
            if streaming_request:
                items = [item async for item in request]  # blobs are chunked; forwarded whole
                return await stub(iter(items), **kwargs)
            return await stub(request, **kwargs)
        except NoLeader as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
    return unary


for _method in tasks_pb2.DESCRIPTOR.services_by_name["TasksService"].methods:
    setattr(TasksRouter, _method.name, _forwarding(_method.name, _method.client_streaming, _method.server_streaming))
for _name in AdminRouter.LEADER_METHODS:
    setattr(AdminRouter, _name, _forwarding(_name, False, False))
