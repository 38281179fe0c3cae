"""Fuzz targets for switchgear.rpc: one function per parser, each taking arbitrary bytes.

A target returns normally for every input; the only exceptions it lets out are bugs (what the
parser under test should have turned into a protocol error). `fuzz_rpc.py` runs them under
atheris (coverage-guided, `make fuzz`); tests/test_fuzz_corpus.py replays every file of
tests/fuzz/corpus/<target>/ through them in `make test`.

- `frames`: bytes after the client preface, fed to a real `rpc.Server` connection (frame reader,
  HPACK, gRPC request handling with a unary and a streaming method) over a fake transport.
- `hpack`: header blocks (split at 0xFF 0xFE 0xFD) decoded in turn by one `HeaderDecoder`, so the
  dynamic table and the block cache carry over; where the `hpack` package also decodes a block,
  both must agree.
- `grpc_messages`: a request body cut into length-prefixed gRPC messages as the server does,
  for streaming (`_next_messages`, fed in pieces) and unary (`_request`) calls; the first byte
  picks grpc-encoding and the piece size.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
import hpack
from hpack.exceptions import HPACKError

from switchgear import rpc
from switchgear.rpc import http2
from switchgear.rpc.headers import HeaderDecoder
from switchgear.rpc.server import Context, Server, _Reject

SERVICE = "fuzz.Echo"
BLOCK_SEPARATOR = b"\xff\xfe\xfd"
ENCODINGS = (b"identity", b"gzip", b"deflate", b"br")
MAX_RECEIVE = 64 * 1024


class FakeTransport(asyncio.Transport):
    """Takes writes and drops them (counting), as a peer that reads everything would."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    async for request in requests:
        yield request


def _server() -> Server:
    server = rpc.Server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
    }),))
    return server


class _Tracebacks(logging.Handler):
    """Records switchgear.rpc log lines that carry a traceback: the server logs one only for a
    bug of its own (bad input must end as a protocol error or a status, logged without one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append(self.format(record))


class _Frames:
    """The `frames` target's event loop and server, made once per process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = _server()
        self.tracebacks = _Tracebacks()
        logging.getLogger("switchgear.rpc").addHandler(self.tracebacks)

    def __call__(self, data: bytes) -> None:
        self.tracebacks.seen.clear()
        self.loop.run_until_complete(self._one(data))
        assert not self.tracebacks.seen, self.tracebacks.seen[0]

    async def _one(self, data: bytes) -> None:
        conn = self.server._connection()
        transport = FakeTransport()
        conn.connection_made(transport)
        step = 1 + (data[0] if data else 0) * 7  # bytes per read: frames split across reads too
        payload = http2.PREFACE + data
        for pos in range(0, len(payload), step):
            if transport.closing:
                break
            conn.data_received(payload[pos:pos + step])
            await asyncio.sleep(0)  # let started handlers run
        assert len(conn.streams) <= conn.max_concurrent_streams
        await asyncio.sleep(0)
        conn.connection_lost(None)
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        assert not self.server._connections


def hpack_blocks(data: bytes) -> None:
    ours = HeaderDecoder()
    theirs = hpack.Decoder()
    theirs.max_header_list_size = ours.max_list_size
    in_step = True  # while both decoders have accepted every block, their tables match
    for block in data.split(BLOCK_SEPARATOR):
        try:
            fields = ours.decode(block)
        except HPACKError:
            return  # the connection ends here (COMPRESSION_ERROR): the table is dead
        if not in_step:
            continue
        try:
            expected = theirs.decode(block, raw=True)
        except HPACKError:
            in_step = False
            continue
        except Exception:  # the hpack package's own failures (e.g. Huffman EOS) are not ours to judge
            in_step = False
            continue
        assert [(bytes(n), bytes(v)) for n, v in expected] == fields, (expected, fields)


def grpc_messages(data: bytes) -> None:
    if not data:
        return
    control, body = data[0], data[1:]
    encoding = ENCODINGS[control & 3]
    step = 1 + (control >> 2) * 3
    server = _message_server()
    handler = SimpleNamespace(request_deserializer=None)
    streaming = Context(server, None, "/fuzz.Echo/Stream", (), handler, encoding, None)  # type: ignore[arg-type]
    try:
        for pos in range(0, len(body), step):
            streaming._body += body[pos:pos + step]
            for message, _ in streaming._next_messages():
                assert len(message) <= MAX_RECEIVE
    except _Reject:
        pass
    unary = Context(server, None, "/fuzz.Echo/Unary", (), handler, encoding, None)  # type: ignore[arg-type]
    unary._chunks = [body[:len(body) // 2], body[len(body) // 2:]]
    with contextlib.suppress(_Reject):
        assert len(server._request(unary)) <= MAX_RECEIVE


@functools.cache
def _message_server() -> Server:
    return rpc.Server(max_receive_message_length=MAX_RECEIVE)


@functools.cache
def _frames_target() -> _Frames:
    return _Frames()


def frames(data: bytes) -> None:
    _frames_target()(data)


TARGETS: dict[str, Callable[[bytes], None]] = {"frames": frames, "hpack": hpack_blocks, "grpc_messages": grpc_messages}
