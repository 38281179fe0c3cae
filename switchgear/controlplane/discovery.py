"""The snapshot stream: how snapshots reach agents (what to send is snapshot.py's job).

Protocol, per stream (see discovery.proto):
- the first request names the node and the version it holds;
- the control plane sends the current snapshot only when the agent does not hold it and has
  not rejected it before, and never has more than one response unanswered;
- each response carries a fresh nonce (unique in this process: a per-process random prefix and a
  counter; it only matches answers to pushes on the agent's own authenticated stream); an answer
  with another nonce is stale and ignored;
- an answer with error_detail is a NACK: the version is remembered as rejected for that node;
- every request lists the services of the version it names that the agent did not apply
  (per-resource rejections, version skew): they are recorded for ListAgents and ListServices;
- an agent that asked for deltas (delivery on its first request) is sent what changed since the
  version it holds when the feed's change log still has that version, else the whole snapshot; a
  NACK at RESYNC_PATH asks for the whole snapshot and rejects nothing. Each version's responses
  are serialised once per base version and shared by every stream (the nonce is appended);
- a change to the registry wakes every stream `debounce_s` after it (one timer for all), so a
  burst of changes goes out as one snapshot;
- at most `max_concurrent_pushes` large pushes (BOUNDED_PUSH_BYTES and more: whole snapshots of
  a large registry) are unanswered across all streams at once: such a push holds a slot from
  send until its ACK/NACK (or the stream's end), so when every agent reconnects at once (a
  restarted control plane) the pushes go out in bounded waves instead of a thundering herd of
  buffers. Smaller pushes (deltas, small registries) take no slot: at most one is unanswered
  per stream and they are serialised once per version, so they are bounded by the stream count
  times their size, and waves would only delay them (bench/controlplane/README.md);
- ACKs are logged once per version at info ("version X: N of M agents ACKed in T s ..."), each
  agent's ACK at debug (a line per agent per change is 10,000 records per change at 10,000
  agents); NACKs and per-service rejections are logged per agent, as warnings.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable

import grpc

from switchgear.controlplane import convert
from switchgear.controlplane import snapshot as snap
from switchgear.controlplane.agent_auth import REPORT_TOKEN_HEADER, NodeSessions
from switchgear.controlplane.agents import AgentTracker, Nack, Rejection
from switchgear.controlplane.snapshot import Snapshot
from switchgear.v1 import discovery_pb2, discovery_pb2_grpc

log = logging.getLogger("switchgear.controlplane.discovery")

#: Bounds on what one agent's rejection list may hold in the tracker (entries; characters).
MAX_REJECTIONS = 1000
MAX_REJECTION_TEXT = 1024
#: Versions the control plane remembers what changed in (--delta-history): an agent at one of
#: them gets a delta, an agent further behind the whole snapshot.
DELTA_HISTORY = 64
#: Pushes of at least this many bytes take a slot of --max-concurrent-pushes (module docstring).
BOUNDED_PUSH_BYTES = 64 * 1024
#: The NACK field path by which an agent says a delta's base is not the version it holds: asks
#: for the whole snapshot and rejects nothing.
RESYNC_PATH = "base_version"


class SnapshotFeed:
    """The current snapshot, what changed in the last `history` versions, and the responses
    agents are sent, each serialised once per version; plus a change signal.

    `body(base)` is the response (nonce aside) for an agent at version `base` that asked for
    deltas: a SnapshotDelta when `base` is in the change log, else the whole snapshot. The
    bytes are shared by every agent at the same base (at most `history` + 1 per version), so a
    change fans out as one serialisation, not one per agent.

    Use from the event loop only. `changed()` returns an event that is set on the next publish.
    """

    def __init__(self, snapshot: Snapshot, history: int = DELTA_HISTORY) -> None:
        self._current = snapshot
        self._served = snap.served_specs(snapshot)
        self._log = snap.ChangeLog(history)
        self._bodies: dict[str, bytes] = {}  # base version ("" = whole) -> response body, this version only
        self._changed = asyncio.Event()
        self._published: asyncio.Future[None] | None = None
        self._debounce_s = 0.0

    @property
    def current(self) -> Snapshot:
        return self._current

    def body(self, base: str | None) -> tuple[bytes, bool]:
        """The serialised response for an agent at `base` (None: one that wants whole snapshots),
        and whether it is a delta. Bounded memory: only bases found in the log are kept."""
        if base and base in self._bodies:
            return self._bodies[base], True
        changes = self._log.since(base, self._served) if base else None
        response = discovery_pb2.StreamSnapshotsResponse(version_info=self._current.version)
        if changes is None or base is None:
            if "" not in self._bodies:
                response.snapshot.CopyFrom(convert.snapshot_to_proto(self._current))
                self._bodies[""] = response.SerializeToString()
            return self._bodies[""], False
        response.delta.CopyFrom(convert.delta_to_proto(self._current, base, changes))
        self._bodies[base] = response.SerializeToString()
        return self._bodies[base], True

    def publish(self, snapshot: Snapshot) -> None:
        if snapshot.version != self._current.version:
            served = snap.served_specs(snapshot)
            self._log.record(self._current.version, snap.served_changes(self._current, snapshot, self._served, served))
            self._served = served
            self._bodies = {}
        self._current = snapshot
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        published, self._published = self._published, None
        if published is not None and not published.done():
            if self._debounce_s > 0:
                published.get_loop().call_later(self._debounce_s, _resolve, published)
            else:
                published.set_result(None)

    def changed(self) -> asyncio.Event:
        return self._changed

    def next_publish(self, debounce_s: float = 0.0) -> asyncio.Future[None]:
        """A future done `debounce_s` after the next publish, shared by every waiter (never
        cancel it): one future and one timer per version instead of a task and a sleep per
        stream per wake-up (bench/controlplane). The first caller's `debounce_s` holds."""
        if self._published is None:
            self._published = asyncio.get_running_loop().create_future()
            self._debounce_s = debounce_s
        return self._published


