"""A small HTTP/1.1 client for buffered upstream calls: keep-alive pool, one write, one parse.

Why: after httpx's pool was replaced by aiohttp's (transport.py), aiohttp's client was still
the largest single cost of an agent request (bench/overhead, py-spy: ~22% of the agent's CPU
per zero-delay call: request objects, header multidicts, cookie jar, tracing signals, payload
writers, a StreamReader per response). A unary upstream call needs much less: write the
request line, headers and body in one `transport.write`, parse one answer (status line,
headers, a Content-Length, chunked or read-to-close body), decode gzip/deflate, and put the
connection back. That is this module; streamed answers stay on aiohttp (transport.py).

Contract (what FastClient promised with aiohttp): `Accept: */*` and
`Accept-Encoding: gzip, deflate` unless given, `Content-Type: application/octet-stream` for a
body without one, no redirects, no cookies, no proxies; `sock_connect` bounds connecting and
`sock_read` the wait between two reads; failures are httpx's exceptions (ConnectError,
ConnectTimeout, ReadTimeout, RemoteProtocolError, InvalidURL), so adapters classify them
unchanged. Not thread-safe: one event loop.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
from multidict import CIMultiDict

MAX_HEAD_BYTES = 64 * 1024  # status line + headers
_NO_BODY_STATUS = frozenset({204, 304})
_HIDDEN = frozenset({"content-encoding", "content-length", "transfer-encoding"})  # the body is decoded here
#: Sends of one request on connections found closed by the server (see Http1Pool.request).
_STALE_RETRIES = 3
_AUTO = (("accept", "Accept: */*\r\n"), ("accept-encoding", "Accept-Encoding: gzip, deflate\r\n"))


class _Origin:
    """A parsed request URL: where to connect and what to put on the request line (cached per URL)."""

    __slots__ = ("host", "host_header", "key", "port", "target", "tls")

    def __init__(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise httpx.InvalidURL(f"invalid URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme in {url!r}")
        if not parts.hostname:
            raise httpx.InvalidURL(f"no host in URL {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = port or (443 if self.tls else 80)
        default = port is None or port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default else f"{host}:{self.port}"
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.key = (self.tls, self.host, self.port)


class Reply:
    """A buffered answer with the parts of `httpx.Response` adapters read: `status_code`,
    `headers` (case-insensitive, `.get`), `content` (decoded); building an httpx.Response per
    call cost about 8% of the agent's CPU."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: Any, content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    async def aread(self) -> bytes:
        return self.content


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Reply] | None = None
        self._head_request = False
        self._read_timeout: float | None = None
        self._read_deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._eof = False
        self._head: _Head | None = None
        self.reusable = False
        self.answered_bytes = False  # any byte of an answer to the current request

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # unsolicited bytes on an idle connection: it cannot be reused
            self.close()
            return
        self._buffer += data
        self.answered_bytes = True
        if self._read_timeout is not None:
            self._read_deadline = self._loop.time() + self._read_timeout
        self._parse()

    def eof_received(self) -> bool:
        self._eof = self.closed = True  # a half-closed connection is never reused
        if self._waiter is not None:
            self._parse()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        if self._waiter is not None and not self._waiter.done():
            self._parse()
        self._fail(httpx.RemoteProtocolError(f"server disconnected{': ' + str(exc) if exc else ''}"))

    # requests
    def send(self, data: bytes, head: bool, read_timeout: float | None) -> asyncio.Future[Reply]:
        assert self.transport is not None
        self._waiter = self._loop.create_future()
        self._head_request = head
        self._buffer.clear()
        self._head = None
        self.reusable = False
        self.answered_bytes = False
        self._read_timeout = read_timeout
        if read_timeout is not None:
            self._read_deadline = self._loop.time() + read_timeout
            self._timer = self._loop.call_at(self._read_deadline, self._check_timeout)
        self.transport.write(data)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _check_timeout(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return
        if self._loop.time() < self._read_deadline:  # data arrived since: wait for the next read
            self._timer = self._loop.call_at(self._read_deadline, self._check_timeout)
            return
        self._fail(httpx.ReadTimeout("read timed out"))
        self.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self._stop_timer()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _parse(self) -> None:
        try:
            if self._head is None:
                self._head = _parse_head(self._buffer, self._eof)
                if self._head is None:
                    return
            head = self._head
            parsed = _parse_body(self._buffer, head, self._head_request, self._eof)
        except httpx.RemoteProtocolError as exc:
            self._fail(exc)
            self.close()
            return
        if parsed is None:
            return
        body, used = parsed
        if head.status < 200:  # 1xx interim answer: drop it, the real one follows
            del self._buffer[:used]
            self._head = None
            self._parse()
            return
        self.reusable = head.keep_alive and used == len(self._buffer) and not self._eof
        waiter, self._waiter = self._waiter, None
        self._stop_timer()
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(head.status, head.headers, body))


