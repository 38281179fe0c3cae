"""An even spread of one agent's connections over its `--workers` processes.

Each worker binds the shared port with SO_REUSEPORT, and the kernel puts each new connection on
one worker's listening socket by a hash of its addresses. With many clients that evens out; with
a few long-lived ones (one application server's pool of HTTP/2 channels) it does not: 16
connections were split 9/7, 11/5 and 12/4 over two workers, and 4 connections once all went to
one worker while the other idled.

With a spread, each worker still accepts from its own socket (no shared accept queue, no
thundering herd, no extra hop while the split is even), but a worker that accepts a connection
while it serves more of that door's connections than the least-loaded live worker passes it on:
the connection's descriptor goes over a Unix SOCK_SEQPACKET connection (SCM_RIGHTS) to that
worker's inbox in the supervisor's private directory, and that worker serves it as if it had
accepted it itself. Nothing has been read from the connection, so TLS and both protocols are
untouched by the move.

Each worker publishes its count in a small table the supervisor creates (one file per door,
mapped by every worker): slot k is worker k's open connections (DOWN while it is not serving),
then a matrix of the connections worker k received from each other worker (written by k) and
one of those each worker passed to each other (written by the sender): their difference is what
is still in flight, and counts as the receiver's load for everyone. When a hand-off
cannot be made (the other worker just exited, its queue is full: the kernel bounds it), the
worker serves the connection itself.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import mmap
import os
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("switchgear.rpc.spread")

DOWN = 1 << 62  # a slot's value while its worker is not serving that door
SPREADS = ("even", "kernel")  # --worker-spread: passed on to the least-loaded worker, or left where the kernel put it
ACCEPT_BATCH = 64  # connections accepted per wake-up at most (as asyncio's own accept loop)
ACCEPT_RETRY_S = 1.0  # out of descriptors: accepting pauses this long (as asyncio's)
MAX_SENDERS = 4 * 256  # connections to a worker's inbox at once (each other worker keeps one; restarts add)
_WORD = 8
_SENDER = struct.Struct("=H")


@dataclass(frozen=True)
class Group:
    """Where the workers of one agent meet (the supervisor's private directory), which worker
    this is, and how many there are."""

    directory: str
    index: int
    workers: int


def _received(workers: int, k: int, sender: int) -> int:
    """The table's word counting what worker k received from `sender` (written by k)."""
    return workers + k * workers + sender


def _sent(workers: int, sender: int, k: int) -> int:
    """The table's word counting what `sender` passed to worker k (written by the sender)."""
    return workers + workers * workers + sender * workers + k


def _load(words: memoryview, workers: int, k: int, held: int) -> int:
    """Worker k's connections: those it holds, and those passed to it that it has not received."""
    return held + sum(max(0, words[_sent(workers, i, k)] - words[_received(workers, k, i)])
                      for i in range(workers) if i != k)


def table_path(directory: str, door: str) -> Path:
    return Path(directory) / f"spread-{door}.table"


def inbox_path(directory: str, door: str, index: int) -> str:
    return str(Path(directory) / f"w{index}-{door}.inbox")


def create_table(directory: str, door: str, workers: int) -> None:
    """The supervisor's: a table with every worker DOWN and nothing passed on yet."""
    words = array.array("q", [DOWN] * workers + [0] * 2 * workers * workers)
    table_path(directory, door).write_bytes(words.tobytes())


def mark_down(directory: str, door: str, workers: int, index: int) -> None:
    """The supervisor's, when worker `index` exits: the others stop passing it connections, and
    what they passed it that it never received is written off (closed with its inbox)."""
    path = table_path(directory, door)
    with contextlib.suppress(FileNotFoundError), path.open("r+b") as f, \
            mmap.mmap(f.fileno(), 0) as mapped, memoryview(mapped) as view, view.cast("q") as words:
        words[index] = DOWN
        for sender in range(workers):
            words[_received(workers, index, sender)] = words[_sent(workers, sender, index)]


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """`host:port` bound with SO_REUSEPORT (beside the other workers') and listening."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def held(directory: str, door: str, workers: int) -> list[int | None]:
    """Each worker's open connections on `door` as the table says (None: not serving)."""
    try:
        words = array.array("q", table_path(directory, door).read_bytes()[:workers * _WORD])
    except (FileNotFoundError, ValueError):
        return [None] * workers
    return [None if n >= DOWN else n for n in words]


class Spread:
    """One worker's side of the spread for one door (module docstring)."""

    def __init__(self, group: Group, door: str) -> None:
        self.index, self.workers, self.door = group.index, group.workers, door
        self._directory = group.directory
        with table_path(group.directory, door).open("r+b") as f:
            self._mapped = mmap.mmap(f.fileno(), 0)
        self._words = memoryview(self._mapped).cast("q")
        if len(self._words) != self.workers * (2 * self.workers + 1):
            raise ValueError(f"spread table for {door} does not fit {self.workers} workers")
        # (The counts go on from this worker's previous process: each only grows.)
        path = inbox_path(group.directory, door, group.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous process
        # Connected SOCK_SEQPACKET, not datagrams: a datagram queue holds net.unix.max_dgram_qlen
        # messages (10 by default), which a burst of 64 connections fills before the other worker's
        # loop reads it; a connection's queue is bounded by its socket buffer instead.
        self._inbox = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._inbox.bind(path)
        self._inbox.listen(self.workers)
        self._inbox.setblocking(False)
        self._outboxes: dict[int, socket.socket] = {}  # to each other worker, connected when first needed
        self._senders: set[socket.socket] = set()  # other workers' connections to this one
        self.live = 0  # connections the door serves now (its server says)
        self.starting = 0  # accepted or received, not yet the server's (TLS handshake, connection_made)
        self._promoted = 0  # became the server's before their acceptor's task saw them set up
        self.passed = self.received = 0
        self._serving = False
        self._closed = False

    # --- the table -------------------------------------------------------------------------------

    def serving(self, live: int) -> None:
        """The door serves `live` connections now (called on every open and close)."""
        if live > self.live:  # connections the acceptor started are the server's now: not counted twice
            made = min(live - self.live, self.starting)
            self.starting -= made
            self._promoted += made
        self.live = live
        self.publish()

    def started(self) -> None:
        """The acceptor began serving a connection (accepted here or received)."""
        self.starting += 1
        self.publish()

    def settled(self, made: bool) -> None:
        """A connection the acceptor began serving is set up (`made`: its protocol has it, counted
        by its server or refused by it) or failed (a TLS handshake, a peer already gone)."""
        if made and self._promoted:
            self._promoted -= 1  # its server counted it (or another's, which then settles the other way)
        else:
            self.starting = max(0, self.starting - 1)
        self.publish()

    def publish(self) -> None:
        if self._serving and not self._closed:
            self._words[self.index] = self.live + self.starting

    def target(self) -> int | None:
        """The worker a new connection should go to when not this one: the least-loaded live
        worker, when it has fewer than this one. Each worker's load counts the connections passed
        to it that it has not received yet, this one's included: two workers passing to each
        other at once in a burst would otherwise each see itself too light and keep its own."""
        words, n, me = self._words, self.workers, self.index
        least, best = _load(words, n, me, self.live + self.starting), None
        for k in range(n):
            held = words[k]
            if k == me or held >= DOWN:
                continue
            load = _load(words, n, k, held)
            if load < least:
                least, best = load, k
        return best

    def pass_on(self, conn: socket.socket, k: int) -> bool:
        """Send `conn` to worker `k`; False when it cannot take it now (then serve it here)."""
        message = [_SENDER.pack(self.index)]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))]
        for attempt in (1, 2):  # a second time on a new connection when the first was to an exited process
            try:
                outbox = self._outboxes.get(k) or self._connect(k)
                outbox.sendmsg(message, rights, socket.MSG_NOSIGNAL)
                break
            except OSError as exc:  # gone (ECONNREFUSED, ENOENT, EPIPE) or its queue is full (EAGAIN)
                if exc.errno != errno.EAGAIN:
                    dropped = self._outboxes.pop(k, None)
                    if dropped is not None:
                        dropped.close()
                    if attempt == 1 and exc.errno in (errno.EPIPE, errno.ECONNRESET):
                        continue
                log.debug("%s connection not passed to w%d (%s): served here", self.door, k,
                          errno.errorcode.get(exc.errno or 0, exc))
                return False
        self._words[_sent(self.workers, self.index, k)] += 1
        self.passed += 1
        return True

    def _connect(self, k: int) -> socket.socket:
        outbox = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        outbox.setblocking(False)
        try:
            outbox.connect(inbox_path(self._directory, self.door, k))
        except OSError:
            outbox.close()
            raise
        self._outboxes[k] = outbox
        return outbox

    # --- receiving -------------------------------------------------------------------------------

    def start(self, serve: Callable[[socket.socket], None]) -> None:
        """Serve what other workers pass on, and tell them this worker takes connections."""
        if self._serving or self._closed:
            return  # (a door listening on two addresses has an acceptor for each)
        asyncio.get_running_loop().add_reader(self._inbox.fileno(), self._accept_sender, serve)
        self._serving = True
        self.publish()

    def _accept_sender(self, serve: Callable[[socket.socket], None]) -> None:
        while True:
            try:
                sender, _ = self._inbox.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s spread inbox: %s", self.door, exc)
                return
            if len(self._senders) >= MAX_SENDERS:  # not the other workers' few: refused
                sender.close()
                continue
            sender.setblocking(False)
            self._senders.add(sender)
            asyncio.get_running_loop().add_reader(sender.fileno(), self._receive, sender, serve)

    def _receive(self, sender_sock: socket.socket, serve: Callable[[socket.socket], None]) -> None:
        space = socket.CMSG_SPACE(array.array("i").itemsize * 4)
        while True:
            try:
                data, ancillary, flags, _address = sender_sock.recvmsg(_SENDER.size, space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancillary, flags = b"", [], 0
            if not data and not ancillary:  # that worker closed its end (it exited)
                self._forget(sender_sock)
                return
            fds = array.array("i")
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            conns = []
            for fd in fds:
                try:
                    conns.append(socket.socket(fileno=fd))
                except OSError:  # not a socket
                    os.close(fd)
            if len(data) != _SENDER.size or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 1 or \
                    len(conns) != 1 or conns[0].type != socket.SOCK_STREAM or _SENDER.unpack(data)[0] >= self.workers:
                for conn in conns:  # not a worker's hand-off (only this user can reach the directory)
                    conn.close()
                continue
            sender = _SENDER.unpack(data)[0]
            self._words[_received(self.workers, self.index, sender)] += 1
            self.received += 1
            serve(conns[0])

    def _forget(self, sender: socket.socket) -> None:
        self._senders.discard(sender)
        with contextlib.suppress(RuntimeError, ValueError):  # the loop already closed; the socket too
            asyncio.get_running_loop().remove_reader(sender.fileno())
        sender.close()

    def close(self) -> None:
        """Take no more connections: others stop passing them here, and what is queued closes."""
        if self._closed:
            return
        self._closed = True
        self._words[self.index] = DOWN
        with contextlib.suppress(RuntimeError):  # the loop already closed
            asyncio.get_running_loop().remove_reader(self._inbox.fileno())
        self._inbox.close()
        for sender in list(self._senders):
            self._forget(sender)
        for outbox in self._outboxes.values():
            outbox.close()
        self._outboxes.clear()
        with contextlib.suppress(OSError):
            os.unlink(inbox_path(self._directory, self.door, self.index))


class Acceptor:
    """Serves `sock` (bound and listening) like `loop.create_server(factory, sock=sock, ...)`, with
    each connection it accepts placed by `spread` (module docstring). Enough of
    asyncio.AbstractServer for the gRPC server and aiohttp's site: close, wait_closed, sockets."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol], spread: Spread,
                 ssl_context: ssl.SSLContext | None = None, handshake_timeout_s: float | None = None) -> None:
        self._sock = sock
        self._factory = factory
        self.spread = spread
        self._ssl = ssl_context
        self._handshake_timeout_s = handshake_timeout_s
        self._loop = asyncio.get_running_loop()
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        sock.setblocking(False)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._accept)
        self.spread.start(self.serve)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: pause, as asyncio's loop does
                log.error("%s door: accepting connections failed (%s); trying again in %g s", self.spread.door,
                          exc.strerror or exc, ACCEPT_RETRY_S)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_S, self._resume)
                return
            k = self.spread.target()
            if k is not None and self.spread.pass_on(conn, k):
                conn.close()  # the other worker holds it now
                continue
            self.serve(conn)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def serve(self, conn: socket.socket) -> None:
        """Serve `conn` here (accepted, or passed on by another worker)."""
        if self._closed:
            conn.close()
            return
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.spread.started()
        task = self._loop.create_task(self._connect(conn))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        made = False
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl,
                                                     ssl_handshake_timeout=self._handshake_timeout_s
                                                     if self._ssl is not None else None)
            made = True
        except (OSError, ssl.SSLError, TimeoutError) as exc:  # a failed handshake, a peer already gone
            log.debug("%s door: connection not served: %r", self.spread.door, exc)
            conn.close()
        finally:
            self.spread.settled(made)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.spread.close()
        with contextlib.suppress(RuntimeError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def wait_closed(self) -> None:
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)

    def is_serving(self) -> bool:
        return not self._closed

    def get_loop(self) -> Any:
        return self._loop