#: Nonces: unique in this process and not guessable across restarts; a counter, not a random
#: number per push (the nonce only tells an answer to this stream's push from a stale one).
_NONCE_PREFIX = secrets.token_hex(4)
_nonces = itertools.count(1)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _serialise(response: discovery_pb2.StreamSnapshotsResponse | bytes) -> bytes:
    """Responses go out as bytes already (a shared body and the stream's nonce, concatenated:
    protobuf merges concatenated messages); a message is serialised as usual."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_to_server(servicer: DiscoveryServicer, server: grpc.aio.Server) -> None:
    """Register `servicer` as the generated add_DiscoveryServiceServicer_to_server does, with a
    serialiser that passes the stream's pre-serialised responses through."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.StreamSnapshots, request_deserializer=discovery_pb2.StreamSnapshotsRequest.FromString,
        response_serializer=_serialise)
    name = discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {"StreamSnapshots": handler}),))


class _Tally:
    """How the agents answered the pushes of the current version, logged once per version: when
    every push of it was answered (or its stream ended), or when a newer version's first push
    supersedes it with some still pending. Use from the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.version = ""
        self.started = 0.0
        self.sent = self.acked = self.nacked = self.gone = 0

    def pushed(self, version: str) -> None:
        if version != self.version:
            self._log()
            self.version = version
        if not self.sent:
            self.started = self._clock()
        self.sent += 1

    def answered(self, version: str, *, acked: bool = False, nacked: bool = False) -> None:
        """An ACK, a NACK or neither (the stream ended, the agent asked to resynchronise)."""
        if version != self.version or not self.sent:
            return  # an answer to a superseded version: counted as pending in its line
        if acked:
            self.acked += 1
        elif nacked:
            self.nacked += 1
        else:
            self.gone += 1
        if self.acked + self.nacked + self.gone == self.sent:
            self._log()

    def _log(self) -> None:
        if not self.sent:
            return
        pending = self.sent - self.acked - self.nacked - self.gone
        log.info("version %s: %d of %d agents ACKed in %.2f s (%d NACKed, %d ended or resynchronised, %d pending)",
                 self.version, self.acked, self.sent, self._clock() - self.started, self.nacked, self.gone, pending)
        self.sent = self.acked = self.nacked = self.gone = 0


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    def __init__(
        self, feed: SnapshotFeed, tracker: AgentTracker, *, debounce_s: float = 0.05, max_concurrent_pushes: int = 256,
        sessions: NodeSessions | None = None,
    ) -> None:
        self._sessions = sessions or NodeSessions()  # the load-report streams' node tokens (agent_auth.py)
        self._feed = feed
        self._tracker = tracker
        self._debounce_s = debounce_s
        self._pushes = asyncio.Semaphore(max_concurrent_pushes)
        self._tally = _Tally()

    async def StreamSnapshots(  # noqa: N802 (generated name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.StreamSnapshotsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if not first.node.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node.id: required on the first request")
        node = convert.node_from_proto(first.node)
        report_token = self._sessions.open(node.id)
        await context.send_initial_metadata(((REPORT_TOKEN_HEADER, report_token),))
        delta = first.delivery == discovery_pb2.SNAPSHOT_DELIVERY_DELTA
        self._tracker.connected(node, context.peer(), first.version_info, _rejections(first),
                                "delta" if delta else "whole")
        log.info("agent %s connected from %s holding %r (%s snapshots)", node.id, context.peer(),
                 first.version_info[:200], "delta" if delta else "whole")
        stream = _Stream(node.id, first.version_info, self._feed, self._tracker, self._debounce_s, self._pushes, delta,
                         self._tally)
        try:
            async for response in stream.run(request_iterator):
                yield response
        finally:
            self._sessions.close(node.id, report_token)
            self._tracker.disconnected(node.id)
            log.info("agent %s disconnected", node.id)


class _Stream:
    def __init__(
        self, node_id: str, held: str, feed: SnapshotFeed, tracker: AgentTracker, debounce_s: float,
        pushes: asyncio.Semaphore | None = None, delta: bool = False, tally: _Tally | None = None,
    ) -> None:
        self.tally = tally or _Tally()
        self.pushes = pushes or asyncio.Semaphore(1)
        self.holding = False
        self.node_id = node_id
        self.held = held
        self.delta = delta  # the agent asked for deltas (and has not asked to resynchronise since)
        self.feed = feed
        self.tracker = tracker
        self.debounce_s = debounce_s
        self.pending_nonce = ""
        self.pending_version = ""
        self._waiter: asyncio.Future[None] | None = None
        self._registered: asyncio.Future[None] | None = None  # the publish future _wake is on

    def _next(self) -> bytes | None:
        current = self.feed.current.version
        if self.pending_nonce or current == self.held or self.tracker.rejected(self.node_id, current):
            return None
        self.pending_nonce, self.pending_version = f"{_NONCE_PREFIX}{next(_nonces):08x}", current
        self.tracker.sent(self.node_id, current)
        self.tally.pushed(current)
        body, _ = self.feed.body(self.held if self.delta else None)
        nonce: bytes = discovery_pb2.StreamSnapshotsResponse(nonce=self.pending_nonce).SerializeToString()
        return body + nonce

    def _answer(self, request: discovery_pb2.StreamSnapshotsRequest) -> None:
        if not self.pending_nonce or request.response_nonce != self.pending_nonce:
            log.debug("agent %s: stale nonce %r ignored", self.node_id, request.response_nonce)
            return
        if request.HasField("error_detail") and request.error_detail.field_path == RESYNC_PATH:
            # Not a rejection: the agent holds another version than the delta's base; it gets
            # the whole snapshot next (always safe), and deltas again after it.
            log.warning("agent %s asked to resynchronise (holding %r)", self.node_id, request.version_info[:200])
            self.tally.answered(self.pending_version)
            self.held = ""
            self.pending_nonce = self.pending_version = ""
            self._release()
            return
        if request.HasField("error_detail"):
            detail = request.error_detail
            nack = Nack(self.pending_version, detail.field_path, detail.message)
            self.tracker.nacked(self.node_id, request.version_info, nack, _rejections(request))
            log.warning("agent %s NACKed %s: %s: %s", self.node_id, nack.version, nack.field_path, nack.message)
            self.tally.answered(self.pending_version, nacked=True)
        else:
            rejections = _rejections(request)
            self.tracker.acked(self.node_id, request.version_info, rejections)
            self.tally.answered(self.pending_version, acked=True)
            log.debug("agent %s ACKed %s", self.node_id, request.version_info)
            for r in rejections:
                log.warning("agent %s did not apply service %r of %s: %s: %s",
                            self.node_id, r.service, request.version_info, r.field_path, r.message)
        self.held = request.version_info
        self.pending_nonce = self.pending_version = ""
        self._release()

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self.pushes.release()

    def _large(self) -> bool:
        """Whether the next push takes a slot of the fleet-wide bound (module docstring)."""
        body, _ = self.feed.body(self.held if self.delta else None)
        return len(body) >= BOUNDED_PUSH_BYTES

    def _wants(self) -> bool:
        current = self.feed.current.version
        return not (self.pending_nonce or current == self.held or self.tracker.rejected(self.node_id, current))

    async def run(self, requests: AsyncIterator[discovery_pb2.StreamSnapshotsRequest]) -> AsyncIterator[bytes]:
        """Pushes from here; the answers are read by one reader task for the stream's life (not a
        task per message), which wakes this loop after each."""
        reader = asyncio.ensure_future(self._read(requests))
        reader.add_done_callback(self._wake)
        try:
            while not reader.done():
                if self._wants() and not self.holding and self._large():
                    await self.pushes.acquire()  # bounded large pushes fleet-wide
                    self.holding = True
                response = self._next()
                if response is not None:
                    yield response
                else:
                    self._release()
                await self._wait(reader)
            reader.result()  # the reader's error, if any, ends the stream with it
        finally:
            if self.pending_nonce:
                self.tally.answered(self.pending_version)
            self._release()
            reader.cancel()
            if self._registered is not None:  # a stream that ends leaves nothing on the shared future
                self._registered.remove_done_callback(self._wake)

    async def _read(self, requests: AsyncIterator[discovery_pb2.StreamSnapshotsRequest]) -> None:
        async for request in requests:
            self._answer(request)
            if self._wants():
                self._wake(None)
            else:  # nothing to send before the next publish: the pushing side sleeps on
                self._arm()

    async def _wait(self, reader: asyncio.Future[None]) -> None:
        """Until an answer was read, the stream ended or the feed publishes (debounced; not while
        a push is unanswered: nothing else can be sent before its answer). Not asyncio.wait: that
        removes its callback from the shared publish future whenever the other side wins, a scan
        of every stream's callback, so a change to N streams cost O(N^2). Here each stream
        registers on each publish future once and leaves it there until it fires (or the
        stream ends)."""
        if reader.done() or (not self.pending_nonce and self._wants()):
            return  # (the latter: an answer read before this loop resumed from its push)
        self._waiter = asyncio.get_running_loop().create_future()
        if not self.pending_nonce:
            self._arm()
        await self._waiter

    def _arm(self) -> None:
        """Wake on the next publish (debounced); now if it came already."""
        changed = self.feed.next_publish(self.debounce_s)
        if changed.done():
            self._wake(None)
        elif self._registered is not changed:
            changed.add_done_callback(self._wake)
            self._registered = changed

    def _wake(self, _: object) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _rejections(request: discovery_pb2.StreamSnapshotsRequest) -> tuple[Rejection, ...]:
    """What the agent says it did not apply, bounded: at most MAX_REJECTIONS entries of at most
    MAX_REJECTION_TEXT characters per field are kept (an agent cannot fill the tracker)."""
    if not request.rejected_services:  # the common case, once per agent per change
        return ()

    def cut(text: str) -> str:
        return text[:MAX_REJECTION_TEXT]

    return tuple(
        Rejection(cut(r.service), cut(r.error_detail.field_path), cut(r.error_detail.message))
        for r in request.rejected_services[:MAX_REJECTIONS]
    )
