"""`--worker-spread even` (switchgear/rpc/spread.py): a worker holding more connections than
another passes a new one on to it, so a few long-lived connections split evenly over the workers
instead of wherever SO_REUSEPORT's hash puts them. A real agent with two workers (the split read
from the supervisor's /metrics), the spread itself in-process, and its inbox fed junk."""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import os
import socket
import ssl
from pathlib import Path

import grpc
import httpx
import orjson
import pytest

from switchgear.rpc import spread
from switchgear.supervise import Proc, ProcessFailed
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import ControlPlane, Upstream
from tests.test_agent_workers import CHAT, poll, samples, start_two, two_workers

pytestmark = pytest.mark.timeout(90)


def _split(metrics: str, door: str) -> dict[str, float]:
    scraped = samples(httpx.get(f"http://{metrics}/metrics", timeout=10).text)
    return {dict(labels)["worker"]: v for (name, labels), v in scraped.items()
            if name == "switchgear_worker_connections" and dict(labels)["door"] == door}


async def test_sixteen_connections_split_eight_and_eight_on_both_doors(
    control_plane: ControlPlane, upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    proc = two_workers(control_plane, tmp_path)
    channels: list[grpc.aio.Channel] = []
    clients: list[httpx.AsyncClient] = []
    try:
        address, agent = await start_two(proc, control_plane, upstream)
        http, metrics = agent.http, agent.metrics
        assert await asyncio.to_thread(_split, metrics, "grpc") == {"w0": 0, "w1": 0}

        # Sixteen gRPC channels (one connection each, kept open), as an application server's pool,
        # all connecting at once (both workers pass connections to each other in the same moment):
        # every call is answered, wherever its connection ended up.
        request = gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=orjson.dumps(CHAT))
        channels.extend(grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                        for _ in range(16))
        replies = await asyncio.gather(*(gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(request, timeout=10)
                                         for channel in channels))
        assert [reply.endpoint for reply in replies] == ["e0"] * 16
        await poll(lambda: _split(metrics, "grpc") == {"w0": 8, "w1": 8}, 10.0)

        # Sixteen keep-alive HTTP clients: the same on the HTTP door.
        for _ in range(16):
            client = httpx.AsyncClient(timeout=10)
            clients.append(client)
            assert (await client.post(f"http://{http}/v1/chat/completions", json=CHAT)).status_code == 200
        await poll(lambda: _split(metrics, "http") == {"w0": 8, "w1": 8}, 10.0)

        # Closed connections are counted out, and calls on the connections left still work.
        for channel in channels[:6]:
            await channel.close()
        await poll(lambda: sum(_split(metrics, "grpc").values()) == 10, 10.0)
        for channel in channels[6:]:
            assert (await gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(request, timeout=10)).endpoint == "e0"
    finally:
        for channel in channels:
            await channel.close()
        for client in clients:
            await client.aclose()
        await asyncio.to_thread(proc.stop)


