"""The HTTP/2 half of the agent's gRPC server: frames, HPACK, flow control, one connection.

Why this exists: grpc.aio's server costs 0.16-0.2 ms of CPU per unary call before any handler
runs (each RPC is four completion-queue events handed from grpc's threads to the event loop
through a socket), which capped one agent at ~1,800 Invoke calls/s (bench/overhead/README.md).
The same unary call framed here, on the event loop, costs ~0.05 ms. This module knows HTTP/2
(RFC 9113) and nothing of gRPC; `server.py` puts gRPC on top.

What a server must do, and does: the connection preface and SETTINGS exchange; HEADERS with
CONTINUATION, padding and priority; HPACK decoding with its dynamic table (headers.py); PING
answers; WINDOW_UPDATE and both directions of flow control (DATA is split to the peer's
MAX_FRAME_SIZE and held while a window is closed); RST_STREAM cancels the stream's
handler; GOAWAY both ways, and a graceful close that lets open streams finish.

Every buffer a peer can fill is bounded (`Limits`, one instance per server; each field is a
flag of `switchgear agent`):

- Receive flow control is enforced (RFC 9113 6.9): DATA beyond a stream's window resets it with
  FLOW_CONTROL_ERROR, beyond the connection's window ends the connection. Window is given back
  only as the application consumes request bytes (`credit` for the stream, `release` for the
  connection), so what one connection buffers is at most `connection_window`. A peer that
  fills the connection window with bytes no handler can consume yet (partial unary requests,
  streams whose handlers do not read) would wait forever: the stream holding the most is then
  reset with ENHANCE_YOUR_CALM (grpc clients see RESOURCE_EXHAUSTED) and its bytes released.
- Output: once the transport holds more than its high-water mark we stop reading the peer (no
  input, no answers to PING or SETTINGS); past `max_output` the connection is closed with GOAWAY
  ENHANCE_YOUR_CALM, checked on every write while writing is paused.
- Header blocks: bounded in bytes while collected, frame headers included, so zero-length
  CONTINUATION frames count; decoded lists by `max_header_list_size`.
- Rapid reset (CVE-2023-44487): more than `max_resets_per_s` streams reset (by the peer, or by
  us for the peer's stream errors) within a second ends the connection with ENHANCE_YOUR_CALM.
- Keepalive as grpc's server does it: a PING sooner than `min_ping_interval_s` after the last
  one, with no HEADERS or DATA sent in between, is a strike; more than `ping_strikes` strikes
  end the connection with GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
- Time: the preface and the SETTINGS exchange must be done within `preface_timeout_s`; a
  connection without open streams for `idle_timeout_s` is sent GOAWAY and closed.
- Requests malformed per RFC 9113 8.2-8.3 are stream errors (RST_STREAM PROTOCOL_ERROR).

On close, every reference from the connection to its streams, their handlers and the transport
is dropped, so a closed connection is freed by reference counting, not the cycle collector.
Responses are encoded without the dynamic table or Huffman, so the peer's HEADER_TABLE_SIZE
never matters. Not thread-safe: one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpack.exceptions import HPACKError

from switchgear.rpc.headers import HeaderDecoder, trailers_problem

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x4, 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
DEFAULT_FRAME = 16_384
MAX_FRAME = 2**24 - 1

#: A header block (HEADERS + CONTINUATIONs, compressed, 9 bytes counted per frame so that empty
#: CONTINUATION frames add up) larger than this ends the connection.
MAX_HEADER_BLOCK = 64 * 1024
#: Streams closed lately whose ids are remembered, to tell frames in flight on a stream we ended
#: (ignored) from frames on a stream the peer had ended or reset (STREAM_CLOSED).
_REMEMBERED = 32
# pause_writing (and stop reading the peer) beyond this much output held: what a peer that never
# reads costs in our memory (the kernel buffers more), times the connections it opens.
_HIGH_WATER = 256 * 1024


@dataclass(frozen=True)
class Limits:
    """The bounds of one server's connections (sizes in bytes, times in seconds). Defaults follow
    grpc-core and Envoy where they are bounded, and say why where they are not."""

    #: Request bytes one stream may have in flight before we credit them (SETTINGS_INITIAL_WINDOW_SIZE).
    stream_window: int = 1 << 20
    #: Request bytes one connection may buffer (its receive window): consumed bytes are credited back.
    connection_window: int = 8 << 20
    #: Open streams per connection (REFUSED_STREAM beyond). grpc's default is unlimited; 100 is
    #: RFC 9113's recommended minimum and Envoy's and Go's choice, and bounds per-connection state.
    max_concurrent_streams: int = 100
    #: Decoded request header list (SETTINGS_MAX_HEADER_LIST_SIZE, RFC 7541 sizes).
    max_header_list_size: int = 16 * 1024
    #: Output held for a peer that does not read, before its connection is closed.
    max_output: int = 16 << 20
    #: Streams reset (by the peer, or by us for its stream errors) per second (rapid reset).
    max_resets_per_s: int = 200
    #: Open connections per server; one more is sent GOAWAY and closed at once.
    max_connections: int = 1000
    #: Time for the peer to send its preface and SETTINGS and to acknowledge ours.
    preface_timeout_s: float = 10.0
    #: A connection with no open stream for this long is sent GOAWAY and closed (0 = never).
    idle_timeout_s: float = 300.0
    #: PINGs sooner than `min_ping_interval_s` after the last one, with no HEADERS or DATA sent
    #: between, tolerated before GOAWAY ENHANCE_YOUR_CALM "too_many_pings" (grpc: 2 and 5 min;
    #: 0 strikes = no limit).
    ping_strikes: int = 2
    min_ping_interval_s: float = 300.0

    def __post_init__(self) -> None:
        checks = (("stream_window", DEFAULT_WINDOW <= self.stream_window <= MAX_WINDOW),
                  ("connection_window", DEFAULT_WINDOW <= self.connection_window <= MAX_WINDOW),
                  ("max_concurrent_streams", self.max_concurrent_streams >= 1),
                  ("max_header_list_size", 1024 <= self.max_header_list_size <= MAX_HEADER_BLOCK),
                  ("max_output", self.max_output >= 2 * _HIGH_WATER),
                  ("max_resets_per_s", self.max_resets_per_s >= 1),
                  ("max_connections", self.max_connections >= 1),
                  ("preface_timeout_s", self.preface_timeout_s > 0),
                  ("idle_timeout_s", self.idle_timeout_s >= 0),
                  ("ping_strikes", self.ping_strikes >= 0),
                  ("min_ping_interval_s", self.min_ping_interval_s >= 0))
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range")


class Warnings:
    """One log line per kind of bad input per `interval_s` (the rest counted and reported with
    the next line), so that clients sending bad input cannot fill the log. One per server."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        self.interval_s = interval_s
        self.logger = logger or logging.getLogger("switchgear.rpc.server")
        self._clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, message: str, *args: object) -> None:
        self.log(logging.WARNING, kind, message, *args)

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next.get(kind, float("-inf")):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._next[kind] = now + self.interval_s
        suppressed = self._suppressed.pop(kind, 0)
        suffix = f" ({suppressed} more like it in the last {self.interval_s:g}s)" if suppressed else ""
        self.logger.log(level, message + suffix, *args)


