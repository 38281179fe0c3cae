"""RFC 9113 and RFC 7541 conformance of switchgear.rpc, case by case as h2spec walks an HTTP/2
server: its generic section, RFC 9113 3.5 (preface), 4 (frames, frame size, header
compression), 5 (stream states and identifiers, concurrency, priority, error handling,
extensions), 6 (each frame type), 7 (error codes), 8 (messages, header fields, pseudo-headers,
connection-specific headers, push) and HPACK (RFC 7541 2.3, 4.2, 5.2, 6). Each case's id names
the clause and its expected outcome: GOAWAY with a code (a connection error), RST_STREAM with a
code (a stream error), a response, or a connection that stays usable (a PING answered).

Where h2spec accepts either a stream or a connection error, the case states the one this server
gives. The server is one real switchgear.rpc.Server on port 0, run on its own event loop thread
for the module; each case opens its own connection with raw frames over a blocking socket.
The server's PING strikes are off here (cases check liveness with PINGs); every other limit is
at its default except the stream limit, 10, so that 5.1.2 needs few streams.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc
import grpc.aio
import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

from switchgear.rpc.http2 import Limits, _int, frame
from switchgear.rpc.server import Server
from tests.test_rpc_server import BLOCK, ECHO, Frame, Probe, handlers, message

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0
MAX_STREAMS = 10
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)

# Wire values from RFC 9113 (sections 3.4, 6 and 7), stated here rather than taken from the server under test.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL, FLOW, CLOSED, SIZE, REFUSED, CANCEL, COMPRESSION = 0x0, 0x1, 0x3, 0x5, 0x6, 0x7, 0x8, 0x9
ENABLE_PUSH, INITIAL_WINDOW, MAX_FRAME_SIZE = 0x2, 0x4, 0x5
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# --- the server, once per module ----------------------------------------------------------------


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    server = Server(limits=Limits(max_concurrent_streams=MAX_STREAMS, ping_strikes=0))
    server.add_generic_rpc_handlers((handlers(Probe()), hold_handler()))
    bound = server.add_insecure_port("127.0.0.1:0")
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(WAIT)
    try:
        yield bound
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()


HOLD = "/t.Conformance/Hold"


def hold_handler() -> grpc.GenericRpcHandler:
    async def hold(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.Event().wait()  # reads nothing: the stream's window is never given back
        return b""

    return grpc.method_handlers_generic_handler("t.Conformance", {"Hold": grpc.stream_unary_rpc_method_handler(hold)})


# --- a raw peer -----------------------------------------------------------------------------------


class Peer:
    """A client speaking raw frames. `handshake` sends the preface and SETTINGS and
    acknowledges the server's SETTINGS, as every client does."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.buf = b""
        self.encoder = hpack.Encoder()

    def handshake(self, settings: tuple[tuple[int, int], ...] = ()) -> Peer:
        self.send(PREFACE + frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(*s) for s in settings)))
        while not ((got := self.read()) and got.kind == SETTINGS and not got.flags & ACK):
            assert got is not None, "closed during the handshake"
        self.send(frame(SETTINGS, ACK, 0))
        return self

    def send(self, *data: bytes) -> None:
        self.sock.sendall(b"".join(data))

    def read(self) -> Frame | None:
        """The next frame, None once the connection is closed."""
        try:
            while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
                chunk = self.sock.recv(65_536)
                if not chunk:
                    return None
                self.buf += chunk
        except ConnectionResetError:
            return None
        length = int.from_bytes(self.buf[:3], "big")
        head, payload, self.buf = self.buf[:9], self.buf[9:9 + length], self.buf[9 + length:]
        return Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload)

    def block(self, path: str = ECHO, method: str = "POST", extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        return bytes(self.encoder.encode([(":method", method), (":scheme", "http"), (":path", path),
                                          (":authority", "localhost"), ("content-type", "application/grpc"),
                                          ("te", "trailers"), *extra]))

    def request(self, sid: int, path: str = ECHO, body: bytes = b"hi") -> bytes:
        """A complete gRPC request: HEADERS, then one DATA with END_STREAM."""
        return frame(HEADERS, END_HEADERS, sid, self.block(path)) + frame(DATA, END_STREAM, sid, message(body))

    def pending(self, sid: int) -> bytes:
        """A request the server holds unanswered (BLOCK), ended: the stream is half-closed (remote)."""
        return self.request(sid, BLOCK)

    def open(self, sid: int, path: str = ECHO) -> bytes:
        """HEADERS without END_STREAM: the stream is open."""
        return frame(HEADERS, END_HEADERS, sid, self.block(path))

    def close(self) -> None:
        self.sock.close()


# --- outcomes -------------------------------------------------------------------------------------


def goaway(code: int) -> Callable[[Peer], None]:
    def check(peer: Peer) -> None:
        while (got := peer.read()) is not None:
            assert got.kind != RST_STREAM or got.code != code, "a stream error where a connection error is due"
            if got.kind == GOAWAY:
                assert got.code == code, f"GOAWAY {got.code}, expected {code}: {got.payload[8:]!r}"
                return
        raise AssertionError(f"closed without GOAWAY({code})")
    return check


def reset(code: int, sid: int | None = None) -> Callable[[Peer], None]:
    def check(peer: Peer) -> None:
        while (got := peer.read()) is not None:
            assert got.kind != GOAWAY, f"GOAWAY {got.code} where RST_STREAM({code}) is due"
            if got.kind == RST_STREAM and (sid is None or got.sid == sid):
                assert got.code == code, f"RST_STREAM {got.code}, expected {code}"
                alive(peer)  # a stream error leaves the connection usable
                return
        raise AssertionError(f"closed without RST_STREAM({code})")
    return check


def alive(peer: Peer) -> None:
    """No error so far, and the connection answers a PING."""
    peer.send(frame(PING, 0, 0, b"alive?!!"))
    while (got := peer.read()) is not None:
        assert got.kind not in (GOAWAY, RST_STREAM), f"unexpected {got}"
        if got.kind == PING and got.payload == b"alive?!!":
            assert got.flags & ACK
            return
    raise AssertionError("closed")


def response(sid: int = 1, status: str = "200") -> Callable[[Peer], None]:
    def check(peer: Peer) -> None:
        decoder = hpack.Decoder()
        while (got := peer.read()) is not None:
            assert got.kind not in (GOAWAY, RST_STREAM), f"unexpected {got}"
            if got.kind == HEADERS and got.sid == sid:
                fields = dict(decoder.decode(got.payload))
                assert fields[":status"] == status, fields
                return
            if got.kind == HEADERS:
                decoder.decode(got.payload)
        raise AssertionError("closed before a response")
    return check


def data(length: int, sid: int = 1) -> Callable[[Peer], None]:
    def check(peer: Peer) -> None:
        while (got := peer.read()) is not None:
            assert got.kind not in (GOAWAY, RST_STREAM), f"unexpected {got}"
            if got.kind == DATA and got.sid == sid:
                assert len(got.payload) == length
                return
        raise AssertionError("closed before DATA")
    return check


def settings_ack(peer: Peer) -> None:
    while (got := peer.read()) is not None:
        assert got.kind != GOAWAY, f"unexpected {got}"
        if got.kind == SETTINGS and got.flags & ACK:
            alive(peer)
            return
    raise AssertionError("closed before SETTINGS ACK")


def closed_cleanly(peer: Peer) -> None:
    while (got := peer.read()) is not None:
        assert got.kind != GOAWAY or got.code == NO_ERROR, f"unexpected {got}"


# --- building blocks ------------------------------------------------------------------------------


def hint(value: int, prefix: int, first: int = 0) -> bytes:
    return _int(value, prefix, first)


def hstr(text: bytes, huffman: bool = False) -> bytes:
    if huffman:
        coded = _HUFFMAN.encode(text)
        return hint(len(coded), 7, 0x80) + coded
    return hint(len(text), 7) + text


def raw_request(*fields: bytes, path: bytes = ECHO.encode()) -> bytes:
    """A request block in fixed representations that leave the dynamic table alone, then `fields`."""
    return (b"\x83\x86" + hint(4, 4) + hstr(path) + hint(1, 4) + hstr(b"localhost")
            + hint(31, 4) + hstr(b"application/grpc") + b"\x00" + hstr(b"te") + hstr(b"trailers") + b"".join(fields))


def request_with(block: bytes, sid: int = 1) -> bytes:
    return frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, message(b"hi"))


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(*p) for p in pairs))