async def test_kernel_spread_publishes_no_split_and_a_bad_value_is_refused(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    proc = Proc.switchgear("agent", [
        "agent", "--workers", "2", "--worker-spread", "kernel", "--auth", "none", "--control-plane",
        control_plane.address, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"], tmp_path)
    await asyncio.to_thread(proc.start, 60.0)
    try:
        metrics = (await asyncio.to_thread(proc.wait_line, "METRICS ", 10.0)).split()[1]
        assert await asyncio.to_thread(_split, metrics, "grpc") == {}
    finally:
        await asyncio.to_thread(proc.stop)
    bad = Proc.switchgear("bad", ["agent", "--workers", "2", "--worker-spread", "round-robin", "--auth", "none",
                                  "--control-plane", control_plane.address], tmp_path)
    with pytest.raises(ProcessFailed, match="exited"):
        await asyncio.to_thread(bad.start, 20.0)
    assert "--worker-spread: invalid choice: 'round-robin'" in bad.tail()


# --- the spread in one process ------------------------------------------------------------------

class _Held(asyncio.Protocol):
    """Counts itself into `spread` while open, as the doors' servers do."""

    def __init__(self, spread: spread.Spread, live: set[_Held]) -> None:
        self.spread, self.live = spread, live

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.live.add(self)
        self.spread.serving(len(self.live))

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.discard(self)
        self.spread.serving(len(self.live))


async def test_acceptors_split_a_burst_evenly_and_skip_a_worker_that_is_down(tmp_path: Path) -> None:
    directory = str(tmp_path)
    spread.create_table(directory, "grpc", 2)
    first = spread.listening_socket("127.0.0.1", 0, 128)
    port = first.getsockname()[1]
    socks = [first, spread.listening_socket("127.0.0.1", port, 128)]
    spreads = [spread.Spread(spread.Group(directory, k, 2), "grpc") for k in range(2)]
    lives: list[set[_Held]] = [set(), set()]
    acceptors = [spread.Acceptor(socks[k], functools.partial(_Held, spreads[k], lives[k]), spreads[k])
                 for k in range(2)]
    for acceptor in acceptors:
        acceptor.start()
    assert spread.held(directory, "grpc", 2) == [0, 0]
    writers = []
    try:
        for _ in range(16):  # all at once, as a client's pool connects
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
        await _until(lambda: [len(live) for live in lives] == [8, 8])
        assert spread.held(directory, "grpc", 2) == [8, 8]
        # Passed-on connections are served: each echoes.
        for writer in writers:
            writer.write(b"ping")
        assert spreads[0].passed + spreads[1].passed == spreads[0].received + spreads[1].received
        for writer in writers[:8]:
            writer.close()
        await _until(lambda: sum(len(live) for live in lives) == 8)
        # A worker marked down (it exited) gets nothing: the other serves every new connection.
        spread.mark_down(directory, "grpc", 2, 1)
        assert spread.held(directory, "grpc", 2)[1] is None
        assert spreads[0].target() is None
    finally:
        for writer in writers:
            writer.close()
        for acceptor in acceptors:
            acceptor.close()
            await acceptor.wait_closed()


async def _until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_target_counts_what_is_still_in_flight(tmp_path: Path) -> None:
    directory = str(tmp_path)
    spread.create_table(directory, "http", 3)
    mine, w1, w2 = [spread.Spread(spread.Group(directory, k, 3), "http") for k in range(3)]
    assert mine.target() is None  # nobody else serves yet (DOWN)
    for worker, live in ((mine, 3), (w1, 1), (w2, 2)):
        worker._serving = True
        worker.serving(live)
    assert mine.target() == 1
    words = mine._words
    words[spread._sent(3, 0, 1)] = 2  # two passed to w1, which has received neither yet: it holds 1 + 2
    assert mine.target() == 2
    words[spread._sent(3, 1, 0)] = 1  # and one passed here by w1, not received yet: this one holds 3 + 1
    assert mine.target() == 2
    words[spread._sent(3, 2, 1)] = 5  # w2 passed w1 five more: w1 holds 8, w2 2, this one 4
    assert mine.target() == 2 and w2.target() is None
    # w1 exits with all seven in its inbox and starts again: they are written off, not held against it.
    spread.mark_down(directory, "http", 3, 1)
    assert spread.held(directory, "http", 3) == [3, None, 2]
    restarted = spread.Spread(spread.Group(directory, 1, 3), "http")
    restarted._serving = True
    restarted.serving(1)
    assert mine.target() == 1
    for worker in (mine, w1, w2, restarted):
        worker.close()


async def test_the_inbox_drops_what_is_not_a_workers_hand_off(tmp_path: Path) -> None:
    """Junk in a worker's inbox (only this user can reach it; a bug or a stale process): a
    message without a descriptor, a pipe, two sockets, a sender out of range, a message too short
or too long. Each descriptor is
    closed, nothing is served, and a real hand-off after them still is."""
    directory = str(tmp_path)
    spread.create_table(directory, "grpc", 2)
    receiver = spread.Spread(spread.Group(directory, 1, 2), "grpc")
    served: list[socket.socket] = []
    receiver.start(served.append)
    inbox = spread.inbox_path(directory, "grpc", 1)
    out = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    out.connect(inbox)
    read_end, write_end = os.pipe()
    kept_a, sent_a = socket.socketpair()
    kept_b, sent_b = socket.socketpair()
    kept_c, sent_c = socket.socketpair()
    try:
        def send(data: bytes, fds: list[int]) -> None:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            out.sendmsg([data], rights)

        send(b"\0\0", [])
        send(b"\0\0", [write_end])
        send(b"\0\0", [sent_a.fileno(), sent_b.fileno()])
        send(b"\x09\0", [sent_c.fileno()])  # worker 9 of 2
        send(b"\0", [sent_c.fileno()])  # too short
        send(b"\0\0\0", [sent_c.fileno()])  # too long
        for fd in (write_end, sent_a.fileno(), sent_b.fileno(), sent_c.fileno()):
            os.close(fd)  # now the inbox's copies are the only ones
        for sock in (sent_a, sent_b, sent_c):
            sock.detach()
        await _until(lambda: _eof(read_end) and all(_peer_closed(k) for k in (kept_a, kept_b, kept_c)))
        assert served == [] and receiver.received == 0

        kept, handed = socket.socketpair()
        send(b"\0\0", [handed.fileno()])
        handed.close()
        await _until(lambda: len(served) == 1)
        assert receiver.received == 1 and served[0].type == socket.SOCK_STREAM
        served[0].sendall(b"hi")
        assert kept.recv(2) == b"hi"
        kept.close()
        served[0].close()
    finally:
        receiver.close()
        out.close()
        os.close(read_end)
        for sock in (kept_a, kept_b, kept_c):
            sock.close()
    assert not os.path.exists(inbox)


def _eof(fd: int) -> bool:
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        return os.read(fd, 1) == b""
    return False


def _peer_closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        return sock.recv(1) == b""
    return False



async def test_tls_connections_are_passed_before_their_handshake(tmp_path: Path) -> None:
    """Two TLS gRPC servers as two workers' (in one process): eight clients at once split 4/4, the
    handshake done by whichever worker got the connection; a handshake that never finishes is
    not left counted."""
    from switchgear.rpc.http2 import Limits
    from switchgear.rpc.server import Server
    from switchgear.tls import ServerTls, add_port
    from tests.certs import make_certs

    certs = make_certs(tmp_path)
    directory = str(tmp_path)
    spread.create_table(directory, "grpc", 2)
    servers = [Server(limits=Limits(preface_timeout_s=2.0), reuse_port=True, spread=spread.Group(directory, k, 2))
               for k in range(2)]
    port = add_port(servers[0], "127.0.0.1:0", ServerTls(certs.server_cert, certs.server_key))
    add_port(servers[1], f"127.0.0.1:{port}", ServerTls(certs.server_cert, certs.server_key))
    for server in servers:
        await server.start()
    client_tls = ssl.create_default_context(cafile=certs.ca)
    client_tls.set_alpn_protocols(["h2"])
    writers = []
    try:
        _, stalled = await asyncio.open_connection("127.0.0.1", port)
        stalled.write(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        await _until(lambda: any(server._spread is not None and server._spread.starting for server in servers))
        await _until(lambda: all(server._spread is not None and server._spread.starting == 0 for server in servers))
        assert spread.held(directory, "grpc", 2) == [0, 0]  # cut at the handshake timeout, never counted
        stalled.close()
        opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port, ssl=client_tls,
                                                                server_hostname="127.0.0.1") for _ in range(8)))
        writers = [writer for _, writer in opened]
        await _until(lambda: spread.held(directory, "grpc", 2) == [4, 4], 1.8)  # (before the preface timeout)
        assert [len(server._connections) for server in servers] == [4, 4]
    finally:
        for writer in writers:
            writer.close()
        for server in servers:
            await server.stop(None)
