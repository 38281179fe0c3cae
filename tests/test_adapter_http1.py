"""The buffered HTTP/1.1 client (adapters/http1.py) against a raw socket server that answers
exactly the bytes each case needs: framing, decoding, keep-alive, timeouts, pool limits."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from switchgear.adapters.http1 import Http1Pool, _parse_body, _parse_head

Answerer = Callable[[bytes], bytes | None]  # request bytes -> answer bytes (None: close)


class RawServer:
    """Reads one request head (+ Content-Length body) at a time and writes `answer(request)`."""

    def __init__(self, answer: Answerer, delay_s: float = 0.0, close: bool = False) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.close = close  # close the connection after each answer
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                out = self.answer(request)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[str]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answerer, delay_s: float = 0.0, close: bool = False) -> tuple[str, RawServer]:
        raw = RawServer(answer, delay_s, close)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x?q=1", raw

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


def ok(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


async def test_request_bytes_and_keep_alive(serve) -> None:  # type: ignore[no-untyped-def]
    url, raw = await serve(lambda _r: ok(b'{"a":1}', "Content-Type: application/json", "X-Thing: yes"))
    pool = Http1Pool()
    for _ in range(3):
        reply = await pool.request("POST", url, {"Content-Type": "application/json", "X-Id": "r1"}, b"{}", 5, 5)
        assert (reply.status_code, reply.content, reply.headers.get("x-thing")) == (200, b'{"a":1}', "yes")
        assert "content-length" not in reply.headers
    assert raw.connections == 1  # reused
    first = raw.requests[0]
    assert first.startswith(b"POST /v1/x?q=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    for line in (b"Content-Type: application/json", b"X-Id: r1", b"Content-Length: 2", b"Accept: */*",
                 b"Accept-Encoding: gzip, deflate"):
        assert line in first
    await pool.aclose()


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", b"abcde"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\nTrailer: 1\r\n\r\n", b"z"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after"), b"after"),
        (ok(gzip.compress(b"zipped"), "Content-Encoding: gzip"), b"zipped"),
        (ok(zlib.compress(b"deflated"), "Content-Encoding: deflate"), b"deflated"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
)
async def test_framing_and_decoding(serve, answer: bytes, body: bytes) -> None:  # type: ignore[no-untyped-def]
    url, _ = await serve(lambda _r: answer)
    pool = Http1Pool()
    reply = await pool.request("POST", url, {}, b"x", 5, 5)
    assert reply.content == body and "content-encoding" not in reply.headers
    await pool.aclose()


async def test_read_to_close_and_connection_close(serve) -> None:  # type: ignore[no-untyped-def]
    url, raw = await serve(lambda _r: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na")
    pool = Http1Pool()
    for _ in range(2):
        assert (await pool.request("GET", url, None, b"", 5, 5)).content == b"a"
    assert raw.connections == 2  # not reused after Connection: close
    url2, _ = await serve(lambda _r: b"HTTP/1.0 200 OK\r\n\r\nuntil close", close=True)
    reply = await pool.request("GET", url2, None, b"", 5, 5)
    assert reply.content == b"until close"
    await pool.aclose()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (None, httpx.RemoteProtocolError),  # dropped without an answer
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", httpx.RemoteProtocolError),
        (b"garbage\r\n\r\n", httpx.RemoteProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Encoding: gzip\r\n\r\nzz", httpx.RemoteProtocolError),
    ],
)
async def test_broken_answers(serve, answer: bytes | None, error: type[Exception]) -> None:  # type: ignore[no-untyped-def]
    url, _ = await serve(lambda _r: answer, close=True)
    pool = Http1Pool()
    with pytest.raises(error):
        await pool.request("POST", url, {}, b"x", 5, 5)
    await pool.aclose()


async def test_read_timeout_connect_error_and_bad_urls(serve) -> None:  # type: ignore[no-untyped-def]
    url, _ = await serve(lambda _r: ok(b"late"), delay_s=0.5)
    pool = Http1Pool()
    with pytest.raises(httpx.ReadTimeout):
        await pool.request("POST", url, {}, b"x", 5, 0.1)
    with pytest.raises(httpx.ConnectError):
        await pool.request("POST", "http://127.0.0.1:9/v1", {}, b"x", 5, 5)
    with pytest.raises(httpx.UnsupportedProtocol):
        await pool.request("POST", "ftp://127.0.0.1/v1", {}, b"x", 5, 5)
    with pytest.raises(ValueError, match="newline"):
        await pool.request("POST", url, {"X-Evil": "a\r\nInjected: 1"}, b"x", 5, 5)
    await pool.aclose()


async def test_pool_limit_makes_callers_wait(serve) -> None:  # type: ignore[no-untyped-def]
    url, raw = await serve(lambda _r: ok(b"ok"), delay_s=0.05)
    pool = Http1Pool(max_connections=2)
    replies = await asyncio.gather(*(pool.request("POST", url, {}, b"x", 5, 5) for _ in range(6)))
    assert [r.content for r in replies] == [b"ok"] * 6 and raw.connections == 2
    await pool.aclose()


async def test_cancelled_call_closes_its_connection(serve) -> None:  # type: ignore[no-untyped-def]
    url, raw = await serve(lambda _r: ok(b"ok"), delay_s=0.3)
    pool = Http1Pool(max_connections=1)
    task = asyncio.ensure_future(pool.request("POST", url, {}, b"x", 5, 5))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await pool.request("POST", url, {}, b"x", 5, 5)).content == b"ok"  # its slot came back
    assert raw.connections == 2
    await pool.aclose()


def test_head_parsing_in_pieces() -> None:
    data = bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: 1\r\n\r\nab")
    head = _parse_head(data, eof=False)
    assert head is not None and head.status == 200 and head.length == 3
    assert _parse_body(data, head, False, eof=False) is None
    data += b"c"
    assert _parse_body(data, head, False, eof=False) == (b"abc", len(data))
    assert _parse_head(bytearray(b"HTTP/1.1 200 OK\r\nX: 1"), eof=False) is None


async def test_a_kept_alive_connection_the_server_closed_is_retried_on_a_fresh_one(serve) -> None:  # type: ignore[no-untyped-def]
    # The server answers the first request of each connection and closes on the second without
    # a byte (as a server does to an idle connection when our request crosses its FIN).
    answered: set[int] = set()

    def answer(request: bytes) -> bytes | None:
        n = len(raw.requests)
        if n % 2 == 0:
            return None
        answered.add(n)
        return ok(b"fine")

    url, raw = await serve(answer)
    pool = Http1Pool()
    assert (await pool.request("POST", url, {}, b"1", 5, 5)).content == b"fine"
    assert (await pool.request("POST", url, {}, b"2", 5, 5)).content == b"fine"  # sent again, answered
    assert raw.connections == 2 and len(raw.requests) == 3 and answered == {1, 3}
    await pool.aclose()


async def test_a_fresh_connection_closed_without_an_answer_is_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    url, raw = await serve(lambda _r: None)
    pool = Http1Pool()
    with pytest.raises(httpx.RemoteProtocolError):
        await pool.request("POST", url, {}, b"x", 5, 5)
    assert len(raw.requests) == 1  # not sent twice: nothing says the first was not processed
    await pool.aclose()