class _Head:
    """An answer's status line and headers, and how its body is framed."""

    __slots__ = ("chunked", "encoding", "headers", "keep_alive", "length", "start", "status")

    def __init__(self, status: int, headers: CIMultiDict[str], start: int) -> None:
        self.status = status
        self.headers = headers
        self.start = start  # where the body begins in the buffer
        self.length: int | None = None
        self.chunked = False
        self.encoding = ""
        self.keep_alive = True


def _parse_head(buffer: bytearray, eof: bool) -> _Head | None:
    """The head once `buffer` holds all of it, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("answer headers too large")
        if eof:
            raise httpx.RemoteProtocolError("server disconnected before a complete answer")
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    head = _Head(int(code), CIMultiDict(), end + 4)
    head.keep_alive = version == "HTTP/1.1"
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise httpx.RemoteProtocolError(f"malformed header line: {line[:80]!r}")
        name, value = name.strip(), value.strip()
        lower = name.lower()
        if lower == "content-length":
            if not value.isdigit():
                raise httpx.RemoteProtocolError(f"bad Content-Length {value!r}")
            head.length = int(value)
        elif lower == "transfer-encoding":
            head.chunked = value.lower().endswith("chunked")
        elif lower == "content-encoding":
            head.encoding = value.lower()
        elif lower == "connection":
            tokens = value.lower()
            head.keep_alive = "close" not in tokens and (head.keep_alive or "keep-alive" in tokens)
        if lower not in _HIDDEN:
            head.headers.add(name, value)
    return head


def _parse_body(buffer: bytearray, head: _Head, head_request: bool, eof: bool) -> tuple[bytes, int] | None:
    """(decoded body, bytes of the buffer used) once the whole body is there, else None."""
    start = head.start
    if head_request or head.status in _NO_BODY_STATUS or head.status < 200:
        return b"", start
    if head.chunked:
        parsed = _dechunk(buffer, start, eof)
        if parsed is None:
            return None
        body, used = parsed
    elif head.length is not None:
        if len(buffer) - start < head.length:
            if eof:
                raise httpx.RemoteProtocolError("server disconnected before the whole body was read")
            return None
        body, used = bytes(buffer[start:start + head.length]), start + head.length
    else:  # no framing: the body is whatever comes before the server closes
        if not eof:
            return None
        body, used, head.keep_alive = bytes(buffer[start:]), len(buffer), False
    return _decode(body, head.encoding), used


def _dechunk(buffer: bytearray, pos: int, eof: bool) -> tuple[bytes, int] | None:
    parts: list[bytes] = []
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            break
        size_text = bytes(buffer[pos:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", line_end)
            if buffer[line_end:line_end + 4] == b"\r\n\r\n" or trailer_end >= 0:
                done = line_end + 4 if buffer[line_end:line_end + 4] == b"\r\n\r\n" else trailer_end + 4
                return b"".join(parts), done
            break
        data_start = line_end + 2
        if len(buffer) < data_start + size + 2:
            break
        parts.append(bytes(buffer[data_start:data_start + size]))
        pos = data_start + size + 2
    if eof:
        raise httpx.RemoteProtocolError("server disconnected inside a chunked body")
    return None


def _decode(body: bytes, encoding: str) -> bytes:
    if not body or encoding in ("", "identity"):
        return body
    try:
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:  # raw deflate without the zlib wrapper (some servers send it)
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as exc:  # as aiohttp's ClientPayloadError became: the answer is broken
        raise httpx.RemoteProtocolError(f"cannot decode {encoding} body: {exc}") from None
    return body  # an encoding we did not ask for: pass it through as it came


class Http1Pool:
    """Keep-alive connections per origin, at most `max_connections` in all (callers beyond it
    wait for one to come back); a connection idle longer than `keepalive_s` is closed."""

    def __init__(self, max_connections: int = 100, keepalive_s: float = 30.0) -> None:
        self._limit = max_connections
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._open = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._origins: dict[str, _Origin] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def origin(self, url: str) -> _Origin:
        origin = self._origins.get(url)
        if origin is None:
            if len(self._origins) >= 256:
                self._origins.clear()
            origin = self._origins[url] = _Origin(url)
        return origin

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None,
        body: bytes,
        connect_timeout: float | None,
        read_timeout: float | None,
    ) -> Reply:
        origin = self.origin(url)
        data = _request_bytes(method, origin, headers, body)
        for _ in range(_STALE_RETRIES):
            connection = await self._acquire(origin, connect_timeout)
            reused = connection.idle_since > 0
            try:
                answer = await connection.send(data, method == "HEAD", read_timeout)
            except httpx.RemoteProtocolError:
                connection.close()
                self._release(origin, connection)
                # A kept-alive connection the server had already closed (its FIN crossed our
                # request): nothing of ours was processed, so send it again on a fresh one, as
                # urllib3 and aiohttp do. A new connection's failure, or any answered byte, is real.
                if reused and not connection.answered_bytes:
                    continue
                raise
            except BaseException:
                connection.close()  # cancelled or failed mid-answer: the connection's state is unknown
                self._release(origin, connection)
                raise
            self._release(origin, connection)
            return answer
        raise httpx.RemoteProtocolError("server kept closing kept-alive connections")

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def _acquire(self, origin: _Origin, connect_timeout: float | None) -> _Connection:
        idle = self._idle.get(origin.key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive_s:
                return connection
            connection.close()
            self._open -= 1
        while self._open >= self._limit:
            if self._close_idle():  # an idle connection to another origin gives its slot up
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # we were handed the free slot: pass it on
                raise
            idle = self._idle.get(origin.key)
            if idle:
                return await self._acquire(origin, connect_timeout)
        self._open += 1
        try:
            return await self._connect(origin, connect_timeout)
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self, origin: _Origin, connect_timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if origin.tls:
            tls = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(loop), origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake (SSLError is an OSError)
            raise httpx.ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from None
        return protocol

    def _release(self, origin: _Origin, connection: _Connection) -> None:
        if connection.reusable and not connection.closed and not self._closed:
            connection.idle_since = time.monotonic()
            self._idle.setdefault(origin.key, []).append(connection)
        else:
            connection.close()
            self._open -= 1
        self._wake()

    def _close_idle(self) -> bool:
        for connections in self._idle.values():
            if connections:
                connections.pop(0).close()
                self._open -= 1
                return True
        return False

    def _wake(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _request_bytes(
    method: str, origin: _Origin, headers: Mapping[str, str] | Iterable[tuple[str, str]] | None, body: bytes
) -> bytes:
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    lines = [f"{method} {origin.target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
    seen: set[str] = set()
    for name, value in pairs:
        lower = name.lower()
        if lower in ("host", "content-length", "transfer-encoding", "connection"):
            continue  # framing is ours
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError("newline or carriage return in a request header: a potential security issue")
        seen.add(lower)
        lines.append(f"{name}: {value}\r\n")
    for lower, line in _AUTO:
        if lower not in seen:
            lines.append(line)
    if body:
        if "content-type" not in seen:
            lines.append("Content-Type: application/octet-stream\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n")
    elif method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8") + body


__all__ = ["Http1Pool", "Reply"]
