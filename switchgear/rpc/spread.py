"""An even spread of one agent's connections over its `--workers` processes.

Each worker binds the shared port with SO_REUSEPORT, and the kernel puts each new connection on
one worker's listening socket by a hash of its addresses. With many clients that evens out; with
a few long-lived ones (one application server's pool of 16 HTTP/2 channels) it does not: 9/7,
11/5 and 12/4 were measured, and the worker holding fewer connections idles while the other is
short of a core.

With a spread, each worker still accepts from its own socket (no shared accept queue, no
thundering herd, no extra hop while the split is even), but a worker that accepts a connection
while it serves more of that door's connections than the least-loaded live worker passes it on:
the connection's descriptor goes over a Unix datagram socket (SCM_RIGHTS) in the supervisor's
private directory, and that worker serves it as if it had accepted it itself. Nothing has been
read from the connection, so TLS and both protocols are untouched by the move.

Each worker publishes its count in a small table the supervisor creates (one file per door,
mapped by every worker): slot k is worker k's open connections (DOWN while it is not serving),
then worker k's epoch (one more with each process: a restarted worker starts afresh), and row k
of the matrix after them counts the connections worker k received from each other worker, so a
sender knows which of the ones it passed on are still in flight. When a hand-off
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
    """The table's word counting what worker k received from `sender` (after the open counts and
    the epochs)."""
    return 2 * workers + k * workers + sender


def table_path(directory: str, door: str) -> Path:
    return Path(directory) / f"spread-{door}.table"


def inbox_path(directory: str, door: str, index: int) -> str:
    return str(Path(directory) / f"w{index}-{door}.inbox")


def create_table(directory: str, door: str, workers: int) -> None:
    """The supervisor's: a table with every worker DOWN and nothing passed on yet."""
    words = array.array("q", [DOWN] * workers + [0] * workers + [0] * workers * workers)
    table_path(directory, door).write_bytes(words.tobytes())


def mark_down(directory: str, door: str, workers: int, index: int) -> None:
    """The supervisor's, when worker `index` exits: the others stop passing it connections.
    Its received counts restart from zero with it (the senders' counts are of the old one)."""
    path = table_path(directory, door)
    with contextlib.suppress(FileNotFoundError), path.open("r+b") as f, \
            mmap.mmap(f.fileno(), 0) as mapped, memoryview(mapped) as view, view.cast("q") as words:
        words[index] = DOWN
        for sender in range(workers):
            words[_received(workers, index, sender)] = 0


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
        if len(self._words) != self.workers * (self.workers + 2):
            raise ValueError(f"spread table for {door} does not fit {self.workers} workers")
        self._sent = [0] * self.workers  # passed to each worker's current process
        self._epochs = [0] * self.workers  # which process that is (its slot's epoch when last looked at)
        first = _received(self.workers, self.index, 0)
        self._words[first:first + self.workers] = array.array("q", [0] * self.workers)  # then the new epoch:
        self._words[self.workers + self.index] += 1  # a sender that sees it sees the zeros
        path = inbox_path(group.directory, door, group.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous process
        self._inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._inbox.bind(path)
        self._inbox.setblocking(False)
        self._outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outbox.setblocking(False)
        self.live = 0  # connections the door serves now (its server says)
        self.starting = 0  # accepted or received, not yet the server's (TLS handshake, connection_made)
        self.passed = self.received = 0
        self._serving = False
        self._closed = False

    # --- the table -------------------------------------------------------------------------------

    def serving(self, live: int) -> None:
        """The door serves `live` connections now (called on every open and close)."""
        self.live = live
        self.publish()

    def publish(self) -> None:
        if self._serving and not self._closed:
            self._words[self.index] = self.live + self.starting

    def target(self) -> int | None:
        """The worker a new connection should go to when not this one: the least-loaded live
        worker, when it serves fewer than this one (counting what this one passed it that it has
        not received yet)."""
        words, n, me = self._words, self.workers, self.index
        least, best = self.live + self.starting, None
        for k in range(n):
            held = words[k]
            if k == me or held >= DOWN:
                continue
            if self._epochs[k] != words[n + k]:  # a new process in that slot: what went to the old is moot
                self._epochs[k], self._sent[k] = words[n + k], 0
            load = held + max(0, self._sent[k] - words[_received(n, k, me)])
            if load < least:
                least, best = load, k
        return best

    def pass_on(self, conn: socket.socket, k: int) -> bool:
        """Send `conn` to worker `k`; False when it cannot take it now (then serve it here)."""
        try:
            self._outbox.sendmsg([_SENDER.pack(self.index)],
                                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))],
                                 0, inbox_path(self._directory, self.door, k))
        except OSError as exc:  # gone (ECONNREFUSED, ENOENT) or its queue is full (EAGAIN)
            log.debug("%s connection not passed to w%d (%s): served here", self.door, k,
                      errno.errorcode.get(exc.errno or 0, exc))
            return False
        self._sent[k] += 1
        self.passed += 1
        return True

    # --- receiving -------------------------------------------------------------------------------

    def start(self, serve: Callable[[socket.socket], None]) -> None:
        """Serve what other workers pass on, and tell them this worker takes connections."""
        if self._serving or self._closed:
            return  # (a door listening on two addresses has an acceptor for each)
        asyncio.get_running_loop().add_reader(self._inbox.fileno(), self._receive, serve)
        self._serving = True
        self.publish()

    def _receive(self, serve: Callable[[socket.socket], None]) -> None:
        space = socket.CMSG_SPACE(array.array("i").itemsize * 4)
        while True:
            try:
                data, ancillary, flags, _address = self._inbox.recvmsg(_SENDER.size, space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s spread inbox: %s", self.door, exc)
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

    def close(self) -> None:
        """Take no more connections: others stop passing them here, and what is queued closes."""
        if self._closed:
            return
        self._closed = True
        self._words[self.index] = DOWN
        with contextlib.suppress(RuntimeError):  # the loop already closed
            asyncio.get_running_loop().remove_reader(self._inbox.fileno())
        self._inbox.close()
        self._outbox.close()
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
        self.spread.starting += 1
        self.spread.publish()
        task = self._loop.create_task(self._connect(conn))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl,
                                                     ssl_handshake_timeout=self._handshake_timeout_s
                                                     if self._ssl is not None else None)
        except (OSError, ssl.SSLError, TimeoutError) as exc:  # a failed handshake, a peer already gone
            log.debug("%s door: connection not served: %r", self.spread.door, exc)
            conn.close()
        finally:
            self.spread.starting -= 1
            self.spread.publish()

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
