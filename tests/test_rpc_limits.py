"""switchgear.rpc's limits, one test (at least) per field of http2.Limits: each is set small and
hit with a hand-written client, and the connection (or the stream) ends as the docs say while
the server stays whole. Also: memory of closed connections is freed without the cycle
collector, and bad input gets one rate-limited log line."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from switchgear.rpc import http2
from switchgear.rpc.http2 import (
    CONTINUATION,
    DATA,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Connection,
    Limits,
    frame,
)
from switchgear.rpc.server import Server, Warnings
from tests.test_rpc_server import (
    _U32,
    BLOCK,
    ECHO,
    WAIT,
    Client,
    Probe,
    bounded,
    message,
    request,
    serving,
)

pytestmark = pytest.mark.timeout(30)

HOLD, BIG = "/t.Limits/Hold", "/t.Limits/Big"


def limit_handlers(probe: Probe) -> grpc.GenericRpcHandler:
    async def hold(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        """Reads nothing until released, then everything."""
        probe.started.set()
        await probe.release.wait()
        return b"%d" % len([r async for r in requests])

    async def big(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await probe.release.wait()
        return b"x" * int(request)

    return grpc.method_handlers_generic_handler("t.Limits", {
        "Hold": grpc.stream_unary_rpc_method_handler(hold), "Big": grpc.unary_unary_rpc_method_handler(big)})


@contextlib.asynccontextmanager
async def limited(probe: Probe, **limits: Any) -> AsyncIterator[tuple[Server, str]]:
    def setup(server: Server) -> None:
        server.add_generic_rpc_handlers((limit_handlers(probe),))

    async with serving(probe, setup=setup, limits=Limits(**limits)) as served:
        yield served


@pytest.fixture
def probe() -> Probe:
    return Probe()


async def until(condition: Any, what: str) -> None:
    """A poll with a deadline, for state only the server can see."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.005)


async def settled(client: Client) -> None:
    """Acknowledges the server's SETTINGS, as every real client does, and waits for its ACK."""
    client.send(frame(SETTINGS, http2.ACK, 0))
    await client.until(SETTINGS, flags=http2.ACK)


async def frames_until_ping(client: Client, data: bytes = b"syncsync") -> list[Any]:
    """Every frame the server sends before it answers this PING (which it reads after the rest)."""
    client.send(frame(PING, 0, 0, data))
    seen = []
    while True:
        got = await client.frame()
        assert got is not None, "connection closed"
        if got.kind == PING and got.payload == data:
            return seen
        seen.append(got)


async def frames_through(client: Client, kind: int) -> list[Any]:
    """Every frame up to and including the first of this kind."""
    seen = []
    while not seen or seen[-1].kind != kind:
        got = await client.frame()
        assert got is not None, "connection closed"
        seen.append(got)
    return seen


# --- receive flow control (stream_window, connection_window) ----------------------------------


async def test_data_beyond_the_stream_window_resets_the_stream(probe: Probe) -> None:
    async with limited(probe, stream_window=65_535) as (_, address), Client.open(address) as client:
        client.send(client.headers(1, HOLD), frame(DATA, 0, 1, message(b"a" * 16_000)) * 4)  # 64,020 bytes
        await bounded(probe.started.wait())
        assert not [f for f in await frames_until_ping(client) if f.kind == WINDOW_UPDATE and f.sid == 1], \
            "credit for bytes no handler has read"
        client.send(frame(DATA, 0, 1, b"x" * 2000))  # 66,020 > 65,535
        assert (await client.until(RST_STREAM, sid=1)).code == http2.FLOW_CONTROL_ERROR
        client.send(request(client, 3, b"after"))  # a stream error: the connection goes on
        assert (await client.response(3)).messages == [b"after"]


async def test_data_beyond_the_connection_window_ends_the_connection(probe: Probe) -> None:
    async with limited(probe, connection_window=100_000) as (_, address), Client.open(address) as client:
        body = message(b"y" * 200_000)  # one message, more than the connection window: held whole
        client.send(client.headers(1, HOLD), *(frame(DATA, 0, 1, body[i:i + 16_000]) for i in range(0, 80_000, 16_000)))
        await frames_until_ping(client)
        client.send(frame(DATA, 0, 1, body[80_000:96_384]))  # 3,616 left
        await frames_until_ping(client)
        client.send(frame(DATA, 0, 1, body[96_384:100_001]))
        assert await client.goaway() == http2.FLOW_CONTROL_ERROR


