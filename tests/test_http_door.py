"""The HTTP front door's transport, over raw sockets: every protocol-level refusal in OpenAI's
error shape with no key in the answer or the log, and each limit (`--http-*` flags) hit."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
import pytest

from switchgear.cli import build_parser
from switchgear.dataplane import http as front_door
from switchgear.dataplane.http_door import (
    DEFAULT_LIMITS,
    DoorLimits,
    DoorRunner,
    door_budget,
    door_limits,
    raise_nofile_limit,
    runner,
)
from tests.test_stream import make_agent, snapshot, view

pytestmark = pytest.mark.timeout(30)

KEY = "sk-live-0123456789abcdefSECRET"


@asynccontextmanager
async def door(limits: DoorLimits = DEFAULT_LIMITS) -> AsyncIterator[tuple[str, int, DoorRunner]]:
    agent = make_agent(snapshot(view("gpt-mini", "openai", ["http://127.0.0.1:9/v1"], model="gpt-4o-mini")))
    runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0",
                                             limits=limits)
    assert isinstance(runner, DoorRunner)
    host, _, port = address.rpartition(":")
    try:
        yield host, int(port), runner
    finally:
        await runner.cleanup()
        await agent.pool.close()


async def exchange(host: str, port: int, raw: bytes, timeout_s: float = 5.0) -> bytes:
    """Sends `raw`, returns all the server wrote before closing."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, orjson.loads(body)


def openai_error(answer: bytes) -> tuple[int, str]:
    """(status, code) of an answer that must be in OpenAI's error shape."""
    status, headers, body = parse(answer)
    assert headers["content-type"].startswith("application/json")
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    return status, str(error["code"])


AUTH = f"Authorization: Bearer {KEY}\r\n"
POST = "POST /v1/chat/completions HTTP/1.1\r\nHost: agent\r\n"

