"""A small HTTP/1.1 client for buffered upstream calls: keep-alive pool, one write, llhttp to read.

Why: after httpx's pool was replaced by aiohttp's (transport.py), aiohttp's client was still
the largest single cost of an agent request (bench/overhead, py-spy: ~22% of the agent's CPU
per zero-delay call: request objects, header multidicts, cookie jar, tracing signals, payload
writers, a StreamReader per response). A unary upstream call needs much less: write the
request line, headers and body in one `transport.write`, read one answer, decode gzip/deflate,
and put the connection back. That is this module; streamed answers stay on aiohttp
(transport.py).

Answers are read by llhttp (the `httptools` binding, the parser Node.js uses), not by hand:
it refuses ambiguous framing (two Content-Lengths, Content-Length with Transfer-Encoding,
lengths or chunk sizes that are not plain hex/digits) instead of guessing, and on a shared
keep-alive pool a guess is how one caller receives bytes meant for another. The answer is
also bounded per service (`ResponseLimits`: head bytes, header count, body on the wire,
decoded body); anything refused is an `UpstreamProtocolError` and its connection is closed.

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

import httptools
import httpx
from multidict import CIMultiDict

from switchgear.adapters.base import ResponseLimits

_LIMITS = ResponseLimits()
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
    call cost about 8% of the agent's CPU. `headers` may be given as the raw (name, value) byte
    pairs the parser read: they are decoded on first use only (a successful call's adapter
    reads none, and decoding them cost ~4 us per call)."""

    __slots__ = ("_headers", "_pairs", "content", "status_code")

    def __init__(self, status_code: int, headers: Any, content: bytes) -> None:
        self.status_code = status_code
        self._headers: Any = None if isinstance(headers, list) else headers
        self._pairs: list[tuple[bytes, bytes]] = headers if isinstance(headers, list) else []
        self.content = content

    @property
    def headers(self) -> Any:
        if self._headers is None:
            self._headers = CIMultiDict([(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._pairs])
        return self._headers

    async def aread(self) -> bytes:
        return self.content


class UpstreamProtocolError(httpx.RemoteProtocolError):
    """The upstream's answer broke HTTP/1.1 framing or a limit (ResponseLimits): ambiguous or
    malformed lengths, bad chunking, oversized headers or body. Adapters classify it as any
    RemoteProtocolError (RETRYABLE: the upstream's fault, not the caller's); the connection it
    came on is closed, never reused."""

    def __init__(self, message: str) -> None:
        super().__init__(f"upstream protocol error: {message}")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time.

    Answers are read by llhttp (httptools), which refuses what a hand-written parser let
    through: a second Content-Length, Content-Length with Transfer-Encoding, lengths that are
    not plain digits, bad chunk sizes, obs-folds, bare LFs. Its callbacks (`on_*`) build the
    answer and enforce `limits` as the bytes arrive, so an oversized or ill-framed answer is
    refused before it is buffered. After any anomaly the connection is closed; it is put back
    in the pool only after an answer that ended exactly where its framing said (`reusable`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: ResponseLimits = _LIMITS) -> None:
        self._loop = loop
        self._limits = limits
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Reply] | None = None
        self._head_request = False
        self._read_timeout: float | None = None
        self._read_deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._answer: _Answer | None = None
        self._done = False  # the current request has its final answer
        self._error: Exception | None = None  # what a callback refused
        self._in_body = False  # the current answer's head has been read
        self._head_fed = 0  # bytes fed since the current head began (bounds a head llhttp buffers)
        self.reusable = False
        self.answered_bytes = False  # any byte of an answer to the current request

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # unsolicited bytes on an idle connection: it cannot be reused
            self.close()
            return
        self.answered_bytes = True
        if self._read_timeout is not None:
            self._read_deadline = self._loop.time() + self._read_timeout
        if not self._in_body:
            self._head_fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(UpstreamProtocolError("the upstream switched protocols"))
            return
        except httptools.HttpParserCallbackError:
            self._refuse(self._error)
            return
        except httptools.HttpParserError as exc:
            self._refuse(UpstreamProtocolError(str(exc)[:120] or "malformed answer"))
            return
        if not self._in_body and self._head_fed > self._limits.max_head_bytes:  # one endless header line
            self._refuse(UpstreamProtocolError(f"answer headers over {self._limits.max_head_bytes} bytes"))

    def eof_received(self) -> bool:
        self.closed = True  # a half-closed connection is never reused
        self._end_of_answer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._end_of_answer()
        self._fail(httpx.RemoteProtocolError(f"server disconnected{': ' + str(exc) if exc else ''}"))

    # llhttp callbacks (httptools calls only the ones defined)
    def on_message_begin(self) -> None:
        if self._done or self._waiter is None:  # bytes beyond the answer: never reuse this connection
            self.reusable = False
            raise self._stop(UpstreamProtocolError("bytes after the end of the answer"))
        self._answer = _Answer()

    def on_header(self, name: bytes, value: bytes) -> None:
        answer = self._answer
        assert answer is not None
        answer.count += 1
        answer.size += len(name) + len(value) + 4
        limits = self._limits
        if answer.count > limits.max_headers:
            raise self._stop(UpstreamProtocolError(f"more than {limits.max_headers} answer headers"))
        if answer.size > limits.max_head_bytes:
            raise self._stop(UpstreamProtocolError(f"answer headers over {limits.max_head_bytes} bytes"))
        if len(name) in _FRAMING_LENGTHS:  # most names cannot be one of _FRAMING: no lower() for them
            lower = name.lower()
            if lower in _FRAMING:
                if lower == b"transfer-encoding" and value.strip().lower() != b"chunked":
                    raise self._stop(UpstreamProtocolError("a Transfer-Encoding other than chunked"))
                if lower == b"content-encoding":
                    answer.encoding = value.strip().lower().decode("latin-1")
                else:
                    answer.framed = True
                return
        answer.pairs.append((name, value))  # decoded if the adapter reads them (Reply.headers)

    def on_headers_complete(self) -> None:
        answer = self._answer
        assert answer is not None
        status = self._parser.get_status_code()
        answer.status = status
        self._head_fed = 0
        if status < 200:  # 1xx interim answer: llhttp reads it as a message of its own; drop it
            return
        self._in_body = True
        answer.keep_alive = self._parser.should_keep_alive()
        if self._head_request:  # llhttp cannot be told the request was HEAD: answer now, then close
            self._finish(answer, reusable=False)
            raise self._stop(None)
        answer.start_body()

    def on_body(self, body: bytes) -> None:
        answer = self._answer
        assert answer is not None
        problem = answer.add(body, self._limits)
        if problem:
            raise self._stop(UpstreamProtocolError(problem))

    def on_message_complete(self) -> None:
        answer = self._answer
        assert answer is not None
        if answer.status < 200:
            self._answer = None
            return
        problem = self._finish(answer, reusable=answer.keep_alive and not self.closed)
        if problem is not None:
            raise self._stop(UpstreamProtocolError(problem))

    # requests
    def send(self, data: bytes, head: bool, read_timeout: float | None) -> asyncio.Future[Reply]:
        assert self.transport is not None
        self._waiter = self._loop.create_future()
        self._head_request = head
        self._answer = None
        self._done = False
        self._error = None
        self._in_body = False
        self._head_fed = 0
        self.reusable = False
        self.answered_bytes = False
        self._read_timeout = read_timeout
        if read_timeout is not None:  # the timer outlives an answer: a kept connection re-arms it only
            self._read_deadline = self._loop.time() + read_timeout  # when it fired or is later than this
            if self._timer is None or self._timer.when() > self._read_deadline:
                self._stop_timer()
                self._timer = self._loop.call_at(self._read_deadline, self._check_timeout)
        self.transport.write(data)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        self.reusable = False
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def _stop(self, error: Exception | None) -> _Refused:
        """Remember why parsing stops; the caller raises what this returns."""
        self._error = error
        return _Refused()

    def _refuse(self, error: Exception | None) -> None:
        """Parsing stopped: fail the request unless it already has its answer; close."""
        if not self._done:
            self._fail(error or UpstreamProtocolError("malformed answer"))
        self.close()

    def _end_of_answer(self) -> None:
        """The server closed: an answer framed by the close ends here, any other is cut short."""
        answer = self._answer
        if self._done or self._waiter is None or self._waiter.done():
            return
        if answer is not None and self._in_body and not answer.framed:
            problem = self._finish(answer, reusable=False)
            if problem is not None:
                self._fail(UpstreamProtocolError(problem))
            return
        where = "inside the answer" if answer is not None else "before a complete answer"
        self._fail(httpx.RemoteProtocolError(f"server disconnected {where}"))

    def _finish(self, answer: _Answer, reusable: bool) -> str | None:
        """Hand the answer to the waiting request; what is wrong with its body, if anything."""
        problem = answer.end(self._limits)
        if problem is not None:
            return problem
        self._done = True
        self.reusable = reusable
        waiter, self._waiter = self._waiter, None  # (the read timer is left armed: _check_timeout)
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(answer.status, answer.pairs, answer.body))
        return None

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