async def test_consumed_bytes_are_credited(probe: Probe) -> None:
    async with limited(probe, stream_window=65_535) as (_, address), Client.open(address) as client:
        client.send(client.headers(1, HOLD), *(frame(DATA, 0, 1, message(b"z" * 30_000)[i:i + 15_000])
                                                for i in range(0, 30_005, 15_000)))
        await bounded(probe.started.wait())
        probe.release.set()  # the handler reads both messages: the stream's window comes back
        update = await client.until(WINDOW_UPDATE, sid=1)
        assert _U32.unpack(update.payload)[0] >= 65_535 // 4
        client.send(frame(DATA, END_STREAM, 1, message(b"z" * 10_000)))
        assert (await client.response(1)).messages == [b"2"]


async def test_messages_larger_than_the_stream_window_still_arrive(probe: Probe) -> None:
    """Window is credited as the handler consumes, but a message cannot be consumed before it is
    whole: one larger than the stream window is credited as it arrives (bounded by the receive
    limit), in unary and streaming calls, many at once on one connection (grpc.aio's client)."""
    big = [bytes((i,)) * 1_200_000 for i in range(3)]  # 1.2 MB each, the window 64 KiB
    async with limited(probe, stream_window=65_535) as (_, address), grpc.aio.insecure_channel(address) as channel:
        join = channel.stream_unary("/t.Test/Join")
        chat = channel.stream_stream("/t.Test/Chat")

        async def chatted() -> list[bytes]:
            return [m async for m in chat(iter(big), timeout=WAIT * 2)]

        echoes, joined, replies = await bounded(asyncio.gather(
            asyncio.gather(*(channel.unary_unary(ECHO)(b, timeout=WAIT * 2) for b in big)),
            join(iter(big), timeout=WAIT * 2), chatted()), WAIT * 3)
        assert echoes == big and joined == b"|".join(big) and replies == [b[::-1] for b in big] + [b"bye"]