REFUSALS = {
    "obs-fold in Authorization": (f"GET /v1/models HTTP/1.1\r\nHost: agent\r\n{AUTH} folded\r\n\r\n", 400),
    "Content-Length with Transfer-Encoding": (
        f"{POST}{AUTH}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "two Content-Lengths": (f"{POST}{AUTH}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}", 400),
    "bad chunk size": (f"{POST}{AUTH}Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n", 400),
    "chunk without its CRLF": (f"{POST}{AUTH}Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}XX0\r\n\r\n", 400),
    "NUL in a header value": (f"GET /v1/models HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {KEY}\0x\r\n\r\n",
                              400),
    "oversized header": (f"GET /v1/models HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {KEY}{'A' * 9000}\r\n\r\n",
                         431),
    "too many headers": ("GET /v1/models HTTP/1.1\r\nHost: agent\r\n" + AUTH
                         + "".join(f"x-h{i}: {i}\r\n" for i in range(120)) + "\r\n", 431),
    "request line too long": (f"GET /v1/models?{KEY}{'a' * 9000} HTTP/1.1\r\nHost: agent\r\n\r\n", 431),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_protocol_refusals_are_openai_errors_without_the_key(case: str, caplog: pytest.LogCaptureFixture) -> None:
    raw, expected = REFUSALS[case]
    caplog.set_level(logging.DEBUG)
    async with door() as (host, port, _):
        answer = await exchange(host, port, raw.encode("latin-1"))
    status, _ = openai_error(answer)
    assert status == expected
    assert KEY.encode() not in answer and b"SECRET" not in answer
    assert "SECRET" not in caplog.text
    refused = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING and not refused[0].exc_info


async def test_refusal_log_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    raw = REFUSALS["two Content-Lengths"][0].encode()
    async with door() as (host, port, _):
        for _ in range(20):
            assert openai_error(await exchange(host, port, raw))[0] == 400
    assert len([r for r in caplog.records if "refused a request" in r.getMessage()]) == 1


async def test_header_limits_follow_their_flags() -> None:
    limits = DoorLimits(max_header_bytes=1024, max_headers=8)
    async with door(limits) as (host, port, _):
        small = await exchange(host, port, f"GET /v1/models HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                                           f"x-a: {'a' * 900}\r\n\r\n".encode())
        long = await exchange(host, port, f"GET /v1/models HTTP/1.1\r\nHost: a\r\nx-a: {'a' * 1100}\r\n\r\n".encode())
        many = await exchange(host, port, ("GET /v1/models HTTP/1.1\r\nHost: a\r\n"
                                           + "".join(f"x-{i}: 1\r\n" for i in range(9))
                                           + "\r\n").encode())
    assert small.startswith(b"HTTP/1.1 200")
    assert openai_error(long) == (431, "request_header_fields_too_large")
    assert openai_error(many) == (431, "request_header_fields_too_large")


async def test_a_body_over_the_cap_is_refused_from_its_content_length() -> None:
    async with door(DoorLimits(max_body_bytes=1000, max_buffered_bytes=1000)) as (host, port, _):
        # 100 MB declared, none sent: answered at once, nothing read
        answer = await exchange(host, port, f"{POST}Content-Length: 100000000\r\n\r\n".encode())
        chunked = await exchange(host, port, f"{POST}Transfer-Encoding: chunked\r\n\r\n800\r\n{'x' * 2048}\r\n"
                                 f"0\r\n\r\n".encode())
    assert openai_error(answer) == (413, "request_too_large")
    assert openai_error(chunked) == (413, "request_too_large")


async def test_a_slow_body_is_cut_at_the_body_timeout() -> None:
    async with door(DoorLimits(body_timeout_s=0.3)) as (host, port, _):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"{POST}Content-Length: 1000\r\n\r\n{{".encode())  # then nothing more
        started = asyncio.get_running_loop().time()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert openai_error(answer) == (408, "request_timeout")
    assert asyncio.get_running_loop().time() - started < 3


@pytest.mark.parametrize("sent", [b"", b"GET /v1/models HTTP/1.1\r\nHost: a\r\n"], ids=["idle", "slow headers"])
async def test_idle_and_slow_header_connections_are_closed_at_the_idle_timeout(sent: bytes) -> None:
    async with door(DoorLimits(idle_timeout_s=0.3)) as (host, port, runner):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(sent)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the door
        writer.close()
        assert asyncio.get_running_loop().time() - started < 3
        assert not runner.door.live


async def test_at_the_cap_the_quietest_idle_connection_makes_room() -> None:
    async with door(DoorLimits(max_connections=4)) as (host, port, runner):
        idle = [await asyncio.open_connection(host, port) for _ in range(12)]
        answer = await exchange(host, port, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")
        assert len(runner.door.live) <= 4 and runner.door.evicted >= 9
        for _, writer in idle:
            writer.close()


async def test_with_every_connection_busy_a_new_one_gets_503() -> None:
    async with door(DoorLimits(max_connections=2, body_timeout_s=10)) as (host, port, runner):
        busy = []
        for _ in range(2):  # each mid-body: a request in progress, not evictable
            _, writer = await asyncio.open_connection(host, port)
            writer.write(f"{POST}Content-Length: 10\r\n\r\n{{".encode())
            busy.append(writer)
        await wait_for(lambda: sum(not c.idle for c in runner.door.live) == 2)
        answer = await exchange(host, port, b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
        assert openai_error(answer) == (503, "too_many_connections")
        for writer in busy:
            writer.close()


async def test_request_bodies_held_at_once_are_bounded_across_the_door() -> None:
    limits = DoorLimits(max_body_bytes=1000, max_buffered_bytes=2000, body_timeout_s=10)
    async with door(limits) as (host, port, runner):
        held = []
        for _ in range(2):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(f"{POST}Content-Length: 1000\r\n\r\n{{".encode())
            held.append(writer)
        await wait_for(lambda: runner.door.buffered == 2000)
        answer = await exchange(host, port, f"{POST}Content-Length: 10\r\n\r\n{{}}".encode())
        assert openai_error(answer) == (503, "overloaded")
        for writer in held:
            writer.close()
        await wait_for(lambda: runner.door.buffered == 0)


async def test_a_chunked_body_reserves_the_body_cap_while_it_arrives() -> None:
    limits = DoorLimits(max_body_bytes=1000, max_buffered_bytes=1500, body_timeout_s=10)
    async with door(limits) as (host, port, runner):
        reader, writer = await asyncio.open_connection(host, port)  # chunked: reserves the whole cap
        writer.write(f"{POST}Transfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n".encode())
        await wait_for(lambda: runner.door.buffered == 1000)
        refused = await exchange(host, port, f"{POST}Content-Length: 600\r\n\r\n{{}}".encode())
        assert openai_error(refused) == (503, "overloaded")
        writer.write(b"0\r\n\r\n")  # the body ends and is served ("{" is not JSON: 400)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert answer.startswith(b"HTTP/1.1 400")
        writer.close()
        await wait_for(lambda: runner.door.buffered == 0)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_flags_set_the_limits_and_bad_values_are_refused_naming_the_flag() -> None:
    base = ["agent", "--control-plane", "127.0.0.1:1"]
    assert door_limits(build_parser().parse_args(base)) == DEFAULT_LIMITS
    args = build_parser().parse_args([*base, "--http-max-connections", "7", "--http-idle-timeout", "2.5",
                                      "--http-body-timeout", "3", "--http-max-body-bytes", "1000",
                                      "--http-max-header-bytes", "512", "--http-max-headers", "9",
                                      "--http-max-buffered-bytes", "5000"])
    assert door_limits(args) == DoorLimits(7, 2.5, 3.0, 1000, 512, 9, 5000)
    with pytest.raises(SystemExit, match="--http-idle-timeout must be positive"):
        door_limits(build_parser().parse_args([*base, "--http-idle-timeout", "0"]))
    with pytest.raises(SystemExit, match="--http-max-buffered-bytes must be at least --http-max-body-bytes"):
        door_limits(build_parser().parse_args([*base, "--http-max-buffered-bytes", "10"]))


def test_the_open_file_limit_is_raised_and_each_door_kept_below_it() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    try:
        assert raise_nofile_limit() == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert 2 * door_budget(20_000) + 512 <= 20_000 and door_budget(100) == 16


async def test_at_the_cap_a_keep_alive_connection_that_served_outlives_newer_idle_ones() -> None:
    async with door(DoorLimits(max_connections=4)) as (host, port, runner):
        reader, writer = await asyncio.open_connection(host, port)

        async def models() -> bytes:
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            return head + await reader.readexactly(length)

        assert (await models()).startswith(b"HTTP/1.1 200")  # the oldest connection, idle since
        idle = [await asyncio.open_connection(host, port) for _ in range(10)]
        await wait_for(lambda: runner.door.evicted >= 7)
        assert (await models()).startswith(b"HTTP/1.1 200")  # still open: the never-served went first
        for _, other in idle:
            other.close()
        writer.close()


def test_each_door_cap_is_lowered_to_the_fd_budget() -> None:
    from aiohttp import web

    from switchgear.dataplane.server import _grpc_server
    from switchgear.rpc import Limits

    budget = door_budget(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    assert runner(web.Application(), DoorLimits(max_connections=10**7)).max_connections == budget
    grpc_server = _grpc_server("switchgear", (), Limits(max_connections=10**7))
    assert grpc_server.limits.max_connections == budget


async def test_a_handler_bug_is_a_500_in_openai_shape() -> None:
    from aiohttp import web

    async def boom(request: web.Request) -> web.StreamResponse:
        raise RuntimeError(f"bug while holding {KEY}")

    agent = make_agent(snapshot())
    app = front_door.build_app(agent.holder, agent.invoker, agent.streamer)
    app.router.add_get("/boom", boom)
    door_runner = runner(app, DEFAULT_LIMITS)
    await door_runner.setup()
    site = web.TCPSite(door_runner, "127.0.0.1", 0)
    await site.start()
    try:
        answer = await exchange("127.0.0.1", door_runner.addresses[0][1], b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n")
    finally:
        await door_runner.cleanup()
        await agent.pool.close()
    assert openai_error(answer) == (500, "internal_error") and b"SECRET" not in answer