class _Refused(Exception):
    """Raised from a parser callback to stop llhttp; the reason is in `_Connection._error`."""


_FRAMING = frozenset({b"content-encoding", b"content-length", b"transfer-encoding"})  # the body is decoded here
_FRAMING_LENGTHS = frozenset(len(name) for name in _FRAMING)


class _Answer:
    """One answer as llhttp reads it: status, headers, and the body decoded as it arrives."""

    __slots__ = ("count", "decoded", "decoder", "encoding", "framed", "keep_alive", "pairs", "parts",
                 "raw", "size", "status")

    def __init__(self) -> None:
        self.status = 0
        self.pairs: list[tuple[bytes, bytes]] = []  # the headers but the framing ones, undecoded
        self.count = self.size = 0  # headers seen and their bytes
        self.framed = False  # a Content-Length or chunked: the body does not end at the close
        self.keep_alive = False
        self.encoding = ""
        self.decoder: Any = None
        self.parts: list[bytes] = []
        self.raw = self.decoded = 0

    def start_body(self) -> None:
        if self.encoding in ("gzip", "x-gzip"):
            self.decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.encoding == "deflate":
            self.decoder = _Deflate()

    def add(self, data: bytes, limits: ResponseLimits) -> str | None:
        """Take one piece of the body; a message when a limit is crossed or it cannot be decoded."""
        self.raw += len(data)
        if self.raw > limits.max_response_bytes:
            return f"answer body over {limits.max_response_bytes} bytes"
        if self.decoder is None:
            self.decoded = self.raw
            if data:
                self.parts.append(data)
            return None
        room = limits.max_decoded_bytes - self.decoded + 1  # one byte more tells "over the limit"
        try:
            piece = self.decoder.decompress(data, room)
            if self.decoder.unconsumed_tail:
                return f"decoded answer body over {limits.max_decoded_bytes} bytes"
        except zlib.error as exc:
            return f"cannot decode {self.encoding} body: {exc}"
        self.decoded += len(piece)
        if self.decoded > limits.max_decoded_bytes:
            return f"decoded answer body over {limits.max_decoded_bytes} bytes"
        self.parts.append(piece)
        return None

    def end(self, limits: ResponseLimits) -> str | None:
        if self.decoder is not None and self.raw:
            problem = self.add(b"", limits)
            if problem is None and not self.decoder.eof:
                return f"cannot decode {self.encoding} body: it ends early"
            return problem
        return None

    @property
    def body(self) -> bytes:
        parts = self.parts
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _Deflate:
    """A "deflate" body: zlib-wrapped as RFC 9110 says, or raw deflate as some servers send it."""

    def __init__(self) -> None:
        self._inner: Any = None
        self._first = b""

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:
            self._first += data
            if len(self._first) < 2 and data:
                return b""
            wrapped = len(self._first) >= 2 and (self._first[0] & 0x0F) == 8 and (
                (self._first[0] << 8) | self._first[1]) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            data, self._first = self._first, b""
        return bytes(self._inner.decompress(data, max_length))

    @property
    def unconsumed_tail(self) -> bytes:
        return b"" if self._inner is None else bytes(self._inner.unconsumed_tail)

    @property
    def eof(self) -> bool:
        return self._inner is not None and bool(self._inner.eof)