async def test_unfinished_unary_requests_are_bounded_per_connection(probe: Probe) -> None:
    """Unary requests whose end never comes hold the connection window: the peer cannot send
    more than `connection_window` of them, and once it is full the stream holding the most is
    reset with ENHANCE_YOUR_CALM and its bytes credited back, so other calls go on."""
    window = 200_000
    async with limited(probe, connection_window=window) as (server, address), Client.open(address) as client:
        await settled(client)
        declared = message(b"u" * 1_000_000)[:5]  # a 1 MB message, never finished
        for sid in (1, 3, 5, 7):
            part = declared + b"u" * (window // 4 - 5)
            client.send(client.headers(sid, ECHO), *(frame(DATA, 0, sid, part[i:i + 16_384])
                                                       for i in range(0, len(part), 16_384)))
        seen = await frames_through(client, RST_STREAM)
        assert [(f.sid, f.code) for f in seen if f.kind == RST_STREAM] == [(1, http2.ENHANCE_YOUR_CALM)]
        assert sum(_U32.unpack(f.payload)[0] for f in seen if f.kind == WINDOW_UPDATE and f.sid == 0) == window // 4
        conn = next(iter(server._connections))
        assert sum(s.held for s in conn.streams.values()) == window - window // 4
        client.send(request(client, 9, b"still served"))
        assert (await client.response(9)).messages == [b"still served"]


# --- output and floods (max_output, header blocks) --------------------------------------------


@pytest.mark.parametrize("flood", ["PING", "SETTINGS"])
async def test_a_flood_from_a_peer_that_never_reads_stops_being_read(probe: Probe, flood: str) -> None:
    """Each PING or SETTINGS asks for an answer; a peer that sends them and reads nothing makes
    the server stop reading it once its output passes the high-water mark: memory stays flat."""
    async with limited(probe, ping_strikes=0) as (server, address), Client.open(address) as client:
        one = frame(PING, 0, 0, b"12345678") if flood == "PING" else frame(SETTINGS, 0, 0)
        client.send(one * ((12 << 20) // len(one)))  # 12 MiB of frames, each answered with as much or more
        await until(lambda: server._connections and next(iter(server._connections))._paused, "reading never paused")
        conn = next(iter(server._connections))
        held = conn.transport.get_write_buffer_size() if conn.transport else 0
        assert held <= server.limits.max_output
        await asyncio.sleep(0.1)  # more time changes nothing: the server is not reading
        assert conn.transport is not None and conn.transport.get_write_buffer_size() == held
        client.writer.transport.abort()  # its own unsent frames would hold a close


async def test_data_on_an_answered_stream_adds_no_output_per_frame(probe: Probe) -> None:
    async with Client.open(f"{(await _address(probe))}") as client:
        client.send(client.headers(1, "/no.Such/Method"))  # answered at once; the request goes on
        await client.until(HEADERS, sid=1)
        client.send(*(frame(DATA, 0, 1, b"x") for _ in range(20_000)))
        updates = [f for f in await frames_until_ping(client) if f.kind == WINDOW_UPDATE]
        assert len(updates) <= 2, "a WINDOW_UPDATE per 1-byte frame"


async def test_output_over_max_output_closes_the_connection(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    """Unary answers are written whatever the peer reads: past `max_output` held, the
    connection is closed (GOAWAY ENHANCE_YOUR_CALM, then the transport aborted)."""
    async with limited(probe, max_output=2 << 20) as (server, address), \
            Client.open(address, settings=[(http2.SETTINGS_INITIAL_WINDOW_SIZE, http2.MAX_WINDOW)]) as client:
        client.send(frame(WINDOW_UPDATE, 0, 0, _U32.pack(http2.MAX_WINDOW - 65_535)))
        client.send(*(request(client, sid, b"%d" % (2 << 20), path=BIG) for sid in range(1, 33, 2)))  # 32 MiB
        await until(lambda: len(next(iter(server._connections)).streams) == 16, "requests not all read")
        probe.release.set()
        await until(lambda: not server._connections, "the connection stayed open")
    assert any("stopped reading" in r.getMessage() for r in caplog.records)


async def test_empty_continuation_frames_count_against_the_header_block(probe: Probe) -> None:
    async with Client.open(await _address(probe)) as client:
        client.send(frame(HEADERS, 0, 1, client.block()),
                    *(frame(CONTINUATION, 0, 1) for _ in range(http2.MAX_HEADER_BLOCK // 9)))
        assert await client.goaway() == http2.ENHANCE_YOUR_CALM


async def test_header_list_over_max_header_list_size(probe: Probe) -> None:
    async with limited(probe, max_header_list_size=2048) as (_, address), Client.open(address) as client:
        await client.until(SETTINGS)
        assert client.server_settings[http2.SETTINGS_MAX_HEADER_LIST_SIZE] == 2048
        client.send(request(client, 1, b"small", extra=[("x-pad", "p" * 1500)]))
        assert (await client.response(1)).messages == [b"small"]
        client.send(request(client, 3, b"big", extra=[("x-pad", "p" * 2100)]))
        assert await client.goaway() == http2.COMPRESSION_ERROR


# --- streams (max_concurrent_streams, max_resets_per_s) ---------------------------------------


async def test_max_concurrent_streams_is_advertised_and_enforced(probe: Probe) -> None:
    async with limited(probe, max_concurrent_streams=3) as (_, address), Client.open(address) as client:
        client.send(*(request(client, sid, b"x", path=BLOCK) for sid in (1, 3, 5, 7)))
        refused = await client.until(RST_STREAM)
        assert (refused.sid, refused.code) == (7, http2.REFUSED_STREAM)
        assert client.server_settings[http2.SETTINGS_MAX_CONCURRENT_STREAMS] == 3


async def test_malformed_streams_count_as_resets(probe: Probe) -> None:
    """A flood of requests the server must reset (here: uppercase header names) ends the
    connection like a flood of the peer's own resets."""
    async with limited(probe, max_resets_per_s=20) as (_, address), Client.open(address) as client:
        client.send(*(client.headers(sid, extra=[("X-Upper", "1")], end_stream=True) for sid in range(1, 44, 2)))
        assert await client.goaway() == http2.ENHANCE_YOUR_CALM


# --- connections (max_connections, preface_timeout_s, idle_timeout_s, ping_strikes) -----------


async def test_connections_over_max_connections_are_refused_at_once(probe: Probe) -> None:
    async with limited(probe, max_connections=2) as (server, address), \
            Client.open(address) as first, Client.open(address) as second:
        await until(lambda: len(server._connections) == 2, "two connections")
        async with Client.open(address) as third:
            assert await third.closed_or_goaway() == http2.ENHANCE_YOUR_CALM
            assert await third.frame() is None
        for sid, client in ((1, first), (1, second)):
            client.send(request(client, sid, b"served"))
            assert (await client.response(sid)).messages == [b"served"]
        await first.writer.drain()
    await until(lambda: len(server._connections) <= 1, "closed connections counted")


@pytest.mark.parametrize(("preface", "code"), [(False, None), (True, http2.SETTINGS_TIMEOUT)],
                         ids=["no-preface", "settings-never-acknowledged"])
async def test_preface_timeout(probe: Probe, preface: bool, code: int | None) -> None:
    async with limited(probe, preface_timeout_s=0.2) as (server, address), \
            Client.open(address, preface=preface) as client:
        if not preface:
            client.send(http2.PREFACE[:10])  # a slowloris: the start of a preface, then nothing
        got = await client.closed_or_goaway()
        assert got == (code if preface else http2.PROTOCOL_ERROR)
        await until(lambda: not server._connections, "the connection stayed open")


async def test_preface_timeout_covers_the_tls_handshake(tmp_path: Any) -> None:
    """A client that opens a TLS port and never finishes its handshake is cut at the preface
    timeout too (not asyncio's default of 60 s)."""
    from switchgear.tls import ServerTls, add_port
    from tests.certs import make_certs

    certs = make_certs(tmp_path)
    server = Server(limits=Limits(preface_timeout_s=0.2))
    port = add_port(server, "127.0.0.1:0", ServerTls(certs.server_cert, certs.server_key))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        started = asyncio.get_running_loop().time()
        with contextlib.suppress(ConnectionError):
            assert await bounded(reader.read()) == b""
        assert asyncio.get_running_loop().time() - started < WAIT / 2
        writer.close()
        assert not server._connections  # a handshake that failed holds no place under max_connections
    finally:
        await server.stop(None)


async def test_idle_connection_is_closed(probe: Probe) -> None:
    async with limited(probe, idle_timeout_s=0.3) as (server, address), Client.open(address) as client:
        await settled(client)
        client.send(request(client, 1, b"x", path=BLOCK))
        await bounded(probe.started.wait())
        await asyncio.sleep(0.6)  # twice the idle timeout with a stream open: not idle
        assert not [f for f in await frames_until_ping(client) if f.kind == GOAWAY]
        probe.release.set()
        assert (await client.response(1)).messages == [b"x"]
        assert await client.goaway() == http2.NO_ERROR  # idle from the answer on
        assert not server._connections


async def test_too_many_pings_without_data(probe: Probe) -> None:
    async with limited(probe, ping_strikes=2) as (_, address), Client.open(address) as client:
        for data in (b"ping0001", b"ping0002", b"ping0003"):  # the first is free, then two strikes
            await frames_until_ping(client, data)
        client.send(request(client, 1, b"data resets the strikes"))
        await client.response(1)
        for data in (b"ping0004", b"ping0005", b"ping0006"):
            await frames_until_ping(client, data)
        client.send(frame(PING, 0, 0, b"ping0007"))  # a third strike
        goaway = await client.until(GOAWAY)
        assert goaway.code == http2.ENHANCE_YOUR_CALM and goaway.payload[8:] == b"too_many_pings"


def test_every_limit_is_an_agent_flag() -> None:
    from switchgear.cli import build_parser
    from switchgear.rpc import options

    assert sorted(field for _, field, _, _ in options.FLAGS) == sorted(f.name for f in dataclasses.fields(Limits))
    base = ["agent", "--control-plane", "127.0.0.1:1"]
    assert options.limits(build_parser().parse_args(base)) == Limits()  # the defaults are Limits' own
    given = build_parser().parse_args([*base, "--grpc-max-connections", "5", "--grpc-idle-timeout", "0.5",
                                       "--grpc-stream-window", "70000", "--grpc-ping-strikes", "0"])
    assert options.limits(given) == Limits(max_connections=5, idle_timeout_s=0.5, stream_window=70_000,
                                           ping_strikes=0)
    with pytest.raises(ValueError, match="--grpc-max-output: 10 is out of range"):
        options.limits(build_parser().parse_args([*base, "--grpc-max-output", "10"]))
    grpcio = dict(options.grpcio_options(Limits(max_concurrent_streams=7, idle_timeout_s=2)))
    assert grpcio["grpc.max_concurrent_streams"] == 7 and grpcio["grpc.max_connection_idle_ms"] == 2000


def test_limits_refuse_values_out_of_range() -> None:
    for field, value in (("stream_window", 1000), ("connection_window", 2**31), ("max_concurrent_streams", 0),
                         ("max_header_list_size", 100), ("max_output", 1000), ("max_connections", 0),
                         ("preface_timeout_s", 0), ("idle_timeout_s", -1), ("ping_strikes", -1)):
        with pytest.raises(ValueError, match=field):
            Limits(**{field: value})


async def _address(probe: Probe) -> str:
    """One default server for the tests that do not set a limit, stopped with the test."""
    stack = contextlib.AsyncExitStack()
    _, address = await stack.enter_async_context(serving(probe))
    _stacks.append(stack)
    return address


_stacks: list[contextlib.AsyncExitStack] = []


@pytest.fixture(autouse=True)
async def _close_servers() -> AsyncIterator[None]:
    yield
    while _stacks:
        await _stacks.pop().aclose()


# --- memory: closed connections, bad input in the log ------------------------------------------


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def test_closed_connections_are_freed_without_the_cycle_collector(probe: Probe) -> None:
    """With the cycle collector off, 20 connections that made calls of every shape (answered,
    failed, streamed, reset by the client, cut by the connection's end) leave no Connection,
    Stream or Context alive once closed: nothing of theirs is kept in a reference cycle."""
    from switchgear.rpc.server import Context

    async with serving(probe) as (server, address):
        with collector_off():
            before = (alive(Connection), alive(http2.Stream), alive(Context))
            for _ in range(20):
                async with Client.open(address) as client:
                    await settled(client)
                    client.send(request(client, 1, b"answered"), request(client, 3, b"", path="/t.Test/Abort"),
                                request(client, 5, b"1,10", path="/t.Test/Numbers"),
                                request(client, 7, b"x", path=BLOCK))
                    for sid in (1, 3, 5):
                        await client.response(sid)
                    await bounded(probe.started.wait())
                    client.send(frame(RST_STREAM, 0, 7, _U32.pack(http2.CANCEL)), request(client, 9, b"y", path=BLOCK))
                    await frames_until_ping(client)
                await until(lambda: not server._connections, "connections not closed")
            for _ in range(3):
                await asyncio.sleep(0)  # cancelled handlers finish
            after = (alive(Connection), alive(http2.Stream), alive(Context))
        assert after == before, f"left alive (connections, streams, contexts): {before} -> {after}"


def test_warnings_are_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warnings = Warnings(interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="switchgear.rpc.server"):
        for _ in range(1000):
            warnings.warn("bin", "bad base64 from %s", "peer")
        now[0] = 10.0
        warnings.warn("bin", "bad base64 from %s", "peer")
        warnings.warn("other", "another kind")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad base64 from peer", "bad base64 from peer (999 more like it in the last 10s)", "another kind"]
    assert not any(r.exc_info for r in caplog.records)


async def test_connection_errors_are_logged_once_per_interval(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    """30 connections that fail the preface make one log line (and a count), not 30."""
    caplog.set_level(logging.INFO, logger="switchgear.rpc")
    async with serving(probe) as (server, address):
        for _ in range(30):
            async with Client.open(address, preface=False) as client:
                client.send(b"GET / HTTP/1.1\r\n\r\n")
                assert await client.closed_or_goaway() == http2.PROTOCOL_ERROR
        await until(lambda: not server._connections, "connections left open")
    ended = [r for r in caplog.records if "ended" in r.getMessage()]
    assert len(ended) == 1


@pytest.mark.parametrize(("extra", "payload", "code", "details"), [
    ([("x-key-bin", "!!!not base64***")], b"", grpc.StatusCode.INTERNAL,
     "Error parsing 'x-key-bin' metadata: illegal base64 encoding"),
    ([], b"\xff\xff\xff", grpc.StatusCode.UNKNOWN, "Unexpected <class 'google.protobuf.message.DecodeError'>"),
], ids=["bad-bin-header", "corrupt-protobuf"])
async def test_bad_input_is_one_warning_and_a_clean_status(probe: Probe, caplog: pytest.LogCaptureFixture,
                                                             extra: list[tuple[str, str]], payload: bytes,
                                                             code: grpc.StatusCode, details: str) -> None:
    from grpc_health.v1 import health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    def setup(server: Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)

    async with serving(probe, setup=setup) as (_, address), Client.open(address) as client:
        for sid in range(1, 41, 2):
            client.send(client.headers(sid, "/grpc.health.v1.Health/Check", extra=extra),
                        frame(DATA, END_STREAM, sid, message(payload)))
            answer = await client.response(sid)
            status = answer.trailers or answer.headers
            assert status["grpc-status"] == str(code.value[0]) and status["grpc-message"].startswith(details)
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("switchgear.rpc")]
    assert len(warned) == 1 and not warned[0].exc_info, [r.getMessage() for r in warned]