def priority(depends: int, weight: int = 15, exclusive: bool = False) -> bytes:
    return _U32.pack(depends | (0x80000000 if exclusive else 0)) + bytes((weight,))


def with_fields(peer: Peer, extra: list[tuple[str, str]], drop: str = "", sid: int = 1) -> bytes:
    """A request whose header list is the usual one without `drop`, plus `extra` (in order)."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", ECHO), (":authority", "localhost"),
              ("content-type", "application/grpc"), ("te", "trailers")]
    fields = [f for f in fields if f[0] != drop] + extra
    return request_with(bytes(peer.encoder.encode(fields)), sid)


# --- the catalogue -------------------------------------------------------------------------------

Action = Callable[[Peer], None]
Check = Callable[[Peer], None]


@dataclass(frozen=True)
class Case:
    id: str
    act: Action
    expect: Check
    handshake: bool = True


CASES: list[Case] = []


def add(id_: str, expect: Check, *sent: Callable[[Peer], bytes] | bytes, handshake: bool = True) -> None:
    """A case that sends frames (bytes, or built from the peer) and expects an outcome."""
    def act(peer: Peer) -> None:
        peer.send(*(s if isinstance(s, bytes) else s(peer) for s in sent))
    CASES.append(Case(id_, act, expect, handshake))


def answered(peer: Peer, sid: int = 1) -> None:
    """Sends a request and reads up to its end: the stream is closed."""
    peer.send(peer.request(sid))
    while (got := peer.read()) is not None:
        if got.kind == HEADERS and got.sid == sid and got.flags & END_STREAM:
            return
    raise AssertionError("closed")


def reset_by_us(peer: Peer, sid: int = 1) -> None:
    """Opens a stream and resets it: the stream is closed (by RST_STREAM)."""
    peer.send(peer.pending(sid), frame(RST_STREAM, 0, sid, _U32.pack(CANCEL)))


# generic: what every server must do (h2spec "generic")
add("generic-1-preface", alive)
add("generic-2.1-priority-on-idle-stream", alive, frame(PRIORITY, 0, 3, priority(0)))
add("generic-2.2-window-update-on-half-closed-remote", alive,
    lambda p: p.pending(1), frame(WINDOW_UPDATE, 0, 1, _U32.pack(1)))
add("generic-2.3-priority-on-half-closed-remote", alive, lambda p: p.pending(1), frame(PRIORITY, 0, 1, priority(0)))
add("generic-2.4-rst-stream-on-half-closed-remote", alive,
    lambda p: p.pending(1), frame(RST_STREAM, 0, 1, _U32.pack(CANCEL)))
CASES.append(Case("generic-2.5-priority-on-closed-stream",
                  lambda p: (answered(p), p.send(frame(PRIORITY, 0, 1, priority(0)))), alive))
add("generic-3.1.1-data", response(), lambda p: p.request(1))
add("generic-3.1.2-multiple-data", response(), lambda p: p.open(1), frame(DATA, 0, 1, message(b"one")[:3]),
    frame(DATA, END_STREAM, 1, message(b"one")[3:]))
add("generic-3.1.3-data-with-padding", response(), lambda p: p.open(1),
    frame(DATA, PADDED | END_STREAM, 1, b"\x04" + message(b"pad") + b"\x00" * 4))
add("generic-3.2.1-headers", response(), lambda p: p.request(1))
add("generic-3.2.2-headers-with-padding", response(),
    lambda p: frame(HEADERS, PADDED | END_HEADERS, 1, b"\x03" + p.block() + b"\x00" * 3),
    frame(DATA, END_STREAM, 1, message(b"x")))
add("generic-3.2.3-headers-with-priority", response(),
    lambda p: frame(HEADERS, PRIORITY_FLAG | END_HEADERS, 1, priority(0, 255) + p.block()),
    frame(DATA, END_STREAM, 1, message(b"x")))
for _name, _prio in (("weight-1", priority(0, 0)), ("weight-256", priority(0, 255)),
                     ("dependency", priority(3)), ("exclusive", priority(3, exclusive=True))):
    add(f"generic-3.3-priority-{_name}", response(), frame(PRIORITY, 0, 1, _prio), lambda p: p.request(1))
add("generic-3.3.5-priority-on-idle-then-lower-headers", response(3), frame(PRIORITY, 0, 5, priority(0)),
    lambda p: p.request(3))
add("generic-3.4-rst-stream", alive, lambda p: p.pending(1), frame(RST_STREAM, 0, 1, _U32.pack(CANCEL)))
add("generic-3.5-settings", settings_ack, settings((INITIAL_WINDOW, 100_000)))
add("generic-3.7-ping", alive)
add("generic-3.8-goaway-closes-cleanly", closed_cleanly,
    frame(GOAWAY, 0, 0, _U32.pack(0) + _U32.pack(NO_ERROR)))
add("generic-3.9.1-window-update-connection", alive, frame(WINDOW_UPDATE, 0, 0, _U32.pack(1)))
add("generic-3.9.2-window-update-stream", alive, lambda p: p.pending(1), frame(WINDOW_UPDATE, 0, 1, _U32.pack(1)))
add("generic-3.10.1-continuation", response(),
    lambda p: (lambda b: frame(HEADERS, 0, 1, b[:5]) + frame(CONTINUATION, END_HEADERS, 1, b[5:]))(p.block()),
    frame(DATA, END_STREAM, 1, message(b"x")))
add("generic-3.10.2-multiple-continuations", response(),
    lambda p: (lambda b: frame(HEADERS, 0, 1, b[:5]) + frame(CONTINUATION, 0, 1, b[5:10])
               + frame(CONTINUATION, END_HEADERS, 1, b[10:]))(p.block()),
    frame(DATA, END_STREAM, 1, message(b"x")))
add("generic-4.1-get-request", response(status="405"),
    lambda p: frame(HEADERS, END_HEADERS | END_STREAM, 1, p.block("/", "GET")))
add("generic-4.2-head-request", response(status="405"),
    lambda p: frame(HEADERS, END_HEADERS | END_STREAM, 1, p.block("/", "HEAD")))
add("generic-4.3-post-request", response(), lambda p: p.request(1))
add("generic-4.4-post-with-trailers", response(), lambda p: p.open(1), frame(DATA, 0, 1, message(b"x")),
    lambda p: frame(HEADERS, END_HEADERS | END_STREAM, 1, bytes(p.encoder.encode([("x-trailer", "1")]))))
for _name, _field in (
    ("indexed", b"\x90"),  # static 16: accept-encoding: gzip, deflate
    ("incremental-indexed-name", hint(58, 6, 0x40) + hstr(b"conformance")),
    ("incremental-indexed-name-huffman", hint(58, 6, 0x40) + hstr(b"conformance", True)),
    ("incremental-new-name", b"\x40" + hstr(b"x-test") + hstr(b"value")),
    ("incremental-new-name-huffman", b"\x40" + hstr(b"x-test", True) + hstr(b"value", True)),
    ("without-indexing-indexed-name", hint(58, 4) + hstr(b"conformance")),
    ("without-indexing-indexed-name-huffman", hint(58, 4) + hstr(b"conformance", True)),
    ("without-indexing-new-name", b"\x00" + hstr(b"x-test") + hstr(b"value")),
    ("without-indexing-new-name-huffman", b"\x00" + hstr(b"x-test", True) + hstr(b"value", True)),
    ("never-indexed-indexed-name", hint(58, 4, 0x10) + hstr(b"conformance")),
    ("never-indexed-indexed-name-huffman", hint(58, 4, 0x10) + hstr(b"conformance", True)),
    ("never-indexed-new-name", b"\x10" + hstr(b"x-test") + hstr(b"value")),
    ("never-indexed-new-name-huffman", b"\x10" + hstr(b"x-test", True) + hstr(b"value", True)),
):
    add(f"generic-5-hpack-{_name}", response(), request_with(raw_request(_field)))
add("generic-5-hpack-dynamic-table-size-update", response(), request_with(hint(100, 5, 0x20) + raw_request()))
add("generic-5-hpack-multiple-dynamic-table-size-updates", response(),
    request_with(hint(0, 5, 0x20) + hint(4096, 5, 0x20) + raw_request()))

# RFC 9113 3.4-3.5: the connection preface
add("rfc9113-3.4-client-preface", alive)
add("rfc9113-3.4-invalid-preface-goaway-protocol", goaway(PROTOCOL), b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
    handshake=False)
add("rfc9113-3.4-preface-not-followed-by-settings-goaway-protocol", goaway(PROTOCOL),
    PREFACE + frame(PING, 0, 0, b"12345678"), handshake=False)

# 4.1 frame format, 4.2 frame size, 4.3 header compression
add("rfc9113-4.1-unknown-frame-type-ignored", alive, frame(0x20, 0, 0, b"extension"))
add("rfc9113-4.1-undefined-flags-ignored", alive, frame(PING, 0x16, 0, b"flagsset"))
add("rfc9113-4.1-reserved-bit-ignored", alive, (8 << 48 | PING << 40 | 0x80000000).to_bytes(9, "big") + b"reserved")
add("rfc9113-4.2-data-of-16384-octets", response(), lambda p: p.open(1),
    frame(DATA, END_STREAM, 1, message(b"d" * (16_384 - 5))))
add("rfc9113-4.2-data-over-max-frame-size-goaway-frame-size", goaway(SIZE), lambda p: p.open(1),
    frame(DATA, END_STREAM, 1, b"d" * 16_385))
add("rfc9113-4.2-headers-over-max-frame-size-goaway-frame-size", goaway(SIZE),
    frame(HEADERS, END_HEADERS | END_STREAM, 1, raw_request(b"\x00" + hstr(b"x-big") + hstr(b"b" * 17_000))))
add("rfc9113-4.3-invalid-header-block-goaway-compression", goaway(COMPRESSION),
    frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xbe"))
add("rfc9113-4.3-priority-inside-header-block-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, 0, 1, p.block()), frame(PRIORITY, 0, 1, priority(0)))
add("rfc9113-4.3-headers-to-another-stream-inside-header-block-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, 0, 1, p.block()), lambda p: frame(HEADERS, END_HEADERS, 3, p.block()))

# 5.1 stream states
add("rfc9113-5.1-idle-data-goaway-protocol", goaway(PROTOCOL), frame(DATA, 0, 1, b"x"))
add("rfc9113-5.1-idle-rst-stream-goaway-protocol", goaway(PROTOCOL), frame(RST_STREAM, 0, 1, _U32.pack(8)))
add("rfc9113-5.1-idle-window-update-goaway-protocol", goaway(PROTOCOL), frame(WINDOW_UPDATE, 0, 1, _U32.pack(1)))
add("rfc9113-5.1-idle-continuation-goaway-protocol", goaway(PROTOCOL), lambda p: frame(CONTINUATION, END_HEADERS, 1,
                                                                                        p.block()))
add("rfc9113-5.1-half-closed-remote-data-rst-stream-closed", reset(CLOSED, 1), lambda p: p.pending(1),
    frame(DATA, 0, 1, b"x"))
add("rfc9113-5.1-half-closed-remote-headers-rst-stream-closed", reset(CLOSED, 1), lambda p: p.pending(1),
    lambda p: frame(HEADERS, END_HEADERS | END_STREAM, 1, bytes(p.encoder.encode([("x-t", "1")]))))
add("rfc9113-5.1-half-closed-remote-continuation-goaway-protocol", goaway(PROTOCOL), lambda p: p.pending(1),
    frame(CONTINUATION, END_HEADERS, 1, b"\x83"))
_AFTER_CLOSE: tuple[tuple[str, Callable[[Peer], bytes], Check], ...] = (
    ("data-rst-stream-closed", lambda p: frame(DATA, 0, 1, b"x"), reset(CLOSED, 1)),
    ("headers-goaway-stream-closed", lambda p: frame(HEADERS, END_HEADERS | END_STREAM, 1, p.block()), goaway(CLOSED)),
    ("continuation-goaway-protocol", lambda p: frame(CONTINUATION, END_HEADERS, 1, b"\x83"), goaway(PROTOCOL)),
)
for _how, _close in (("closed-by-rst", reset_by_us), ("closed", answered)):
    for _name, _then, _expect in _AFTER_CLOSE:
        CASES.append(Case(f"rfc9113-5.1-{_how}-then-{_name}", lambda p, c=_close, t=_then: (c(p), p.send(t(p))),
                          _expect))

# 5.1.1 stream identifiers, 5.1.2 concurrency, 5.3.1 dependencies
add("rfc9113-5.1.1-even-stream-id-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, END_HEADERS | END_STREAM, 2, p.block()))
add("rfc9113-5.1.1-decreasing-stream-id-goaway-protocol", goaway(PROTOCOL), lambda p: p.request(5),
    lambda p: p.request(3))
add("rfc9113-5.1.2-over-max-concurrent-streams-rst-refused", reset(REFUSED, 2 * MAX_STREAMS + 1),
    lambda p: b"".join(p.pending(sid) for sid in range(1, 2 * MAX_STREAMS + 2, 2)))
add("rfc9113-5.3.1-headers-depending-on-itself-rst-protocol", reset(PROTOCOL, 1),
    lambda p: frame(HEADERS, PRIORITY_FLAG | END_HEADERS | END_STREAM, 1, priority(1) + p.block()))
add("rfc9113-5.3.1-priority-depending-on-itself-rst-protocol", reset(PROTOCOL, 1), frame(PRIORITY, 0, 1, priority(1)))

# 5.4.1 connection errors, 5.5 extensions
add("rfc9113-5.4.1-invalid-ping-goaway-frame-size", goaway(SIZE), frame(PING, 0, 0, b"short"))
add("rfc9113-5.4.1-invalid-ping-on-stream-goaway-protocol", goaway(PROTOCOL), frame(PING, 0, 1, b"12345678"))
add("rfc9113-5.5-unknown-extension-frame-ignored", alive, frame(0xFF, 0, 0, b"x" * 20))
add("rfc9113-5.5-extension-frame-inside-header-block-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, 0, 1, p.block()), frame(0xFF, 0, 1, b"x"))

# 6.1 DATA
add("rfc9113-6.1-data-on-stream-0-goaway-protocol", goaway(PROTOCOL), frame(DATA, 0, 0, b"x"))
add("rfc9113-6.1-data-on-half-closed-remote-rst-stream-closed", reset(CLOSED, 1), lambda p: p.pending(1),
    frame(DATA, END_STREAM, 1, b"x"))
add("rfc9113-6.1-data-invalid-pad-length-goaway-protocol", goaway(PROTOCOL), lambda p: p.open(1),
    frame(DATA, PADDED | END_STREAM, 1, b"\x09" + b"x" * 4))

# 6.2 HEADERS
add("rfc9113-6.2-headers-then-priority-inside-block-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, END_STREAM, 1, p.block()), frame(PRIORITY, 0, 1, priority(0)))
add("rfc9113-6.2-headers-to-another-stream-inside-block-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, END_STREAM, 1, p.block()), lambda p: frame(HEADERS, END_HEADERS, 3, p.block()))
add("rfc9113-6.2-headers-on-stream-0-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, END_HEADERS | END_STREAM, 0, p.block()))
add("rfc9113-6.2-headers-invalid-pad-length-goaway-protocol", goaway(PROTOCOL),
    frame(HEADERS, PADDED | END_HEADERS | END_STREAM, 1, b"\x20" + b"\x83" * 4))

# 6.3 PRIORITY, 6.4 RST_STREAM
add("rfc9113-6.3-priority-on-stream-0-goaway-protocol", goaway(PROTOCOL), frame(PRIORITY, 0, 0, priority(1)))
add("rfc9113-6.3-priority-length-not-5-rst-frame-size", reset(SIZE, 1), frame(PRIORITY, 0, 1, priority(0)[:4]))
add("rfc9113-6.4-rst-stream-on-stream-0-goaway-protocol", goaway(PROTOCOL), frame(RST_STREAM, 0, 0, _U32.pack(8)))
add("rfc9113-6.4-rst-stream-on-idle-goaway-protocol", goaway(PROTOCOL), frame(RST_STREAM, 0, 5, _U32.pack(8)))
add("rfc9113-6.4-rst-stream-length-not-4-goaway-frame-size", goaway(SIZE), lambda p: p.pending(1),
    frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x08\x00"))

# 6.5 SETTINGS, 6.5.2 defined parameters, 6.5.3 synchronization
add("rfc9113-6.5-settings-ack-with-payload-goaway-frame-size", goaway(SIZE), frame(SETTINGS, ACK, 0, b"\x00" * 6))
add("rfc9113-6.5-settings-on-stream-goaway-protocol", goaway(PROTOCOL), frame(SETTINGS, 0, 1))
add("rfc9113-6.5-settings-length-not-multiple-of-6-goaway-frame-size", goaway(SIZE), frame(SETTINGS, 0, 0, b"\x00" * 5))
add("rfc9113-6.5.2-enable-push-2-goaway-protocol", goaway(PROTOCOL), settings((ENABLE_PUSH, 2)))
add("rfc9113-6.5.2-initial-window-over-max-goaway-flow-control", goaway(FLOW),
    settings((INITIAL_WINDOW, 2**31)))
add("rfc9113-6.5.2-max-frame-size-below-initial-goaway-protocol", goaway(PROTOCOL),
    settings((MAX_FRAME_SIZE, 16_383)))
add("rfc9113-6.5.2-max-frame-size-over-maximum-goaway-protocol", goaway(PROTOCOL),
    settings((MAX_FRAME_SIZE, 2**24)))
add("rfc9113-6.5.2-unknown-setting-ignored", settings_ack, settings((0xFF, 1)))
add("rfc9113-6.5.3-multiple-initial-window-values-last-applies", data(1),
    settings((INITIAL_WINDOW, 100), (INITIAL_WINDOW, 1)),
    lambda p: p.request(1))
add("rfc9113-6.5.3-settings-acknowledged", settings_ack, settings())

# 6.7 PING, 6.8 GOAWAY
CASES.append(Case("rfc9113-6.7-ping-answered-with-its-payload", lambda p: None, alive))
add("rfc9113-6.7-ping-ack-not-answered", alive, frame(PING, ACK, 0, b"ackedack"))
add("rfc9113-6.7-ping-on-stream-goaway-protocol", goaway(PROTOCOL), frame(PING, 0, 3, b"12345678"))
add("rfc9113-6.7-ping-length-not-8-goaway-frame-size", goaway(SIZE), frame(PING, 0, 0, b"123456789"))
add("rfc9113-6.8-goaway-on-stream-goaway-protocol", goaway(PROTOCOL), frame(GOAWAY, 0, 1, b"\x00" * 8))

# 6.9 WINDOW_UPDATE, 6.9.1 the flow-control window, 6.9.2 initial window size
add("rfc9113-6.9-window-update-0-connection-goaway-protocol", goaway(PROTOCOL),
    frame(WINDOW_UPDATE, 0, 0, _U32.pack(0)))
add("rfc9113-6.9-window-update-0-stream-rst-protocol", reset(PROTOCOL, 1), lambda p: p.pending(1),
    frame(WINDOW_UPDATE, 0, 1, _U32.pack(0)))
add("rfc9113-6.9-window-update-length-not-4-goaway-frame-size", goaway(SIZE), frame(WINDOW_UPDATE, 0, 0, b"\x00" * 3))
add("rfc9113-6.9.1-initial-window-1-data-of-1-octet", data(1), settings((INITIAL_WINDOW, 1)),
    lambda p: p.request(1))
add("rfc9113-6.9.1-connection-window-over-max-goaway-flow-control", goaway(FLOW),
    frame(WINDOW_UPDATE, 0, 0, _U32.pack(2**31 - 1)), frame(WINDOW_UPDATE, 0, 0, _U32.pack(2**31 - 1)))
add("rfc9113-6.9.1-stream-window-over-max-rst-flow-control", reset(FLOW, 1), lambda p: p.pending(1),
    frame(WINDOW_UPDATE, 0, 1, _U32.pack(2**31 - 1)), frame(WINDOW_UPDATE, 0, 1, _U32.pack(2**31 - 1)))
add("rfc9113-6.9.1-data-over-stream-window-rst-flow-control", reset(FLOW, 1), lambda p: p.open(1, HOLD),
    *(frame(DATA, 0, 1, message(b"\x00" * (16_384 - 5))) for _ in range((1 << 20) // 16_384)),
    frame(DATA, 0, 1, b"\x00"))
add("rfc9113-6.9.2-initial-window-changed-after-headers-data", data(1, 1),
    settings((INITIAL_WINDOW, 0)), lambda p: p.request(1),
    settings((INITIAL_WINDOW, 1)))


def negative_window(peer: Peer) -> None:
    """5 octets of window, all used; a new initial size of 0 makes it -5, then 6 makes it 1."""
    peer.send(settings((INITIAL_WINDOW, 5)), peer.request(1, body=b"x" * 100))
    data(5)(peer)
    peer.send(settings((INITIAL_WINDOW, 0)), settings((INITIAL_WINDOW, 6)))


CASES.append(Case("rfc9113-6.9.2-negative-window-then-data", negative_window, data(1)))
add("rfc9113-6.9.2-initial-window-over-max-goaway-flow-control", goaway(FLOW),
    settings((INITIAL_WINDOW, 2**31)))

# 6.10 CONTINUATION
add("rfc9113-6.10-multiple-continuations", response(),
    lambda p: (lambda b: frame(HEADERS, 0, 1, b[:3]) + b"".join(frame(CONTINUATION, 0, 1, b[i:i + 3])
                                                              for i in range(3, len(b) - 3, 3))
               + frame(CONTINUATION, END_HEADERS, 1, b[len(b) - 3 - (len(b) - 6) % 3:]))(p.block()),
    frame(DATA, END_STREAM, 1, message(b"x")))
add("rfc9113-6.10-continuation-then-other-frame-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, 0, 1, p.block()[:5]), lambda p: frame(CONTINUATION, 0, 1, p.block()[5:6]),
    frame(DATA, 0, 1, b"x"))
add("rfc9113-6.10-continuation-on-stream-0-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, 0, 1, p.block()[:5]), frame(CONTINUATION, END_HEADERS, 0, b"\x83"))
add("rfc9113-6.10-continuation-after-end-headers-goaway-protocol", goaway(PROTOCOL),
    lambda p: frame(HEADERS, END_HEADERS, 1, p.block()), frame(CONTINUATION, END_HEADERS, 1, b"\x83"))
add("rfc9113-6.10-continuation-after-ended-continuation-goaway-protocol", goaway(PROTOCOL),
    lambda p: (lambda b: frame(HEADERS, 0, 1, b[:5]) + frame(CONTINUATION, END_HEADERS, 1, b[5:]))(p.block()),
    frame(CONTINUATION, END_HEADERS, 1, b"\x83"))
add("rfc9113-6.10-continuation-after-data-goaway-protocol", goaway(PROTOCOL), lambda p: p.open(1),
    frame(DATA, 0, 1, b"x"), frame(CONTINUATION, END_HEADERS, 1, b"\x83"))

# 7 error codes
add("rfc9113-7-goaway-unknown-code-closes-cleanly", closed_cleanly,
    frame(GOAWAY, 0, 0, _U32.pack(0) + _U32.pack(0xFF)))
add("rfc9113-7-rst-stream-unknown-code-ignored", alive, lambda p: p.pending(1),
    frame(RST_STREAM, 0, 1, _U32.pack(0xFF)))

# 8.1 exchanges, 8.2 header fields, 8.3 pseudo-headers (h2spec's 8.1.2.x), 8.4 push
add("rfc9113-8.1-second-headers-without-end-stream-rst-protocol", reset(PROTOCOL, 1), lambda p: p.open(1),
    lambda p: frame(HEADERS, END_HEADERS, 1, bytes(p.encoder.encode([("x-t", "1")]))))
add("rfc9113-8.1.1-content-length-not-data-length-rst-protocol", reset(PROTOCOL, 1),
    lambda p: frame(HEADERS, END_HEADERS, 1, p.block(extra=(("content-length", "1"),))),
    frame(DATA, END_STREAM, 1, message(b"xx")))
add("rfc9113-8.1.1-content-length-not-sum-of-data-rst-protocol", reset(PROTOCOL, 1),
    lambda p: frame(HEADERS, END_HEADERS, 1, p.block(extra=(("content-length", "8"),))),
    frame(DATA, 0, 1, message(b"")), frame(DATA, END_STREAM, 1, b"xx"))
add("rfc9113-8.1.1-content-length-matches", response(),
    lambda p: frame(HEADERS, END_HEADERS, 1, p.block(extra=(("content-length", "7"),))),
    frame(DATA, 0, 1, message(b"")), frame(DATA, END_STREAM, 1, b"xx"))
add("rfc9113-8.2-uppercase-name-rst-protocol", reset(PROTOCOL, 1), request_with(raw_request(b"\x00" + hstr(b"X-Test")
                                                                                          + hstr(b"1"))))
for _header in ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"):
    add(f"rfc9113-8.2.2-connection-specific-{_header}-rst-protocol", reset(PROTOCOL, 1),
        lambda p, h=_header: with_fields(p, [(h, "x")]))
add("rfc9113-8.2.2-te-not-trailers-rst-protocol", reset(PROTOCOL, 1),
    request_with(raw_request(b"\x00" + hstr(b"te") + hstr(b"gzip"))))
for _name, _value in (("cr", b"a\rb"), ("lf", b"a\nb"), ("nul", b"a\x00b")):
    add(f"rfc9113-8.2.1-{_name}-in-value-rst-protocol", reset(PROTOCOL, 1),
        request_with(raw_request(b"\x00" + hstr(b"x-test") + hstr(_value))))
add("rfc9113-8.3-unknown-pseudo-header-rst-protocol", reset(PROTOCOL, 1),
    request_with(b"\x00" + hstr(b":unknown") + hstr(b"x") + raw_request()))
add("rfc9113-8.3-response-pseudo-header-rst-protocol", reset(PROTOCOL, 1), request_with(b"\x88" + raw_request()))
add("rfc9113-8.3-pseudo-header-in-trailers-rst-protocol", reset(PROTOCOL, 1), lambda p: p.open(1),
    frame(DATA, 0, 1, message(b"x")), frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x84"))
add("rfc9113-8.3-pseudo-header-after-regular-rst-protocol", reset(PROTOCOL, 1),
    request_with(raw_request(b"\x00" + hstr(b":scheme") + hstr(b"http"))))
add("rfc9113-8.3.1-empty-path-rst-protocol", reset(PROTOCOL, 1),
    request_with(b"\x83\x86" + hint(4, 4) + hstr(b"") + hint(1, 4) + hstr(b"localhost")))
for _pseudo in (":method", ":scheme", ":path"):
    add(f"rfc9113-8.3.1-missing-{_pseudo[1:]}-rst-protocol", reset(PROTOCOL, 1),
        lambda p, d=_pseudo: with_fields(p, [], drop=d))
    add(f"rfc9113-8.3.1-duplicate-{_pseudo[1:]}-rst-protocol", reset(PROTOCOL, 1),
        lambda p, d=_pseudo: request_with(b"\x00" + hstr(d.encode()) + hstr(b"POST" if d == ":method" else b"http"
                                                                           if d == ":scheme" else ECHO.encode())
                                          + raw_request()))
add("rfc9113-8.4-push-promise-goaway-protocol", goaway(PROTOCOL), frame(PUSH_PROMISE, END_HEADERS, 1, _U32.pack(2)
                                                                        + b"\x83"))

# HPACK (RFC 7541)
add("rfc7541-2.3.3-indexed-field-index-out-of-range-goaway-compression", goaway(COMPRESSION),
    request_with(raw_request(hint(70, 7, 0x80))))
add("rfc7541-2.3.3-literal-name-index-out-of-range-goaway-compression", goaway(COMPRESSION),
    request_with(raw_request(hint(70, 6, 0x40) + hstr(b"x"))))
add("rfc7541-4.2-table-size-update-at-end-of-block-goaway-compression", goaway(COMPRESSION),
    request_with(raw_request(hint(0, 5, 0x20))))
add("rfc7541-5.2-huffman-padding-over-7-bits-goaway-compression", goaway(COMPRESSION),
    request_with(raw_request(b"\x00" + hstr(b"x-test") + bytes((0x80 | 2,)) + _HUFFMAN.encode(b"a") + b"\xff")))
add("rfc7541-5.2-huffman-padded-with-zeros-goaway-compression", goaway(COMPRESSION),
    request_with(raw_request(b"\x00" + hstr(b"x-test") + b"\x81\x18")))
add("rfc7541-5.2-huffman-eos-goaway-compression", goaway(COMPRESSION),
    request_with(raw_request(b"\x00" + hstr(b"x-test") + b"\x84\xff\xff\xff\xff")))
add("rfc7541-6.1-indexed-field-index-0-goaway-compression", goaway(COMPRESSION), request_with(raw_request(b"\x80")))
add("rfc7541-6.3-table-size-update-over-settings-goaway-compression", goaway(COMPRESSION),
    request_with(hint(4097, 5, 0x20) + raw_request()))
add("rfc7541-6.2.1-incremental-indexing-then-reference", response(3),
    request_with(raw_request(b"\x40" + hstr(b"x-test") + hstr(b"indexed"))),
    request_with(raw_request(hint(62, 7, 0x80)), sid=3))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(port: int, case: Case) -> None:
    peer = Peer(port)
    try:
        if case.handshake:
            peer.handshake()
        case.act(peer)
        case.expect(peer)
    finally:
        peer.close()


def test_catalogue_is_whole() -> None:
    """Every case has its own id, and each part of h2spec's catalogue is walked."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    for section in ("generic-1", "generic-2", "generic-3", "generic-4", "generic-5", "rfc9113-3.4", "rfc9113-4.1",
                    "rfc9113-4.2", "rfc9113-4.3", "rfc9113-5.1", "rfc9113-5.1.1", "rfc9113-5.1.2", "rfc9113-5.3.1",
                    "rfc9113-5.4.1", "rfc9113-5.5", "rfc9113-6.1", "rfc9113-6.2", "rfc9113-6.3", "rfc9113-6.4",
                    "rfc9113-6.5", "rfc9113-6.7", "rfc9113-6.8", "rfc9113-6.9", "rfc9113-6.10", "rfc9113-7",
                    "rfc9113-8.1", "rfc9113-8.2", "rfc9113-8.3", "rfc9113-8.4", "rfc7541-2.3", "rfc7541-4.2",
                    "rfc7541-5.2", "rfc7541-6"):
        assert any(i.startswith(section + "-") or i.startswith(section + ".") for i in ids), section
    assert len(ids) >= 100
