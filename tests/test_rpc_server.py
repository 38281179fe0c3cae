"""switchgear.rpc.Server: gRPC semantics against grpc's own clients (grpc.aio and the sync
stack), and the HTTP/2 connection's protocol rules and abuse limits with a hand-written client."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import hpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from switchgear.rpc import http2
from switchgear.rpc.http2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from switchgear.rpc.server import Server

SERVICE = "t.Test"
ECHO, FAIL, ABORT, META, BLOCK, STATUS = (f"/{SERVICE}/{m}" for m in ("Echo", "Fail", "Abort", "Meta", "Block",
                                                                       "Status"))
REMAINING, NUMBERS, TICKS, JOIN, CHAT = (f"/{SERVICE}/{m}" for m in ("Remaining", "Numbers", "Ticks", "Join", "Chat"))
WAIT = 5.0  # the bound on every wait in this file
NON_ASCII = "naïve – 100% sûr ✓ \"quoted\"\n"
BIN = bytes(range(256))


def bounded(awaitable: Any, timeout: float = WAIT) -> Any:
    return asyncio.wait_for(awaitable, timeout)


@dataclass
class Probe:
    """What the handlers saw: they signal through events, never timing."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    arrivals: int = 0
    crowd: asyncio.Event = field(default_factory=asyncio.Event)  # set when `arrivals` reaches `expect`
    expect: int = 0
    metadata: tuple[tuple[str, str | bytes], ...] = ()


