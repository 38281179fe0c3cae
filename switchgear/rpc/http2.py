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

Abuse limits (the HTTP/2 attacks of 2023-2024): at most `max_concurrent_streams` open streams
(REFUSED_STREAM beyond), header blocks bounded while they are collected (CONTINUATION flood),
peer resets bounded per second (rapid reset), and a connection whose peer stops reading while
our output grows is closed. Responses are encoded without the dynamic table or Huffman, so the
peer's HEADER_TABLE_SIZE never matters. Not thread-safe: one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from hpack.exceptions import HPACKError

from switchgear.rpc.headers import HeaderDecoder

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
DEFAULT_FRAME = 16_384
MAX_FRAME = 2**24 - 1

#: Our receive windows: a stream may send this much before we credit it (1 MiB); the connection
#: as a whole 16 MiB. Credit is given back as data is consumed (unary requests: at once, since
#: the server's receive limit already bounds what one call may buffer).
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 1 << 24
#: A header block (HEADERS + CONTINUATIONs, compressed) larger than this ends the connection.
MAX_HEADER_BLOCK = 64 * 1024
#: Stream resets the peer may send per second before the connection is closed (rapid reset).
MAX_RESETS_PER_S = 200
#: Output held for a peer that does not read before its connection is closed.
MAX_BUFFERED_OUTPUT = 32 << 20