_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_PRIORITY = struct.Struct(">IB")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return (len(payload) << 48 | kind << 40 | flags << 32 | stream_id).to_bytes(9, "big") + payload


def _int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK integer (RFC 7541 5.1) with `first` holding the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as "literal without indexing, new name" (RFC 7541 6.2.2), no Huffman: no
    dynamic-table state on either side, so blocks can be built ahead and reused."""
    return b"\x00" + _int(len(name), 7) + name + _int(len(value), 7) + value


def literal_indexed_name(index: int, value: bytes) -> bytes:
    """"Literal without indexing" naming a static-table entry (RFC 7541 6.2.2)."""
    return _int(index, 4) + _int(len(value), 7) + value


STATUS_200 = b"\x88"  # static table entry 8, ":status: 200"


def status_field(code: int) -> bytes:
    return STATUS_200 if code == 200 else literal_indexed_name(8, str(code).encode())


class H2Error(Exception):
    """A connection error: ends the connection with GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Stream:
    """One request stream, as the connection sees it. `headers` are the decoded request
    headers ((name, value) bytes pairs). The server sets `on_data(stream, chunk, ended)`, which
    receives the request body as it arrives (`ended` with END_STREAM), and `task`, the handler,
    which a reset or a lost connection cancels (after `on_reset`). Received bytes count in
    `held` until the server `release`s them, and against `recv_window` until it `credit`s them."""

    __slots__ = (
        "call",
        "conn",
        "credit",
        "headers",
        "held",
        "id",
        "length",
        "local_closed",
        "on_data",
        "on_reset",
        "pending",
        "pending_trailers",
        "recv_window",
        "remote_closed",
        "send_window",
        "task",
        "window_open",
    )

    def __init__(self, stream_id: int, conn: Connection, headers: list[tuple[bytes, bytes]], send_window: int,
                 recv_window: int, length: int) -> None:
        self.id = stream_id
        self.conn = conn
        self.headers = headers
        self.remote_closed = False
        self.local_closed = False
        self.send_window = send_window
        self.recv_window = recv_window  # what the peer may still send before we credit more
        self.length = length  # request body bytes still announced by content-length (-1: none)
        self.pending = b""  # DATA held for flow control
        self.pending_trailers: bytes | None = None
        self.window_open: asyncio.Event | None = None
        self.task: asyncio.Task[Any] | None = None
        self.on_data: Callable[[Stream, bytes, bool], None] | None = None
        self.on_reset: Callable[[Stream], None] | None = None
        self.credit = 0  # bytes consumed on this stream not yet credited back
        self.held = 0  # bytes received on this stream not yet released to the connection window
        self.call: Any = None  # the server's state for this stream