def handlers(probe: Probe) -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ValueError("boom")

    async def abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, NON_ASCII,
                            trailing_metadata=(("x-why", "policy"), ("x-why-bin", b"\x00\x01")))
        raise AssertionError("abort returned")

    async def status(request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("no such thing")
        return None

    async def meta(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        probe.metadata = tuple(context.invocation_metadata())
        await context.send_initial_metadata((("x-initial", "first"), ("x-initial-bin", BIN)))
        context.set_trailing_metadata((("x-trailing", "last"), ("x-trailing-bin", BIN[::-1])))
        return b"meta:" + request

    async def block(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        probe.arrivals += 1
        probe.started.set()
        if probe.arrivals == probe.expect:
            probe.crowd.set()
        try:
            await probe.release.wait()
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        return request

    async def remaining(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return repr(context.time_remaining()).encode()

    async def numbers(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        count, size = (int(x) for x in request.split(b","))
        for i in range(count):
            yield bytes((i % 251,)) * size

    async def ticks(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"tick"
        try:
            await probe.release.wait()
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        yield b"tock"

    async def join(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return b"|".join([r async for r in requests])

    async def chat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        # read()/write() rather than iterators: the other half of the ServicerContext API.
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message[::-1])
        await context.write(b"bye")

    unary = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": unary(echo), "Fail": unary(fail), "Abort": unary(abort), "Status": unary(status),
        "Meta": unary(meta), "Block": unary(block), "Remaining": unary(remaining),
        "Numbers": grpc.unary_stream_rpc_method_handler(numbers),
        "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
        "Join": grpc.stream_unary_rpc_method_handler(join),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })


@contextlib.asynccontextmanager
async def serving(probe: Probe, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                  setup: Callable[[Server], None] | None = None, **options: Any) -> AsyncIterator[tuple[Server, str]]:
    server = Server(interceptors, **options)
    server.add_generic_rpc_handlers((handlers(probe),))
    if setup is not None:
        setup(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        probe.release.set()
        await bounded(server.stop(None))


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def address(probe: Probe) -> AsyncIterator[str]:
    async with serving(probe) as (_, address):
        yield address


@pytest.fixture
async def channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield channel


async def unary(channel: grpc.aio.Channel, method: str, request: bytes = b"", **kwargs: Any) -> bytes:
    result: bytes = await channel.unary_unary(method)(request, timeout=kwargs.pop("timeout", WAIT), **kwargs)
    return result


async def failure(awaitable: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bounded(awaitable)
    return caught.value


# --- grpc.aio client --------------------------------------------------------------------------

async def test_unary(channel: grpc.aio.Channel) -> None:
    assert await unary(channel, ECHO, b"hello") == b"hello"
    assert await unary(channel, ECHO, b"") == b""
    big = bytes(range(256)) * 8000  # 2 MB: more than one stream window of request body
    assert await unary(channel, ECHO, big) == big


async def test_server_streaming_through_send_flow_control(channel: grpc.aio.Channel) -> None:
    size, count = 100 * 1024, 20  # each message over 64 KiB, 2 MB in all: windows close and reopen
    call = channel.unary_stream(NUMBERS)(b"%d,%d" % (count, size), timeout=WAIT)
    received = [m async for m in call]
    assert [len(m) for m in received] == [size] * count
    assert all(m == bytes((i % 251,)) * size for i, m in enumerate(received))
    assert await call.code() == grpc.StatusCode.OK


async def test_client_streaming(channel: grpc.aio.Channel) -> None:
    parts = [b"a", b"", b"b" * 70_000, b"c" * 300_000, b"d"]  # messages across DATA frames and windows
    assert await channel.stream_unary(JOIN)(iter(parts), timeout=WAIT) == b"|".join(parts)
    assert await channel.stream_unary(JOIN)(iter(()), timeout=WAIT) == b""


async def test_bidi_streaming(channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream(CHAT)(timeout=WAIT)
    for text in (b"abc", b"hello", b"x" * 100_000):
        await call.write(text)
        assert await bounded(call.read()) == text[::-1]  # answered one by one, not at the end
    await call.done_writing()
    assert await bounded(call.read()) == b"bye"
    assert await bounded(call.read()) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_metadata_both_ways(channel: grpc.aio.Channel, probe: Probe) -> None:
    call = channel.unary_unary(META)(b"x", timeout=WAIT,
                                     metadata=(("x-text", "hello world"), ("x-data-bin", BIN), ("x-text", "again")))
    assert await call == b"meta:x"
    sent = [(k, v) for k, v in probe.metadata if k.startswith("x-")]
    # grpc's client may group repeated keys; the values of one key keep their order.
    assert sorted(sent, key=repr) == sorted([("x-text", "hello world"), ("x-data-bin", BIN), ("x-text", "again")],
                                            key=repr)
    assert [v for k, v in sent if k == "x-text"] == ["hello world", "again"]
    assert all(k not in ("content-type", "te", "grpc-timeout") and not k.startswith(":") for k, _ in probe.metadata)
    initial = tuple(await call.initial_metadata())
    trailing = tuple(await call.trailing_metadata())
    assert ("x-initial", "first") in initial and ("x-initial-bin", BIN) in initial
    assert ("x-trailing", "last") in trailing and ("x-trailing-bin", BIN[::-1]) in trailing


async def test_abort_keeps_a_non_ascii_message_and_trailers(channel: grpc.aio.Channel) -> None:
    error = await failure(unary(channel, ABORT))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == NON_ASCII
    trailing = tuple(error.trailing_metadata() or ())
    assert ("x-why", "policy") in trailing and ("x-why-bin", b"\x00\x01") in trailing


async def test_set_code_without_abort(channel: grpc.aio.Channel) -> None:
    error = await failure(unary(channel, STATUS))
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "no such thing")


async def test_handler_exception_is_unknown(channel: grpc.aio.Channel) -> None:
    error = await failure(unary(channel, FAIL))
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert "Unexpected" in (error.details() or "") and "boom" in (error.details() or "")
    assert await unary(channel, ECHO, b"still") == b"still"


async def test_deadline_cancels_the_handler(channel: grpc.aio.Channel, probe: Probe) -> None:
    error = await failure(unary(channel, BLOCK, b"x", timeout=0.3))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await bounded(probe.cancelled.wait())
    assert probe.started.is_set()


async def test_time_remaining_follows_grpc_timeout(channel: grpc.aio.Channel) -> None:
    remaining = float(await unary(channel, REMAINING, timeout=30))
    assert 20 < remaining <= 31  # grpc rounds the timeout it sends up (to 100 ms here)
    assert await channel.unary_unary(REMAINING)(b"") == b"None"  # no deadline


async def test_client_cancel_cancels_the_handler(channel: grpc.aio.Channel, probe: Probe) -> None:
    call = channel.unary_unary(BLOCK)(b"x", timeout=WAIT)
    await bounded(probe.started.wait())
    assert call.cancel()
    await bounded(probe.cancelled.wait())
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_client_cancel_stops_a_streaming_handler(channel: grpc.aio.Channel, probe: Probe) -> None:
    call = channel.unary_stream(TICKS)(b"", timeout=WAIT)
    assert await bounded(call.read()) == b"tick"
    call.cancel()
    await bounded(probe.cancelled.wait())


async def test_unknown_method(channel: grpc.aio.Channel) -> None:
    for method in (f"/{SERVICE}/Nope", "/no.Such/Service"):
        error = await failure(unary(channel, method))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    error = await failure(channel.unary_stream(f"/{SERVICE}/Nope")(b"", timeout=WAIT).read())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("shape", ["unary", "client-streaming"])
async def test_request_over_the_receive_limit(channel: grpc.aio.Channel, shape: str) -> None:
    big = b"\x01" * (4 * 1024 * 1024 + 1)
    if shape == "unary":
        error = await failure(unary(channel, ECHO, big))
    else:
        error = await failure(channel.stream_unary(JOIN)(iter((b"ok", big)), timeout=WAIT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The same connection serves the next calls, the rest of the big request drained and dropped.
    assert await unary(channel, ECHO, b"next") == b"next"
    assert await channel.stream_unary(JOIN)(iter((b"a", b"b")), timeout=WAIT) == b"a|b"


@pytest.mark.parametrize("split", [5, 2])
async def test_a_unary_request_declaring_too_large_a_message_is_refused_from_its_prefix(address: str,
                                                                                        split: int) -> None:
    """Refused once the 5-byte prefix is in (whole or split over frames), before the rest
    arrives: no server buffers up to the limit for a message it will refuse anyway."""
    declared = b"\x00" + (4 * 1024 * 1024 + 1).to_bytes(4, "big")
    async with Client.open(address) as client:
        client.send(client.headers(1), frame(DATA, 0, 1, declared[:split]))
        if split < 5:
            client.send(frame(DATA, 0, 1, declared[split:] + b"x"))
        answer = await client.response(1)  # the stream stays open on the client's side: nothing more is sent
        status = answer.trailers.get("grpc-status") or answer.headers.get("grpc-status")
        assert status == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


async def test_exactly_the_receive_limit_is_accepted(probe: Probe) -> None:
    async with serving(probe, max_receive_message_length=100_000) as (_, address), \
            grpc.aio.insecure_channel(address) as channel:
        assert await unary(channel, ECHO, b"z" * 100_000) == b"z" * 100_000
        error = await failure(unary(channel, ECHO, b"z" * 100_001))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_gzip_request(address: str) -> None:
    payload = b"compressible " * 10_000
    async with grpc.aio.insecure_channel(address, compression=grpc.Compression.Gzip) as channel:
        assert await unary(channel, ECHO, payload) == payload
        assert await channel.stream_unary(JOIN)(iter((payload, b"x")), timeout=WAIT) == payload + b"|x"
        # The limit applies to the message once inflated: 5 MiB of zeros is a few KiB on the wire.
        error = await failure(unary(channel, ECHO, bytes(5 * 1024 * 1024)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "decompressed" in (error.details() or "")
    async with grpc.aio.insecure_channel(address) as channel:
        assert await unary(channel, ECHO, payload, compression=grpc.Compression.Deflate) == payload


class Recording(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name, self.log = name, log

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.log.append((self.name, details.method))
        if self.name == "auth" and ("x-key", "secret") not in tuple(details.invocation_metadata):
            async def deny(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no key")
                raise AssertionError("abort returned")
            return grpc.unary_unary_rpc_method_handler(deny)
        return await continuation(details)


async def test_interceptors_run_in_registration_order(probe: Probe) -> None:
    log: list[tuple[str, str]] = []
    interceptors = (Recording("first", log), Recording("auth", log), Recording("last", log))
    async with serving(probe, interceptors) as (_, address), grpc.aio.insecure_channel(address) as channel:
        assert await unary(channel, ECHO, b"x", metadata=(("x-key", "secret"),)) == b"x"
        assert log == [("first", ECHO), ("auth", ECHO), ("last", ECHO)]
        log.clear()
        error = await failure(unary(channel, ECHO, b"x"))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, "no key")
        assert log == [("first", ECHO), ("auth", ECHO)]  # the chain stopped where it was answered
        log.clear()
        parts = [m async for m in channel.unary_stream(NUMBERS)(b"2,3", timeout=WAIT,
                                                                metadata=(("x-key", "secret"),))]
        assert parts == [b"\x00" * 3, b"\x01" * 3]
        assert log == [("first", NUMBERS), ("auth", NUMBERS), ("last", NUMBERS)]


async def test_health_and_reflection(probe: Probe) -> None:
    health = HealthServicer()
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)

    def setup(server: Server) -> None:  # as the agent does: generated add_*_to_server, then reflection
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(names, server)

    async with serving(probe, setup=setup) as (_, address), grpc.aio.insecure_channel(address) as channel:
        await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        stub = health_pb2_grpc.HealthStub(channel)

        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        error = await failure(stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=WAIT))
        assert error.code() == grpc.StatusCode.NOT_FOUND

        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=WAIT)
        assert (await bounded(watch.read())).status == health_pb2.HealthCheckResponse.SERVING
        await health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert (await bounded(watch.read())).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()

        info = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                  reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health")]),
            timeout=WAIT)
        answers = [a async for a in info]
        assert {s.name for s in answers[0].list_services_response.service} == set(names)
        assert answers[1].file_descriptor_response.file_descriptor_proto  # serialized descriptors


async def test_stop_lets_calls_in_flight_finish(probe: Probe) -> None:
    server = Server()
    server.add_generic_rpc_handlers((handlers(probe),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await unary(channel, ECHO, b"warm") == b"warm"
            in_flight = asyncio.ensure_future(unary(channel, BLOCK, b"in flight"))
            await bounded(probe.started.wait())
            stopping = asyncio.ensure_future(server.stop(WAIT))  # runs up to its GOAWAY before the call below
            error = await failure(unary(channel, ECHO, b"late"))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as fresh:
                assert (await failure(unary(fresh, ECHO, b"new"))).code() == grpc.StatusCode.UNAVAILABLE
            assert not in_flight.done() and not stopping.done()
            probe.release.set()
            assert await bounded(in_flight) == b"in flight"
            await bounded(stopping)
            assert await bounded(server.wait_for_termination(0.1))
    finally:
        await bounded(server.stop(None))


async def test_stop_grace_runs_out(probe: Probe) -> None:
    async with serving(probe) as (server, address), grpc.aio.insecure_channel(address) as channel:
        in_flight = asyncio.ensure_future(unary(channel, BLOCK, b"x"))
        await bounded(probe.started.wait())
        started = time.monotonic()
        await bounded(server.stop(0.2))
        assert time.monotonic() - started >= 0.15
        await bounded(probe.cancelled.wait())
        with pytest.raises(grpc.aio.AioRpcError):
            await bounded(in_flight)


async def test_many_concurrent_calls(channel: grpc.aio.Channel, probe: Probe) -> None:
    """200 calls on one connection: 100 open at once (the default stream limit; every handler
    waits until all 100 have arrived), the rest queued by the client; each answered with its own
    request."""
    probe.expect = http2.Limits().max_concurrent_streams
    requests = [b"call %d " % i * (i % 50 + 1) for i in range(200)]
    calls = asyncio.gather(*(unary(channel, BLOCK, r, timeout=20) for r in requests))
    await bounded(probe.crowd.wait(), 20)
    probe.release.set()
    assert await bounded(calls, 20) == requests


def _sync_calls(address: str) -> tuple[bytes, tuple[Any, ...], grpc.StatusCode, str, list[bytes]]:
    with grpc.insecure_channel(address) as channel:
        reply, call = channel.unary_unary(META).with_call(b"sync", timeout=WAIT, metadata=(("x-text", "sync"),))
        trailing = tuple(call.trailing_metadata())
        try:
            channel.unary_unary(ABORT)(b"", timeout=WAIT)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        else:
            raise AssertionError("ABORT succeeded")
        stream = list(channel.unary_stream(NUMBERS)(b"3,70000", timeout=WAIT))
    return reply, trailing, code, details, stream


async def test_sync_grpc_client(address: str, probe: Probe) -> None:
    reply, trailing, code, details, stream = await bounded(asyncio.to_thread(_sync_calls, address), 15)
    assert reply == b"meta:sync"
    assert ("x-text", "sync") in probe.metadata
    assert ("x-trailing-bin", BIN[::-1]) in trailing
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, NON_ASCII)
    assert stream == [bytes((i,)) * 70000 for i in range(3)]


# --- raw HTTP/2 -------------------------------------------------------------------------------

_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")


@dataclass
class Frame:
    kind: int
    flags: int
    sid: int
    payload: bytes

    @property
    def code(self) -> int:  # RST_STREAM's, or GOAWAY's error code
        return int(_U32.unpack_from(self.payload, 4 if self.kind == GOAWAY else 0)[0])


@dataclass
class Response:
    headers: dict[str, str]
    messages: list[bytes]
    trailers: dict[str, str]


class Client:
    """Just enough HTTP/2 to speak to the server frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.server_settings: dict[int, int] = {}
        # Every stream's answer as frames are read, whoever reads them: header blocks (decoded in
        # order, as HPACK requires), DATA, and whether END_STREAM has come.
        self.blocks: dict[int, list[dict[str, str]]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, address: str, *, preface: bool = True, settings: Iterable[tuple[int, int]] = ()
                   ) -> AsyncIterator[Client]:
        host, port = address.rsplit(":", 1)
        reader, writer = await bounded(asyncio.open_connection(host, int(port)))
        client = cls(reader, writer)
        if preface:
            client.send(PREFACE + frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(*s) for s in settings)))
        try:
            yield client
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await bounded(writer.wait_closed())

    def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))

    async def frame(self) -> Frame | None:
        """The next frame, or None at end of stream."""
        try:
            head = await bounded(self.reader.readexactly(9))
            length = int.from_bytes(head[:3], "big")
            payload = await bounded(self.reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None
        got = Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload)
        if got.kind == SETTINGS and not got.flags:
            for offset in range(0, len(payload), 6):
                key, value = _SETTING.unpack_from(payload, offset)
                self.server_settings[key] = value
        elif got.kind == HEADERS:
            assert got.flags & END_HEADERS, "the server's header blocks are small"
            self.blocks.setdefault(got.sid, []).append({str(n): str(v) for n, v in self.decoder.decode(got.payload)})
        elif got.kind == DATA:
            self.bodies[got.sid] = self.bodies.get(got.sid, b"") + payload
        if got.kind in (HEADERS, DATA) and got.flags & END_STREAM:
            self.ended.add(got.sid)
        return got

    async def until_any(self, kinds: Iterable[int]) -> Frame:
        """The next frame of one of these kinds (SETTINGS, WINDOW_UPDATE and others skipped)."""
        wanted = set(kinds)
        while True:
            got = await self.frame()
            assert got is not None, "connection closed"
            if got.kind in wanted:
                return got

    async def until(self, kind: int, *, sid: int | None = None, flags: int | None = None) -> Frame:
        """Reads up to the first frame of this kind (and stream, and flags), skipping others."""
        while True:
            got = await self.frame()
            assert got is not None, f"connection closed before a frame of type {kind}"
            if got.kind == kind and (sid is None or got.sid == sid) and (flags is None or got.flags & flags == flags):
                return got

    async def goaway(self) -> int:
        """The error code of the GOAWAY that ends the connection, after which it closes."""
        got = await self.until(GOAWAY)
        while (after := await self.frame()) is not None:
            assert after.kind != HEADERS, after
        return got.code

    async def closed_or_goaway(self) -> int | None:
        while (got := await self.frame()) is not None:
            if got.kind == GOAWAY:
                return got.code
        return None

    def headers(self, sid: int, path: str = ECHO, *, method: str = "POST", content_type: str = "application/grpc",
                extra: Iterable[tuple[str, str]] = (), end_stream: bool = False) -> bytes:
        block = self.block(path, method=method, content_type=content_type, extra=extra)
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, block)

    def block(self, path: str = ECHO, *, method: str = "POST", content_type: str = "application/grpc",
              extra: Iterable[tuple[str, str]] = ()) -> bytes:
        fields = [(":method", method), (":scheme", "http"), (":path", path), (":authority", "test"),
                  ("content-type", content_type), ("te", "trailers"), *extra]
        return bytes(self.encoder.encode(fields))

    async def response(self, sid: int) -> Response:
        """One stream's answer: its headers, its messages, its trailers (empty when the answer was
        trailers-only)."""
        while sid not in self.ended:
            got = await self.frame()
            assert got is not None, "connection closed before the response ended"
            assert not (got.kind == RST_STREAM and got.sid == sid), f"stream {sid} reset with {got.code}"
        blocks, body = self.blocks.get(sid, []), self.bodies.get(sid, b"")
        assert 1 <= len(blocks) <= 2, blocks
        messages = []
        while body:
            assert body[0] == 0 and len(body) >= 5
            length = int.from_bytes(body[1:5], "big")
            messages.append(body[5:5 + length])
            body = body[5 + length:]
        return Response(blocks[0], messages, blocks[1] if len(blocks) > 1 else {})


def message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes((compressed,)) + len(payload).to_bytes(4, "big") + payload


def request(client: Client, sid: int, payload: bytes, path: str = ECHO, **kwargs: Any) -> bytes:
    return client.headers(sid, path, **kwargs) + frame(DATA, END_STREAM, sid, message(payload))


async def test_raw_unary_and_trailers_only(address: str) -> None:
    async with Client.open(address) as client:
        client.send(request(client, 1, b"hi"))
        answer = await client.response(1)
        assert answer.headers[":status"] == "200" and answer.headers["content-type"] == "application/grpc"
        assert answer.messages == [b"hi"] and answer.trailers == {"grpc-status": "0"}
        client.send(request(client, 3, b"", path="/no.Such/Method"))
        answer = await client.response(3)  # trailers-only: status and headers in one block
        assert answer.headers[":status"] == "200" and answer.headers["grpc-status"] == "12"
        assert answer.messages == [] and answer.trailers == {}


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/1.1\r\n", b"\x16\x03\x01"])
async def test_bad_preface(address: str, data: bytes) -> None:
    async with Client.open(address, preface=False) as client:
        client.send(data)
        assert await client.closed_or_goaway() == http2.PROTOCOL_ERROR
        assert await client.frame() is None  # closed


async def test_settings_acked_and_advertised(probe: Probe) -> None:
    async with serving(probe, max_concurrent_streams=7) as (_, address), Client.open(address) as client:
        await client.until(SETTINGS, flags=http2.ACK)
        assert client.server_settings[http2.SETTINGS_MAX_CONCURRENT_STREAMS] == 7
        assert client.server_settings[http2.SETTINGS_ENABLE_PUSH] == 0
        # DATA frames stay within 16,384 bytes until the client allows larger ones.
        client.send(request(client, 1, b"1,40000", path=NUMBERS))
        sizes = [len((await client.until(DATA, sid=1)).payload) for _ in range(3)]
        assert sizes == [16_384, 16_384, 40_005 - 2 * 16_384]
        assert (await client.response(1)).messages == [b"\x00" * 40_000]
        client.send(frame(SETTINGS, 0, 0, _SETTING.pack(http2.SETTINGS_MAX_FRAME_SIZE, 1 << 20)),
                    frame(WINDOW_UPDATE, 0, 0, _U32.pack(1 << 20)))  # the first answer used 40,005 of 65,535
        await client.until(SETTINGS, flags=http2.ACK)
        client.send(request(client, 3, b"1,40000", path=NUMBERS))
        assert len((await client.until(DATA, sid=3)).payload) == 40_005


async def test_ping_answered_with_its_payload(address: str) -> None:
    async with Client.open(address) as client:
        client.send(frame(PING, 0, 0, b"12345678"))
        got = await client.until(PING)
        assert (got.flags, got.payload) == (http2.ACK, b"12345678")
        client.send(frame(PING, http2.ACK, 0, b"ackedack"), frame(PING, 0, 0, b"87654321"))  # ACKs are not answered
        assert (await client.until(PING)).payload == b"87654321"


@pytest.mark.parametrize(("method", "content_type", "status"), [("GET", "application/grpc", "405"),
                                                                ("POST", "text/plain", "415"),
                                                                ("POST", "", "415")])
async def test_not_grpc(address: str, method: str, content_type: str, status: str) -> None:
    async with Client.open(address) as client:
        client.send(client.headers(1, method=method, content_type=content_type, end_stream=True))
        answer = await client.response(1)
        assert answer.headers[":status"] == status
        client.send(request(client, 3, b"ok"))  # the connection goes on
        assert (await client.response(3)).messages == [b"ok"]


async def test_header_block_in_continuations_with_padding_and_priority(address: str) -> None:
    async with Client.open(address) as client:
        block = client.block(extra=[("x-long", "v" * 500)])
        padded = bytes((7,)) + b"\x00\x00\x00\x00\x10" + block[:100] + b"\x00" * 7  # pad length, priority
        client.send(frame(HEADERS, PADDED | PRIORITY_FLAG, 1, padded),
                    frame(CONTINUATION, 0, 1, block[100:300]),
                    frame(CONTINUATION, END_HEADERS, 1, block[300:]),
                    frame(DATA, PADDED | END_STREAM, 1, bytes((3,)) + message(b"padded") + b"\x00" * 3))
        assert (await client.response(1)).messages == [b"padded"]


@pytest.mark.parametrize("bad", [
    frame(HEADERS, END_HEADERS | END_STREAM, 2, b"\x83"),  # even stream id: the server's
    frame(HEADERS, END_HEADERS | END_STREAM, 0, b"\x83"),
    frame(DATA, 0, 0, b"x"),
    frame(DATA, 0, 9, b"x"),  # DATA on an idle stream
    frame(http2.PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02\x83"),
    frame(CONTINUATION, END_HEADERS, 1, b"\x83"),  # CONTINUATION without HEADERS
])
async def test_protocol_errors_end_the_connection(address: str, bad: bytes) -> None:
    async with Client.open(address) as client:
        client.send(bad)
        assert await client.goaway() == http2.PROTOCOL_ERROR


async def test_bad_header_block_is_a_compression_error(address: str) -> None:
    async with Client.open(address) as client:
        client.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xbe"))  # empty dynamic table
        assert await client.goaway() == http2.COMPRESSION_ERROR


async def test_frame_over_16384_bytes(address: str) -> None:
    async with Client.open(address) as client:
        client.send(client.headers(1), frame(DATA, 0, 1, b"x" * 16_385))
        assert await client.goaway() == http2.FRAME_SIZE_ERROR


async def test_connection_window_overflow(address: str) -> None:
    async with Client.open(address) as client:
        client.send(frame(WINDOW_UPDATE, 0, 0, _U32.pack(http2.MAX_WINDOW)))  # 65,535 + 2^31-1
        assert await client.goaway() == http2.FLOW_CONTROL_ERROR


async def test_stream_window_overflow_resets_and_cancels(address: str, probe: Probe) -> None:
    async with Client.open(address) as client:
        client.send(request(client, 1, b"x", path=BLOCK))
        await bounded(probe.started.wait())
        client.send(frame(WINDOW_UPDATE, 0, 1, _U32.pack(http2.MAX_WINDOW)))
        assert (await client.until(RST_STREAM, sid=1)).code == http2.FLOW_CONTROL_ERROR
        await bounded(probe.cancelled.wait())  # the handler of a stream we reset does not run on
        client.send(request(client, 3, b"after"))  # a stream error: the connection goes on
        assert (await client.response(3)).messages == [b"after"]


async def test_concurrent_stream_limit(probe: Probe) -> None:
    async with serving(probe, max_concurrent_streams=2) as (_, address), Client.open(address) as client:
        client.send(request(client, 1, b"one", path=BLOCK), request(client, 3, b"three", path=BLOCK),
                    request(client, 5, b"five", path=BLOCK))
        refused = await client.until(RST_STREAM)
        assert (refused.sid, refused.code) == (5, http2.REFUSED_STREAM)
        probe.release.set()
        answers = {sid: await client.response(sid) for sid in (1, 3)}
        assert answers[1].messages == [b"one"] and answers[3].messages == [b"three"]
        assert probe.arrivals == 2  # the refused stream never reached its handler
        client.send(request(client, 7, b"seven", path=BLOCK))  # room again
        assert (await client.response(7)).messages == [b"seven"]


async def test_rapid_reset(address: str, probe: Probe) -> None:
    async with Client.open(address) as client:
        burst = [client.headers(sid, BLOCK) + frame(RST_STREAM, 0, sid, _U32.pack(http2.CANCEL))
                 for sid in range(1, 2 * http2.Limits().max_resets_per_s + 4, 2)]  # MAX_RESETS_PER_S + 2 of them
        client.send(*burst)
        assert await client.goaway() == http2.ENHANCE_YOUR_CALM
    assert probe.arrivals == 0


async def test_resets_under_the_limit_are_fine(address: str) -> None:
    async with Client.open(address) as client:
        sids = range(1, 2 * http2.Limits().max_resets_per_s, 2)  # exactly MAX_RESETS_PER_S
        client.send(*(client.headers(sid, BLOCK) + frame(RST_STREAM, 0, sid, _U32.pack(http2.CANCEL)) for sid in sids))
        sid = sids[-1] + 2
        client.send(request(client, sid, b"still here"))
        assert (await client.response(sid)).messages == [b"still here"]


async def test_continuation_flood(address: str) -> None:
    async with Client.open(address) as client:
        chunk = b"\x00" * 16_384
        client.send(frame(HEADERS, 0, 1, chunk),
                    *(frame(CONTINUATION, 0, 1, chunk) for _ in range(http2.MAX_HEADER_BLOCK // len(chunk))))
        assert await client.goaway() == http2.ENHANCE_YOUR_CALM


@pytest.mark.parametrize("reopen", ["stream WINDOW_UPDATE", "SETTINGS"])
async def test_response_held_for_the_stream_window(address: str, reopen: str) -> None:
    async with Client.open(address, settings=[(http2.SETTINGS_INITIAL_WINDOW_SIZE, 1000)]) as client:
        payload = bytes(range(250)) * 20  # 5,000 bytes, 5,005 framed
        client.send(request(client, 1, payload))
        while len(client.bodies.get(1, b"")) < 1000:
            await client.until(DATA, sid=1)
        assert len(client.bodies[1]) == 1000
        client.send(frame(PING, 0, 0, b"stalled?"))  # answered at once: held DATA could only precede it
        got = await client.until_any((DATA, PING, HEADERS))
        assert got.kind == PING, f"frame {got.kind} past a closed stream window"
        if reopen == "SETTINGS":  # a larger initial window applies to open streams too
            client.send(frame(SETTINGS, 0, 0, _SETTING.pack(http2.SETTINGS_INITIAL_WINDOW_SIZE, 65_535)))
        else:
            client.send(frame(WINDOW_UPDATE, 0, 1, _U32.pack(10_000)))
        answer = await client.response(1)
        assert answer.messages == [payload]
        assert answer.headers[":status"] == "200" and answer.trailers == {"grpc-status": "0"}


async def test_response_held_for_the_connection_window(address: str) -> None:
    async with Client.open(address, settings=[(http2.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)]) as client:
        client.send(request(client, 1, b"2,60000", path=NUMBERS))  # 120,010 bytes framed > 65,535
        while len(client.bodies.get(1, b"")) < 65_535:
            await client.until(DATA, sid=1)
        assert len(client.bodies[1]) == 65_535
        client.send(frame(PING, 0, 0, b"stalled?"))
        got = await client.until_any((DATA, PING, HEADERS))
        assert got.kind == PING, f"frame {got.kind} past a closed connection window"
        client.send(frame(WINDOW_UPDATE, 0, 0, _U32.pack(1 << 20)))
        answer = await client.response(1)
        assert answer.messages == [b"\x00" * 60_000, b"\x01" * 60_000]
        assert answer.trailers == {"grpc-status": "0"}


async def test_server_side_deadline(address: str, probe: Probe) -> None:
    async with Client.open(address) as client:
        client.send(request(client, 1, b"x", path=BLOCK, extra=[("grpc-timeout", "100m")]))
        answer = await bounded(client.response(1))
        status = answer.trailers or answer.headers
        assert status["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        assert probe.cancelled.is_set()
        client.send(request(client, 3, b"x", path=ECHO, extra=[("grpc-timeout", "soon")]))
        assert (await client.response(3)).headers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress),
                                                    ("deflate", zlib.compress)])
async def test_raw_compressed_request(address: str, encoding: str, compress: Any) -> None:
    async with Client.open(address) as client:
        payload = b"squeeze me " * 1000
        client.send(client.headers(1, extra=[("grpc-encoding", encoding)]),
                    frame(DATA, END_STREAM, 1, message(compress(payload), compressed=True)))
        assert (await client.response(1)).messages == [payload]
        client.send(client.headers(3, extra=[("grpc-encoding", "snappy")]),
                    frame(DATA, END_STREAM, 3, message(b"??", compressed=True)))
        assert (await client.response(3)).headers["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])


async def test_deadline_while_the_request_is_still_arriving(address: str) -> None:
    async with Client.open(address) as client:
        client.send(client.headers(1, extra=[("grpc-timeout", "50m")]),
                    frame(DATA, 0, 1, message(b"half")[:5]))  # never ends
        answer = await client.response(1)
        assert answer.headers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])


async def test_request_ended_by_trailers(address: str) -> None:
    async with Client.open(address) as client:
        client.send(client.headers(1), frame(DATA, 0, 1, message(b"with trailers")),
                    frame(HEADERS, END_HEADERS | END_STREAM, 1, bytes(client.encoder.encode([("x-t", "1")]))))
        assert (await client.response(1)).messages == [b"with trailers"]


@pytest.mark.parametrize("held", [False, True], ids=["sent-at-once", "held-for-the-window"])
async def test_last_response_after_peer_goaway_is_complete(address: str, probe: Probe, held: bool) -> None:
    """Once the peer has sent GOAWAY, the connection closes with its last stream: the frames
    that end that stream must go out before the close, not be dropped by it."""
    window = 1000 if held else 65_535
    async with Client.open(address, settings=[(http2.SETTINGS_INITIAL_WINDOW_SIZE, window)]) as client:
        payload = bytes(range(250)) * 20
        client.send(request(client, 1, payload, path=BLOCK))
        await bounded(probe.started.wait())
        client.send(frame(GOAWAY, 0, 0, _U32.pack(0) + _U32.pack(http2.NO_ERROR)), frame(PING, 0, 0, b"goaway?!"))
        await client.until(PING)  # the server has read the GOAWAY
        probe.release.set()
        if held:
            while len(client.bodies.get(1, b"")) < window:
                await client.until(DATA, sid=1)
            client.send(frame(WINDOW_UPDATE, 0, 1, _U32.pack(10_000)))
        answer = await client.response(1)
        assert answer.messages == [payload] and answer.trailers == {"grpc-status": "0"}
        assert await client.frame() is None  # and then the server closes the connection


# --- nothing left behind --------------------------------------------------------------------------


async def test_a_mixed_storm_leaves_no_stream_or_task_behind(probe: Probe) -> None:
    """400 calls over two channels mixing answers, errors, aborts, expired deadlines, client
    cancels, streams and oversized requests: afterwards no connection holds a stream (nor a
    held DATA buffer) and no handler task is left running."""
    async with serving(probe) as (server, address):
        before = len(asyncio.all_tasks())
        async with grpc.aio.insecure_channel(address) as first, grpc.aio.insecure_channel(address) as second:
            async def one(i: int) -> str:
                channel = first if i % 2 else second
                kind = i % 8
                try:
                    if kind == 0:
                        await unary(channel, ECHO, b"x" * 100)
                    elif kind == 1:
                        await unary(channel, FAIL)
                    elif kind == 2:
                        await unary(channel, ABORT)
                    elif kind == 3:
                        await unary(channel, BLOCK, timeout=0.05)  # the deadline passes while it blocks
                    elif kind == 4:
                        call = channel.unary_unary(BLOCK)(b"", timeout=WAIT)
                        await bounded(probe.started.wait())
                        call.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await call
                    elif kind == 5:
                        assert len([m async for m in channel.unary_stream(NUMBERS)(b"3,70000", timeout=WAIT)]) == 3
                    elif kind == 6:
                        call = channel.unary_stream(TICKS)(b"", timeout=WAIT)
                        assert await bounded(call.read()) == b"tick"
                        call.cancel()
                    else:
                        await unary(channel, ECHO, b"y" * (server.max_receive + 1))
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                return "OK"

            outcomes = await bounded(asyncio.gather(*(one(i) for i in range(400))), 30)
            assert outcomes.count("OK") >= 150  # echoes, streams, cancelled calls that returned
            assert {"UNKNOWN", "PERMISSION_DENIED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"} <= set(outcomes)
            assert server._connections  # still open (the channels may share one): what they hold is checked

            def settled() -> bool:
                return (all(not conn.streams and not conn._blocked for conn in server._connections)
                        and len(asyncio.all_tasks()) <= before)

            deadline = asyncio.get_running_loop().time() + WAIT
            while not settled():  # a poll with a deadline: cancelled handlers finish on the next turns
                assert asyncio.get_running_loop().time() < deadline, (
                    [len(c.streams) for c in server._connections], len(asyncio.all_tasks()), before)
                await asyncio.sleep(0.01)