_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")


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
    which a reset or a lost connection cancels (after `on_reset`)."""

    __slots__ = (
        "call",
        "conn",
        "credit",
        "headers",
        "id",
        "local_closed",
        "on_data",
        "on_reset",
        "pending",
        "pending_trailers",
        "remote_closed",
        "send_window",
        "task",
        "window_open",
    )

    def __init__(self, stream_id: int, conn: Connection, headers: list[tuple[bytes, bytes]], send_window: int) -> None:
        self.id = stream_id
        self.conn = conn
        self.headers = headers
        self.remote_closed = False
        self.local_closed = False
        self.send_window = send_window
        self.pending = b""  # DATA held for flow control
        self.pending_trailers: bytes | None = None
        self.window_open: asyncio.Event | None = None
        self.task: asyncio.Task[Any] | None = None
        self.on_data: Callable[[Stream, bytes, bool], None] | None = None
        self.on_reset: Callable[[Stream], None] | None = None
        self.credit = 0  # bytes received on this stream not yet credited back
        self.call: Any = None  # the server's state for this stream


#: What the server does with a stream whose headers have arrived.
Handler = Callable[[Stream], None]


class Connection(asyncio.Protocol):
    """One HTTP/2 connection. `on_stream(stream)` is called once a stream's headers have
    arrived; the server then reads the body through `stream.on_data` and answers with `send`."""

    def __init__(self, on_stream: Handler, *, max_concurrent_streams: int, max_header_list_size: int,
                 on_close: Callable[[Connection], None]) -> None:
        self._on_stream = on_stream
        self._on_close = on_close
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_size = max_header_list_size
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.peer_cert: dict[str, Any] | None = None  # the client's certificate (TLS with client certificates)
        self.streams: dict[int, Stream] = {}
        self._buf = b""
        self._preface = False
        self._decoder = HeaderDecoder(max_list_size=max_header_list_size)
        self._last_stream = 0
        self._header_block: list[bytes] | None = None  # a block waiting for CONTINUATION
        self._header_stream = 0
        self._header_flags = 0
        self._header_size = 0
        self._send_window = DEFAULT_WINDOW
        self._initial_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._max_frame = DEFAULT_FRAME  # the peer's SETTINGS_MAX_FRAME_SIZE
        self._credit = 0  # connection-level bytes received not yet credited back
        self._blocked: dict[int, Stream] = {}  # streams holding DATA for a window
        self._resets = 0
        self._reset_window = 0.0
        self._paused = False
        self._drained: asyncio.Event | None = None
        self.goaway_sent = False
        self.goaway_received = False
        self.closed = asyncio.Event()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        self.transport = tcp
        tcp.set_write_buffer_limits(high=1 << 20)  # pause_writing beyond 1 MiB held
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            family = "ipv6" if ":" in str(peer[0]) else "ipv4"
            host = f"[{peer[0]}]" if family == "ipv6" else peer[0]
            self.peer = f"{family}:{host}:{peer[1]}"
        self.peer_cert = transport.get_extra_info("peercert") or None
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (SETTINGS_MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
            (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (SETTINGS_MAX_HEADER_LIST_SIZE, self.max_header_list_size),
            (SETTINGS_ENABLE_PUSH, 0),
        ))
        tcp.write(frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)))

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in list(self.streams.values()):
            self._forget(stream)
            _cancel(stream)
        if self._drained is not None:
            self._drained.set()
        self.closed.set()
        self._on_close(self)

    def pause_writing(self) -> None:
        self._paused = True
        if self.transport is not None and self.transport.get_write_buffer_size() > MAX_BUFFERED_OUTPUT:
            log.warning("closing the connection from %s: it stopped reading", self.peer)
            self.transport.abort()

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None:
            self._drained.set()
            self._drained = None

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
        if self._credit >= CONNECTION_WINDOW // 4:
            out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._credit)))
            self._credit = 0
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if self._header_block is not None and kind != CONTINUATION:
            raise H2Error(PROTOCOL_ERROR, "expected CONTINUATION")
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
            self._window_update(sid, payload)
        elif kind == PING:
            if sid != 0 or len(payload) != 8:
                raise H2Error(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "malformed PING")
            if not flags & ACK:
                out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self._reset_by_peer(sid, payload)
        elif kind == GOAWAY:
            self.goaway_received = True
            if not self.streams and self.transport is not None:
                self.transport.close()
        elif kind == PRIORITY:
            if sid == 0 or len(payload) != 5:
                raise H2Error(PROTOCOL_ERROR, "malformed PRIORITY")
        elif kind == PUSH_PROMISE:
            raise H2Error(PROTOCOL_ERROR, "a client cannot push")
        # Unknown frame types are ignored (RFC 9113 section 4.1).

    def _data(self, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid == 0:
            raise H2Error(PROTOCOL_ERROR, "DATA on stream 0")
        self._credit += len(payload)  # padding counts against the window too
        if flags & PADDED:
            payload = _unpad(payload)
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self._last_stream:
                raise H2Error(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we have answered or reset: frames in flight are ignored
        if stream.remote_closed:
            self.reset(stream, STREAM_CLOSED)
            _cancel(stream)
            return
        ended = bool(flags & END_STREAM)
        if ended:
            stream.remote_closed = True
        if stream.local_closed:  # answered already: drop the rest, keep the client's window open
            if payload and not ended:
                out.append(frame(WINDOW_UPDATE, 0, sid, _U32.pack(len(payload))))
        elif stream.on_data is not None:
            stream.on_data(stream, payload, ended)  # the reader credits the stream as it consumes
        if ended and stream.local_closed:
            self._forget(stream)

    def _headers(self, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid == 0 or sid % 2 == 0:
            raise H2Error(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._headers_complete(flags, sid, payload, out)
            return
        self._header_block, self._header_stream, self._header_flags, self._header_size = [], sid, flags, 0
        self._collect(payload)

    def _collect(self, chunk: bytes) -> None:
        assert self._header_block is not None
        self._header_size += len(chunk)
        if self._header_size > MAX_HEADER_BLOCK:
            raise H2Error(ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} bytes")
        self._header_block.append(chunk)

    def _headers_complete(self, flags: int, sid: int, block: bytes, out: list[bytes]) -> None:
        headers = self._decoder.decode(block)  # always: the decoder's table must follow
        stream = self.streams.get(sid)
        if stream is not None:  # trailers: they end the request
            if not flags & END_STREAM or stream.remote_closed:
                raise H2Error(PROTOCOL_ERROR, f"second HEADERS on stream {sid} without END_STREAM")
            self._data(END_STREAM, sid, b"", out)
            return
        if sid <= self._last_stream:
            raise H2Error(PROTOCOL_ERROR, f"HEADERS on closed stream {sid}")
        self._last_stream = sid
        if self.goaway_sent:
            out.append(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        if len(self.streams) >= self.max_concurrent_streams:
            out.append(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        stream = Stream(sid, self, headers, self._initial_window)
        self.streams[sid] = stream
        try:
            self._on_stream(stream)
        except Exception:  # a server bug must cost this stream, not the connection
            log.exception("stream %d from %s failed at its headers", sid, self.peer)
            self.reset(stream, INTERNAL_ERROR)
            _cancel(stream)
            return
        if flags & END_STREAM:
            self._data(END_STREAM, sid, b"", out)

    def _settings(self, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid != 0:
            raise H2Error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2Error(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
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
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= MAX_FRAME:
                    raise H2Error(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self._max_frame = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise H2Error(PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
        out.append(frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    def _window_update(self, sid: int, payload: bytes) -> None:
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
        stream = self.streams.get(sid)
        if stream is None:
            return
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            self.reset(stream, PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR)
            _cancel(stream)  # the stream is gone: its handler must not run on
            return
        stream.send_window += increment
        if stream.id in self._blocked:
            self._flush(stream)

    def _reset_by_peer(self, sid: int, payload: bytes) -> None:
        if sid == 0 or len(payload) != 4:
            raise H2Error(PROTOCOL_ERROR, "malformed RST_STREAM")
        now = time.monotonic()
        if now - self._reset_window >= 1.0:
            self._reset_window, self._resets = now, 0
        self._resets += 1
        if self._resets > MAX_RESETS_PER_S:
            raise H2Error(ENHANCE_YOUR_CALM, f"over {MAX_RESETS_PER_S} stream resets per second")
        stream = self.streams.get(sid)
        if stream is None:
            return
        self._forget(stream)
        _cancel(stream)

    # --- sending ------------------------------------------------------------------------------

    def send(self, stream: Stream, head: bytes | None, data: bytes, trailers: bytes | None) -> bool:
        """Sends a header block (`head`), DATA and a trailer block, each optional, in one write
        when the windows allow; DATA beyond them (and the trailers after it) wait for
        WINDOW_UPDATE. Returns False when everything was sent."""
        if stream.local_closed or self.transport is None or self.transport.is_closing():
            return False
        parts = []
        if head is not None:
            parts.append(self._header_frames(stream.id, head, end=False))
        if stream.pending or (data and len(data) > min(stream.send_window, self._send_window)):  # held
            stream.pending += data
            if trailers is not None:
                stream.pending_trailers = trailers
            if parts:
                self.transport.write(b"".join(parts))
            self._blocked[stream.id] = stream
            self._flush(stream)
            return stream.id in self._blocked
        if data:
            parts.append(self._data_frames(stream, data))
        if trailers is not None:
            parts.append(self._header_frames(stream.id, trailers, end=True))
        if parts:
            self.transport.write(b"".join(parts))
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

    def credit(self, stream: Stream, consumed: int) -> None:
        """Gives back stream window for request bytes the handler has consumed."""
        stream.credit += consumed
        if stream.credit >= STREAM_WINDOW // 4 and not stream.remote_closed and self.transport is not None:
            self.transport.write(frame(WINDOW_UPDATE, 0, stream.id, _U32.pack(stream.credit)))
            stream.credit = 0

    def reset(self, stream: Stream, code: int = CANCEL) -> None:
        """RST_STREAM from our side (the handler is cancelled by the caller if need be)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        self._forget(stream)

    def _local_close(self, stream: Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._forget(stream)
        # Answered before the request ended (an error, or a handler that stopped reading): the
        # rest of the request is read and dropped (see _data). RFC 9113 8.1 would allow
        # RST_STREAM(NO_ERROR) here, but grpc's C-core client then fails a call whose status it
        # has already received ("Stream removed").

    def _forget(self, stream: Stream) -> None:
        stream.local_closed = True
        self.streams.pop(stream.id, None)
        self._blocked.pop(stream.id, None)
        if stream.window_open is not None:
            stream.window_open.set()
        if (self.goaway_sent or self.goaway_received) and not self.streams and self.transport is not None:
            self.transport.close()

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
        log.info("HTTP/2 connection from %s ended: %s", self.peer, message)
        self.goaway(code, message)
        if self.transport is not None:
            self.transport.close()
        self._buf = b""


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