#: What the server does with a stream whose headers have arrived.
Handler = Callable[[Stream], None]


class Connection(asyncio.Protocol):
    """One HTTP/2 connection. `on_stream(stream)` is called once a stream's headers have
    arrived; the server then reads the body through `stream.on_data` and answers with `send`."""

    def __init__(self, on_stream: Handler, limits: Limits, on_close: Callable[[Connection], None],
                 warnings: Warnings | None = None, on_open: Callable[[Connection], None] | None = None) -> None:
        self._on_stream: Handler | None = on_stream
        self._on_open = on_open
        self._warnings = warnings or Warnings(logger=log)
        self._on_close: Callable[[Connection], None] | None = on_close
        self.limits = limits
        self.max_concurrent_streams = limits.max_concurrent_streams
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.peer_cert: dict[str, Any] | None = None  # the client's certificate (TLS with client certificates)
        self.streams: dict[int, Stream] = {}
        self._buf = b""
        self._preface = False
        self._decoder = HeaderDecoder(max_list_size=limits.max_header_list_size)
        self._last_stream = 0
        self._ended: dict[int, bool] = {}  # recently closed stream ids: True if the peer had ended or reset them
        self._header_block: list[bytes] | None = None  # a block waiting for CONTINUATION
        self._header_stream = 0
        self._header_flags = 0
        self._header_size = 0
        self._send_window = DEFAULT_WINDOW
        self._initial_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._max_frame = DEFAULT_FRAME  # the peer's SETTINGS_MAX_FRAME_SIZE
        self._recv_window = limits.connection_window  # what the peer may still send on the connection
        self._unacked = 0  # connection-level bytes released and not yet credited back
        self._blocked: dict[int, Stream] = {}  # streams holding DATA for a window
        self._resets = 0
        self._reset_window = 0.0
        self._last_ping = float("-inf")
        self._ping_strikes = 0
        self._paused = False
        self._drained: asyncio.Event | None = None
        self._got_settings = False  # the peer's first SETTINGS came
        self._settings_acked = False  # the peer acknowledged ours
        self._timer: asyncio.TimerHandle | None = None  # the preface timeout, then the idle check
        self._idle_since = 0.0
        self.goaway_sent = False
        self.goaway_received = False
        self.closed = asyncio.Event()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        self.transport = tcp
        tcp.set_write_buffer_limits(high=_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            family = "ipv6" if ":" in str(peer[0]) else "ipv4"
            host = f"[{peer[0]}]" if family == "ipv6" else peer[0]
            self.peer = f"{family}:{host}:{peer[1]}"
        self.peer_cert = transport.get_extra_info("peercert") or None
        limits = self.limits
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
            (SETTINGS_INITIAL_WINDOW_SIZE, limits.stream_window),
            (SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
            (SETTINGS_ENABLE_PUSH, 0),
        ))
        out = frame(SETTINGS, 0, 0, settings)
        if limits.connection_window > DEFAULT_WINDOW:
            out += frame(WINDOW_UPDATE, 0, 0, _U32.pack(limits.connection_window - DEFAULT_WINDOW))
        tcp.write(out)
        self._timer = asyncio.get_running_loop().call_later(limits.preface_timeout_s, self._preface_expired)
        if self._on_open is not None:
            self._on_open(self)
            self._on_open = None

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in list(self.streams.values()):
            self._forget(stream, cancel=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drained is not None:
            self._drained.set()
            self._drained = None
        self.closed.set()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)
        # Nothing refers back to the transport, the server or the streams: freed at once.
        self.transport = None
        self._on_stream = None
        self._blocked.clear()
        self._buf = b""
        self._header_block = None

    def pause_writing(self) -> None:
        """The peer reads slower than we write: read nothing more from it (each frame it sends
        could add output) until it catches up; past `max_output`, close."""
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()
            self._check_output()

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    def _check_output(self) -> None:
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > self.limits.max_output:
            self._warnings.warn("output", "closing the connection from %s: it stopped reading (output over %d bytes)",
                                self.peer, self.limits.max_output)
            self._fail(ENHANCE_YOUR_CALM, "output not read")
            transport.abort()  # also when writing has not paused yet (one write past the cap)

    async def drain(self) -> None:
        """Returns once the transport takes more output (or the connection is gone)."""
        if self._paused and not self.closed.is_set():
            if self._drained is None:
                self._drained = asyncio.Event()
            await self._drained.wait()

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except H2Error as exc:
            self._fail(exc.code, str(exc))
        except HPACKError as exc:
            self._fail(COMPRESSION_ERROR, f"header block: {exc}")

    # --- timers -------------------------------------------------------------------------------

    def _preface_expired(self) -> None:
        self._timer = None
        self._warnings.log(logging.INFO, "preface", "HTTP/2 connection from %s ended: no preface and SETTINGS "
                           "exchange in %gs", self.peer, self.limits.preface_timeout_s)
        self._fail(SETTINGS_TIMEOUT if self._preface else PROTOCOL_ERROR, "preface or SETTINGS timeout")

    def _settle(self) -> None:
        """Half of the SETTINGS exchange is done; once both are, the idle clock starts."""
        if self._got_settings and self._settings_acked and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._idle_since = time.monotonic()
            self._arm_idle(self.limits.idle_timeout_s)

    def _arm_idle(self, delay: float) -> None:
        if self.limits.idle_timeout_s and self.transport is not None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        self._timer = None
        timeout = self.limits.idle_timeout_s
        if self.streams:
            self._arm_idle(timeout)
            return
        idle = time.monotonic() - self._idle_since
        if idle < timeout:
            self._arm_idle(timeout - idle)
            return
        self.goaway(NO_ERROR, "idle")
        self._close()

    # --- receiving ----------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        if not self._preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._buf = buf
                return
            if not buf.startswith(PREFACE):
                raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            pos = len(PREFACE)
            self._preface = True
        end = len(buf)
        out: list[bytes] = []
        while end - pos >= 9 and self.transport is not None:
            head = int.from_bytes(buf[pos:pos + 9], "big")
            length = head >> 48
            if length > DEFAULT_FRAME:  # we never raise SETTINGS_MAX_FRAME_SIZE
                raise H2Error(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if end - pos - 9 < length:
                break
            payload = buf[pos + 9:pos + 9 + length]
            pos += 9 + length
            self._frame((head >> 40) & 0xFF, (head >> 32) & 0xFF, head & 0x7FFFFFFF, payload, out)
        self._buf = buf[pos:]
        if self._recv_window < DEFAULT_FRAME:
            self._starved(out)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
            if self._paused:
                self._check_output()

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if self._header_block is not None and kind != CONTINUATION:
            raise H2Error(PROTOCOL_ERROR, "expected CONTINUATION")
        if not self._got_settings and (kind != SETTINGS or flags & ACK):
            raise H2Error(PROTOCOL_ERROR, "the preface is not followed by SETTINGS")
        if kind == DATA:
            self._data(flags, sid, payload, out)
        elif kind == HEADERS:
            self._headers(flags, sid, payload, out)
        elif kind == CONTINUATION:
            if self._header_block is None or sid != self._header_stream:
                raise H2Error(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._collect(payload)
            if flags & END_HEADERS:
                block = b"".join(self._header_block)
                self._header_block = None
                self._headers_complete(self._header_flags, sid, block, out)
        elif kind == SETTINGS:
            self._settings(flags, sid, payload, out)
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload, out)
        elif kind == PING:
            self._ping(flags, sid, payload, out)
        elif kind == RST_STREAM:
            self._reset_by_peer(sid, payload)
        elif kind == GOAWAY:
            if sid != 0:
                raise H2Error(PROTOCOL_ERROR, "GOAWAY on a stream")
            self.goaway_received = True
            if not self.streams and self.transport is not None:
                self.transport.close()
        elif kind == PRIORITY:
            self._priority(sid, payload, out)
        elif kind == PUSH_PROMISE:
            raise H2Error(PROTOCOL_ERROR, "a client cannot push")
        # Unknown frame types are ignored (RFC 9113 section 4.1).

    def _data(self, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid == 0:
            raise H2Error(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # padding counts against the windows too
        if size > self._recv_window:
            raise H2Error(FLOW_CONTROL_ERROR, f"DATA of {size} bytes beyond the connection window")
        self._recv_window -= size
        stream = self.streams.get(sid)
        if stream is None:
            self._give(size)  # nobody will consume these
            if sid > self._last_stream:
                raise H2Error(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if self._ended.get(sid):  # the peer had ended (or reset) it: RFC 9113 5.1
                self._stream_error(sid, STREAM_CLOSED, out)
            return  # a stream we have answered or reset: frames in flight are ignored
        if flags & PADDED:
            payload = _unpad(payload)
        if stream.remote_closed:
            self._give(size)
            self._stream_error(sid, STREAM_CLOSED, out)
            return
        if size > stream.recv_window:
            self._give(size)
            self._stream_error(sid, FLOW_CONTROL_ERROR, out)
            return
        stream.recv_window -= size
        ended = bool(flags & END_STREAM)
        if stream.length >= 0:
            stream.length -= len(payload)
            if stream.length < 0 or (ended and stream.length):
                self._give(size)
                self._stream_error(sid, PROTOCOL_ERROR, out)  # RFC 9113 8.1.1: content-length is wrong
                return
        if ended:
            stream.remote_closed = True
        padding = size - len(payload)
        if padding or stream.local_closed:  # consumed at once: padding, and anything after our answer
            consumed = size if stream.local_closed else padding
            self._give(consumed)
            self.credit(stream, consumed)
            if stream.local_closed:
                if ended:
                    self._forget(stream)
                return
        stream.held += len(payload)
        if stream.on_data is not None:
            stream.on_data(stream, payload, ended)  # the reader credits and releases as it consumes

    def _headers(self, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid == 0 or sid % 2 == 0:
            raise H2Error(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        if flags & PADDED:
            payload = _unpad(payload)
        depends = -1
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2Error(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            depends = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
            payload = payload[5:]
        if flags & END_HEADERS:
            self._headers_complete(flags, sid, payload, out, depends)
            return
        self._header_block, self._header_stream, self._header_flags, self._header_size = [], sid, flags, 0
        if depends == sid:
            self._header_flags |= 0x100  # remembered: the stream depends on itself
        self._collect(payload)

    def _collect(self, chunk: bytes) -> None:
        assert self._header_block is not None
        self._header_size += len(chunk) + 9
        if self._header_size > MAX_HEADER_BLOCK:
            raise H2Error(ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} bytes")
        if chunk:
            self._header_block.append(chunk)

    def _headers_complete(self, flags: int, sid: int, block: bytes, out: list[bytes], depends: int = -1) -> None:
        fields, problem, length = self._decoder.decode_request(block)  # always: the table must follow
        stream = self.streams.get(sid)
        if stream is not None:  # trailers: they end the request (RFC 9113 8.1)
            if stream.remote_closed:
                self._stream_error(sid, STREAM_CLOSED, out)
                return
            if not flags & END_STREAM or trailers_problem(fields) is not None or stream.length > 0:
                self._stream_error(sid, PROTOCOL_ERROR, out)
                return
            self._data(END_STREAM, sid, b"", out)
            return
        if sid <= self._last_stream:
            ended = self._ended.get(sid)
            if ended is not None:
                raise H2Error(STREAM_CLOSED, f"HEADERS on closed stream {sid}")
            raise H2Error(PROTOCOL_ERROR, f"HEADERS on stream {sid}, below stream {self._last_stream}")
        self._last_stream = sid
        if self.goaway_sent or len(self.streams) >= self.max_concurrent_streams:
            self._remember(sid, False)  # frames in flight on it are ignored
            out.append(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        if problem is not None or depends == sid or flags & 0x100:
            log.debug("stream %d from %s is malformed: %s", sid, self.peer, problem or "depends on itself")
            self._remember(sid, False)
            self._stream_error(sid, PROTOCOL_ERROR, out)
            return
        stream = Stream(sid, self, fields, self._initial_window, self.limits.stream_window, length)
        self.streams[sid] = stream
        assert self._on_stream is not None
        try:
            self._on_stream(stream)
        except Exception:  # a server bug must cost this stream, not the connection
            log.exception("stream %d from %s failed at its headers", sid, self.peer)
            self.reset(stream, INTERNAL_ERROR, cancel=True)
            return
        if flags & END_STREAM:
            self._data(END_STREAM, sid, b"", out)

    def _settings(self, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid != 0:
            raise H2Error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2Error(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self._settings_acked:
                self._settings_acked = True
                self._settle()
            return
        if len(payload) % 6:
            raise H2Error(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2Error(FLOW_CONTROL_ERROR, f"INITIAL_WINDOW_SIZE {value}")
                delta, self._initial_window = value - self._initial_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2Error(FLOW_CONTROL_ERROR, f"stream {stream.id}'s window over 2^31-1")
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= MAX_FRAME:
                    raise H2Error(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self._max_frame = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise H2Error(PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
        out.append(frame(SETTINGS, ACK, 0))
        if not self._got_settings:
            self._got_settings = True
            self._settle()
        self._flush_blocked()

    def _window_update(self, sid: int, payload: bytes, out: list[bytes]) -> None:
        if len(payload) != 4:
            raise H2Error(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise H2Error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise H2Error(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            self._flush_blocked()
            return
        if sid > self._last_stream:
            raise H2Error(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        stream = self.streams.get(sid)
        if stream is None:
            return
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            self._stream_error(sid, PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR, out)
            return
        stream.send_window += increment
        if stream.id in self._blocked:
            self._flush(stream)

    def _ping(self, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid != 0 or len(payload) != 8:
            raise H2Error(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "malformed PING")
        if flags & ACK:
            return
        if self.limits.ping_strikes:  # grpc-core's ping abuse policy, with calls or without
            now = time.monotonic()
            if now < self._last_ping + self.limits.min_ping_interval_s:
                self._ping_strikes += 1
                if self._ping_strikes > self.limits.ping_strikes:
                    raise H2Error(ENHANCE_YOUR_CALM, "too_many_pings")
            self._last_ping = now
        out.append(frame(PING, ACK, 0, payload))

    def _priority(self, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid == 0:
            raise H2Error(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(sid, FRAME_SIZE_ERROR, out)
        elif _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
            self._stream_error(sid, PROTOCOL_ERROR, out)  # a stream cannot depend on itself (RFC 9113 5.3.1)

    def _reset_by_peer(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2Error(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise H2Error(FRAME_SIZE_ERROR, "RST_STREAM length")
        if sid > self._last_stream:
            raise H2Error(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        self._count_reset()
        stream = self.streams.get(sid)
        if stream is None:
            self._ended[sid] = True
            return
        stream.remote_closed = True
        self._forget(stream, cancel=True)

    def _count_reset(self) -> None:
        now = time.monotonic()
        if now - self._reset_window >= 1.0:
            self._reset_window, self._resets = now, 0
        self._resets += 1
        if self._resets > self.limits.max_resets_per_s:
            raise H2Error(ENHANCE_YOUR_CALM, f"over {self.limits.max_resets_per_s} stream resets per second")

    def _stream_error(self, sid: int, code: int, out: list[bytes], count: bool = True) -> None:
        """RST_STREAM(code) for the peer's error on one stream; its handler is cancelled. Each
        counts towards the rapid-reset bound, so a flood of bad streams ends the connection."""
        out.append(frame(RST_STREAM, 0, sid, _U32.pack(code)))
        stream = self.streams.get(sid)
        if stream is not None:
            self._forget(stream, cancel=True)
        if count:
            self._count_reset()

    def _starved(self, out: list[bytes]) -> None:
        """The peer can no longer send a full frame on the connection: credit what has been
        consumed. If nothing has been and the window is used up, every buffered byte waits for
        bytes that cannot come: reset the stream holding the most."""
        if not self._unacked:
            if self._recv_window:
                return
            victim = max(self.streams.values(), key=_held, default=None)
            if victim is None or not victim.held:
                return
            self._warnings.warn("starved", "reset stream %d from %s: the connection's %d buffered request bytes "
                                "are all waiting", victim.id, self.peer, self.limits.connection_window)
            self._stream_error(victim.id, ENHANCE_YOUR_CALM, out, count=False)
        self._send_credit()

    # --- flow control credit ------------------------------------------------------------------

    def credit(self, stream: Stream, consumed: int) -> None:
        """Gives back stream window for request bytes the handler has consumed."""
        stream.credit += consumed
        if stream.credit >= self.limits.stream_window >> 2 and not stream.remote_closed and self.transport is not None:
            self.transport.write(frame(WINDOW_UPDATE, 0, stream.id, _U32.pack(stream.credit)))
            stream.recv_window += stream.credit
            stream.credit = 0

    def release(self, stream: Stream, consumed: int) -> None:
        """Gives back connection window for request bytes the handler has consumed."""
        stream.held -= consumed
        self._give(consumed)

    def _give(self, consumed: int) -> None:
        self._unacked += consumed
        if self._unacked >= self.limits.connection_window >> 2:
            self._send_credit()

    def _send_credit(self) -> None:
        if self._unacked and self.transport is not None:
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._unacked)))
            self._recv_window += self._unacked
            self._unacked = 0

    # --- sending ------------------------------------------------------------------------------

    def send(self, stream: Stream, head: bytes | None, data: bytes, trailers: bytes | None) -> bool:
        """Sends a header block (`head`), DATA and a trailer block, each optional, in one write
        when the windows allow; DATA beyond them (and the trailers after it) wait for
        WINDOW_UPDATE. Returns False when everything was sent."""
        transport = self.transport
        if stream.local_closed or transport is None or transport.is_closing():
            return False
        self._ping_strikes, self._last_ping = 0, float("-inf")  # sending resets them, as in grpc
        parts = []
        if head is not None:
            parts.append(self._header_frames(stream.id, head, end=False))
        if stream.pending or (data and len(data) > min(stream.send_window, self._send_window)):  # held
            stream.pending += data
            if trailers is not None:
                stream.pending_trailers = trailers
            if parts:
                transport.write(b"".join(parts))
            self._blocked[stream.id] = stream
            self._flush(stream)
            return stream.id in self._blocked
        if data:
            parts.append(self._data_frames(stream, data))
        if trailers is not None:
            parts.append(self._header_frames(stream.id, trailers, end=True))
        if parts:
            transport.write(b"".join(parts))
            if self._paused:
                self._check_output()
        if trailers is not None:  # after the write: closing the last stream may close the transport
            self._local_close(stream)
        return False

    def _data_frames(self, stream: Stream, data: bytes) -> bytes:
        size = len(data)
        stream.send_window -= size
        self._send_window -= size
        step = self._max_frame
        if size <= step:
            return frame(DATA, 0, stream.id, data)
        return b"".join(frame(DATA, 0, stream.id, data[i:i + step]) for i in range(0, size, step))

    def _header_frames(self, sid: int, block: bytes, end: bool) -> bytes:
        flags = END_STREAM if end else 0
        step = self._max_frame
        if len(block) <= step:
            return frame(HEADERS, flags | END_HEADERS, sid, block)
        chunks = [block[i:i + step] for i in range(0, len(block), step)]
        out = [frame(HEADERS, flags, sid, chunks[0])]
        out.extend(frame(CONTINUATION, END_HEADERS if i == len(chunks) - 1 else 0, sid, c)
                   for i, c in enumerate(chunks[1:], 1))
        return b"".join(out)

    def _flush(self, stream: Stream) -> None:
        """Sends what the windows allow of a stream's held DATA, then its trailers."""
        if self.transport is None or self.transport.is_closing():
            return
        allowed = min(stream.send_window, self._send_window)
        parts = []
        ended = False
        if allowed > 0 and stream.pending:
            chunk, stream.pending = stream.pending[:allowed], stream.pending[allowed:]
            parts.append(self._data_frames(stream, chunk))
        if not stream.pending:
            self._blocked.pop(stream.id, None)
            if stream.pending_trailers is not None:
                parts.append(self._header_frames(stream.id, stream.pending_trailers, end=True))
                stream.pending_trailers = None
                ended = True
            if stream.window_open is not None:
                stream.window_open.set()
        if parts:
            self.transport.write(b"".join(parts))
            if self._paused:
                self._check_output()
        if ended:  # after the write, as in send()
            self._local_close(stream)

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self._send_window <= 0:
                return
            self._flush(stream)

    async def wait_sent(self, stream: Stream) -> None:
        """Returns once a stream's held DATA has gone out and the transport takes more."""
        if stream.id in self._blocked and not self.closed.is_set():
            stream.window_open = asyncio.Event()
            closed = asyncio.ensure_future(self.closed.wait())
            try:
                await asyncio.wait((asyncio.ensure_future(stream.window_open.wait()), closed),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                stream.window_open = None
        await self.drain()

    def reset(self, stream: Stream, code: int = CANCEL, cancel: bool = False) -> None:
        """RST_STREAM from our side; `cancel` cancels the stream's handler too."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        self._forget(stream, cancel)

    def _local_close(self, stream: Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._forget(stream)
            return
        # Answered before the request ended (an error, or a handler that stopped reading): the
        # rest of the request is read and dropped (see _data), and what was held is given back
        # with a full stream window so the peer can finish. RFC 9113 8.1 would allow
        # RST_STREAM(NO_ERROR) here, but grpc's C-core client then fails a call whose status it
        # has already received ("Stream removed").
        if stream.held:
            self._give(stream.held)
            stream.held = 0
        unconsumed = self.limits.stream_window - stream.recv_window - stream.credit
        if unconsumed > 0:
            self.credit(stream, unconsumed)

    def _forget(self, stream: Stream, cancel: bool = False) -> None:
        """The stream is closed: its bytes go back to the connection window, its handler is
        cancelled if asked, and it lets go of the server's state (no cycle outlives it)."""
        stream.local_closed = True
        if self.streams.pop(stream.id, None) is not None:
            self._remember(stream.id, stream.remote_closed)
            if not self.streams:
                self._idle_since = time.monotonic()
        if stream.held:
            self._give(stream.held)
            stream.held = 0
        self._blocked.pop(stream.id, None)
        if stream.window_open is not None:
            stream.window_open.set()
        if cancel:
            _cancel(stream)
        stream.on_data = stream.on_reset = stream.call = stream.task = None
        stream.pending, stream.pending_trailers = b"", None
        if (self.goaway_sent or self.goaway_received) and not self.streams and self.transport is not None:
            self.transport.close()

    def _remember(self, sid: int, ended: bool) -> None:
        remembered = self._ended
        if len(remembered) >= _REMEMBERED:
            del remembered[next(iter(remembered))]
        remembered[sid] = ended

    # --- closing ------------------------------------------------------------------------------

    def goaway(self, code: int = NO_ERROR, message: str = "") -> None:
        """Tells the peer no new stream will be accepted; the connection closes when the open
        streams are done (or at once with nothing open)."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            payload = _U32.pack(self._last_stream) + _U32.pack(code) + message.encode()[:256]
            self.transport.write(frame(GOAWAY, 0, 0, payload))
        if not self.streams:
            self.transport.close()

    def _fail(self, code: int, message: str) -> None:
        self._warnings.log(logging.INFO, "connection-error", "HTTP/2 connection from %s ended: %s", self.peer, message)
        self.goaway(code, message)
        self._close()
        self._buf = b""

    def _close(self) -> None:
        """Closes the transport; at once if the peer is not reading (a close would wait for
        output it never takes)."""
        if self.transport is not None:
            if self._paused:
                self.transport.abort()
            else:
                self.transport.close()


class Refusal(asyncio.Protocol):
    """A connection over the server's cap: told GOAWAY ENHANCE_YOUR_CALM and closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp: asyncio.Transport = transport  # type: ignore[assignment]
        tcp.write(frame(SETTINGS, 0, 0) + frame(GOAWAY, 0, 0, _U32.pack(0) + _U32.pack(ENHANCE_YOUR_CALM)
                                                 + b"too many connections"))
        tcp.close()


def _held(stream: Stream) -> int:
    return stream.held


def _cancel(stream: Stream) -> None:
    if stream.on_reset is not None:
        stream.on_reset(stream)
    if stream.task is not None:
        stream.task.cancel()


def _unpad(payload: bytes) -> bytes:
    if not payload:
        raise H2Error(PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise H2Error(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - pad]