class Http1Pool:
    """Keep-alive connections per origin, at most `max_connections` in all (callers beyond it
    wait for one to come back); a connection idle longer than `keepalive_s` is closed.

    Waiting callers are served first come, first served: a returning connection is handed to
    the longest-waiting caller of its origin (or, when only callers of other origins wait, it is
    closed and its slot handed to the first of them), and a caller that arrives while others
    wait queues behind them. Without the hand-over, a caller answered and asking again in the
    same turn of the loop took the connection back before the woken waiter ran, and waiters
    could starve until their timeouts.

    Each origin's idle connections are a stack (the most recently used is reused first, so a
    steady load keeps few warm). The ones a burst opened sink to the bottom, where a steady load
    never reaches: every `keepalive_s / 4` a returning connection has the pool close those idle
    longer than `keepalive_s`, so a burst's connections (and descriptors, here and upstream) do
    not stay open for good."""

    def __init__(
        self, max_connections: int = 100, keepalive_s: float = 30.0, limits: ResponseLimits = _LIMITS
    ) -> None:
        self._limit = max_connections
        self._limits = limits
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._open = 0
        self._next_sweep = 0.0
        # Callers waiting for a connection, first come first served: (origin key, future of the
        # connection handed over, or of None: a slot, counted in `_open`, to connect with).
        self._waiting: deque[tuple[tuple[bool, str, int], asyncio.Future[_Connection | None]]] = deque()
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
        if not self._live_waiters():  # nobody queued: an idle connection, or a new one within the limit
            connection = self._take_idle(origin)
            if connection is not None:
                return connection
            if self._open < self._limit or self._close_idle():  # (an idle one elsewhere gives its slot up)
                self._open += 1
                return await self._open_on_slot(origin, connect_timeout)
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((origin.key, waiter))
        try:
            handed = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed a connection or a slot: pass it on
                self._pass_on(origin, waiter.result())
            raise
        if handed is not None:
            return handed
        return await self._open_on_slot(origin, connect_timeout)

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin.key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive_s:
                return connection
            connection.close()
            self._open -= 1
        return None

    async def _open_on_slot(self, origin: _Origin, connect_timeout: float | None) -> _Connection:
        """Connect on a slot already counted in `_open`; a failed connect gives the slot on."""
        try:
            return await self._connect(origin, connect_timeout)
        except BaseException:
            self._pass_on(origin, None)
            raise

    async def _connect(self, origin: _Origin, connect_timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if origin.tls:
            tls = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(loop, self._limits), origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake (SSLError is an OSError)
            raise httpx.ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from None
        return protocol

    def _release(self, origin: _Origin, connection: _Connection) -> None:
        now = time.monotonic()
        if connection.reusable and not connection.closed and not self._closed:
            connection.idle_since = now
            self._pass_on(origin, connection)
        else:
            connection.close()
            self._pass_on(origin, None)
        if now >= self._next_sweep:
            self._sweep(now)

    def _pass_on(self, origin: _Origin, connection: _Connection | None) -> None:
        """A connection (or, for None, the slot of one closed) comes back: to the longest-waiting
        caller of its origin; else, closed, its slot to the first caller waiting; else kept idle
        (or the slot freed)."""
        if connection is not None:
            for key, waiter in self._waiting:
                if key == origin.key and not waiter.done():
                    self._waiting.remove((key, waiter))
                    waiter.set_result(connection)
                    return
        while self._waiting:
            _, waiter = self._waiting.popleft()
            if not waiter.done():
                if connection is not None:
                    connection.close()
                waiter.set_result(None)
                return
        if connection is not None:
            self._idle.setdefault(origin.key, []).append(connection)
        else:
            self._open -= 1

    def _sweep(self, now: float) -> None:
        """Close the connections idle longer than `keepalive_s` (the oldest: each stack's bottom)."""
        self._next_sweep = now + self._keepalive_s / 4
        for idle in self._idle.values():
            while idle and (idle[0].closed or now - idle[0].idle_since >= self._keepalive_s):
                idle.pop(0).close()
                self._open -= 1

    def _close_idle(self) -> bool:
        for connections in self._idle.values():
            if connections:
                connections.pop(0).close()
                self._open -= 1
                return True
        return False

    def _live_waiters(self) -> bool:
        """Whether a caller is waiting (cancelled waiters at the head are dropped here)."""
        while self._waiting and self._waiting[0][1].done():
            self._waiting.popleft()
        return bool(self._waiting)


def _request_bytes(
    method: str, origin: _Origin, headers: Mapping[str, str] | Iterable[tuple[str, str]] | None, body: bytes
) -> bytes:
    pairs = headers.items() if type(headers) is dict or isinstance(headers, Mapping) else (headers or ())
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


__all__ = ["Http1Pool", "Reply", "UpstreamProtocolError"]
