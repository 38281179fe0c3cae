"""The HTTP front door's transport: how aiohttp is built, bounded, and how it refuses.

http.py holds the OpenAI-compatible handlers; this module holds what sits under them:

- **limits** (`DoorLimits`, each a `switchgear agent --http-*` flag): a connection cap, an idle
  timeout (which also bounds how long a client may take to send a request's headers), a body
  timeout (slow bodies), a body-size cap, header size and count caps, and a budget for request
  bodies buffered at once across the door;
- **a connection cap that keeps the door answering**: at the cap, a new connection evicts the
  quietest connection that is not serving a request, one that never sent a whole request (idle
  from the start, or slowloris) before an idle keep-alive one; only when the quietest are all
  busy is the new one refused (503);
- **protocol-level refusals in OpenAI's error shape**: aiohttp answers a request it cannot parse
  (smuggling attempts such as Content-Length with Transfer-Encoding or two Content-Lengths, bad
  chunking, oversized or too many headers, obs-fold) itself, in plain text that quotes the
  offending bytes, and logs them with a traceback: an `Authorization` header's key ended up in
  both. `_Protocol.handle_error` answers `{"error": {...}}` with 400, 413 or 431 instead, and
  logs one WARNING line naming only the error's class (rate-limited), never the request's bytes;
- **file descriptors**: `raise_nofile_limit` lifts RLIMIT_NOFILE's soft limit to the hard one at
  start, and `door_budget` keeps each door's connection cap below half of it less a reserve, so
  that sockets held open against one door cannot starve the other door or the upstream pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import resource
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import (
    ContentLengthError,
    DecompressSizeError,
    HttpProcessingError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from switchgear.rpc import spread

log = logging.getLogger("switchgear.dataplane.http")

#: File descriptors kept out of both doors' connection caps: listeners, the upstream pool,
#: the control-plane streams, Redis, logs.
FD_RESERVE = 512
#: Connections looked at, oldest first, for one to evict at the cap.
_EVICT_SCAN = 64
#: Seconds aiohttp keeps reading (and dropping) a request body after answering early (413, 408),
#: so the client can read the answer before the connection closes.
_LINGER_S = 1.0


@dataclass(frozen=True)
class DoorLimits:
    """Limits of the HTTP front door (the `switchgear agent --http-*` flags;
    docs/reference/limits.md). Sizes in bytes, times in seconds."""

    max_connections: int = 1024  # open connections at once (the fd budget may lower it)
    idle_timeout_s: float = 15.0  # an idle keep-alive connection, or one sending its headers, is closed
    body_timeout_s: float = 30.0  # a request body must arrive whole within this (slow bodies)
    max_body_bytes: int = 32 * 1024 * 1024  # one request's body (413 beyond)
    max_header_bytes: int = 8190  # the request line or one header field (431 beyond)
    max_headers: int = 100  # header fields in one request (431 beyond)
    max_buffered_bytes: int = 64 * 1024 * 1024  # request bodies held at once across the door (503 beyond)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"{f.name} must be positive (got {value!r})")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError("max_buffered_bytes must be at least max_body_bytes")


DEFAULT_LIMITS = DoorLimits()


def raise_nofile_limit() -> int:
    """Lifts RLIMIT_NOFILE's soft limit to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. above the kernel's nr_open
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def door_budget(nofile: int) -> int:
    """Most connections one door may hold: half of what the fd limit leaves after the reserve."""
    return max(16, (nofile - FD_RESERVE) // 2)


def error_response(status: int, message: str, type_: str, code: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """A closing answer in OpenAI's error shape."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    response = web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                            headers=headers)
    response.force_close()
    return response


def refusal(status: int, exc: BaseException | None) -> tuple[int, str, str, str]:
    """(status, message, type, code) for a request aiohttp refused or a handler that failed. The
    message is fixed per kind: the parser's own text quotes the request's bytes (keys too)."""
    if isinstance(exc, LineTooLong) or (isinstance(exc, HttpProcessingError) and "Too many headers" in exc.message):
        return 431, "request header fields too large", "invalid_request_error", "request_header_fields_too_large"
    if isinstance(exc, DecompressSizeError):
        return 413, "request body too large once decompressed", "invalid_request_error", "request_too_large"
    if isinstance(exc, (TransferEncodingError, ContentLengthError)):
        return 400, "malformed request body framing", "invalid_request_error", "invalid_body_framing"
    if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
        return 400, "malformed HTTP request (ambiguous framing, an invalid header or request line)", \
            "invalid_request_error", "invalid_http_request"
    if status == 504:
        return 504, "the request timed out", "timeout_error", "timeout"
    return 500, "internal error", "server_error", "internal_error"


class _LogThrottle:
    """At most one WARNING per `interval_s`; the lines skipped meanwhile are counted in the next."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval = interval_s
        self._next = 0.0
        self._skipped = 0

    def warn(self, now: float, message: str, *args: object) -> None:
        if now < self._next:
            self._skipped += 1
            return
        skipped, self._skipped, self._next = self._skipped, 0, now + self._interval
        log.warning(message + (" (%d more refusals not logged)" if skipped else ""), *args,
                    *((skipped,) if skipped else ()))


class _Door(web.Server):
    """aiohttp's low-level server with a connection cap, idle eviction and our protocol."""

    def __init__(self, *args: Any, limits: DoorLimits, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.max_connections = max_connections
        self.live: OrderedDict[_Protocol, None] = OrderedDict()  # least recently active first
        self.evicted = self.refused = 0
        self.buffered = 0  # request-body bytes reserved by requests being read or served
        self.throttle = _LogThrottle()
        self.on_count: Callable[[int], None] | None = None  # told len(live) on each change (--workers' spread)

    def counted(self) -> None:
        if self.on_count is not None:
            self.on_count(len(self.live))

    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)

    def admit(self, conn: _Protocol) -> bool:
        """Makes room for `conn` (evicting the quietest idle connection at the cap); False: all busy."""
        if len(self.live) >= self.max_connections:
            # Among the quietest: one that never sent a whole request (idle from the start, or
            # slowloris) before a keep-alive connection that has served requests.
            quiet = [c for c in itertools.islice(self.live, _EVICT_SCAN) if c.idle]
            victim = next((c for c in quiet if not c.served), quiet[0] if quiet else None)
            if victim is None:
                self.refused += 1
                return False
            self.live.pop(victim, None)
            self.evicted += 1
            victim.force_close()
        self.live[conn] = None
        self.counted()
        return True


_FULL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s")
_FULL_BODY = orjson.dumps({"error": {"message": "too many connections", "type": "server_error", "param": None,
                                     "code": "too_many_connections"}})


class _Protocol(RequestHandler):
    """One HTTP/1.1 connection: aiohttp's, tracked by the door and refusing in OpenAI's shape."""

    def __init__(self, door: _Door, **kwargs: Any) -> None:
        super().__init__(door, **kwargs)
        self._door = door

    @property
    def idle(self) -> bool:
        return not self._request_in_progress

    @property
    def served(self) -> bool:
        return self._request_count > 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._door.admit(self):
            transport.write(_FULL % (len(_FULL_BODY), _FULL_BODY))  # type: ignore[attr-defined]
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._door.live.pop(self, None)
        self._door.counted()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        live = self._door.live
        if self in live:
            live.move_to_end(self)
        super().data_received(data)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        status, text, type_, code = refusal(status, exc)
        if status >= 500 and not isinstance(exc, HttpProcessingError):
            log.error("HTTP request %s %s failed: %s", request.method, request.path, type(exc).__name__,
                      exc_info=exc)
        else:
            self._door.throttle.warn(self._loop.time(), "HTTP front door refused a request from %s: %s (%d)",
                                     request.remote, type(exc).__name__, status)
        if request.writer.output_size > 0:  # as aiohttp's: an answer has begun, the connection is done
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        return error_response(status, text, type_, code)


#: A body at most this large that arrived whole with its headers skips the guard's timer and
#: reservation (see body_guard).
_ARRIVED_BODY_BYTES = 64 * 1024


def body_guard(limits: DoorLimits) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: a request body is read whole before the handler runs, within
    `body_timeout_s` (408 otherwise), `max_body_bytes` (413, at once when Content-Length says
    so) and the door's `max_buffered_bytes` shared by requests in progress (503)."""

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        declared = request.content_length
        if declared is not None and declared <= _ARRIVED_BODY_BYTES and request.content.is_eof():
            # The usual request: a small body that came whole with its headers. Nothing left to
            # wait for or bound (aiohttp framed it by its Content-Length), so no timer, no
            # reservation: this path is most of the door's calls, and the guard's full path cost
            # about 30 us of CPU each. Such bodies held at once are at most this size times the
            # connection cap.
            return await handler(request)
        if declared is not None and declared > limits.max_body_bytes:
            return _too_large(limits)
        door: _Door = request.protocol._door  # type: ignore[attr-defined]
        reserved = declared if declared is not None else limits.max_body_bytes
        if door.buffered + reserved > limits.max_buffered_bytes:
            return error_response(503, "too many request bodies in flight; retry shortly", "server_error",
                                  "overloaded", {"Retry-After": "1"})
        door.buffered += reserved
        try:
            try:
                async with asyncio.timeout(limits.body_timeout_s):
                    body = await _read(request, limits.max_body_bytes)
            except TimeoutError:
                return error_response(408, f"request body not received within {limits.body_timeout_s:g} s",
                                      "invalid_request_error", "request_timeout")
            if body is None:
                return _too_large(limits)
            door.buffered -= reserved - len(body)  # a chunked body reserved the cap: keep what it holds
            reserved = len(body)
            return await handler(request)
        finally:
            door.buffered -= reserved

    return guard


async def _read(request: web.Request, limit: int) -> bytes | None:
    """The body, read as it arrives (None past `limit`), kept where `request.read()` returns it
    from. aiohttp's own read() first lets its buffer grow to the whole client_max_size, then
    copies: about three times the cap held at once for one oversized chunked body."""
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._read_bytes = body  # what read(), text() and json() return from now on
    return body


def _too_large(limits: DoorLimits) -> web.Response:
    return error_response(413, f"request body over {limits.max_body_bytes} bytes", "invalid_request_error",
                          "request_too_large")


class DoorRunner(web.AppRunner):
    """An AppRunner whose server is a `_Door` with `limits`."""

    def __init__(self, app: web.Application, limits: DoorLimits, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self.max_connections = max_connections

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _Door(made.request_handler, request_factory=made.request_factory, limits=self.limits,
                     max_connections=self.max_connections, **self._kwargs)

    @property
    def door(self) -> _Door:
        server = self.server
        assert isinstance(server, _Door)
        return server


class SpreadSite(web.BaseSite):
    """The door's site in one process of `--workers N`: binds host:port with SO_REUSEPORT and
    accepts through switchgear.rpc.spread, which passes a connection on to another worker when
    this one serves more than it (`--worker-spread even`)."""

    def __init__(self, runner: DoorRunner, host: str, port: int, group: spread.Group,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._host, self._port, self._group = host, port, group

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        runner = self._runner
        assert isinstance(runner, DoorRunner)
        sock = spread.listening_socket(self._host, self._port, self._backlog)
        try:
            shared = spread.Spread(self._group, "http")
        except BaseException:
            sock.close()
            raise
        runner.door.on_count = shared.serving
        acceptor = spread.Acceptor(sock, runner.door, shared, self._ssl_context)
        acceptor.start()
        self._server = acceptor  # type: ignore[assignment]  # close() and sockets, as aiohttp uses them


def runner(app: web.Application, limits: DoorLimits) -> DoorRunner:
    """The front door's runner: aiohttp's parser limits, timeouts and cap set from `limits`, the
    cap kept within this process's file-descriptor budget."""
    cap = min(limits.max_connections, door_budget(raise_nofile_limit()))
    if cap < limits.max_connections:
        log.warning("HTTP front door: connection cap lowered to %d by the open-file limit", cap)
    return DoorRunner(
        app, limits, cap, access_log=None, handler_cancellation=True, shutdown_timeout=1.0,
        keepalive_timeout=limits.idle_timeout_s, max_line_size=limits.max_header_bytes,
        max_field_size=limits.max_header_bytes, max_headers=limits.max_headers, lingering_time=_LINGER_S,
    )


#: (flag, DoorLimits field, type, help) of the `switchgear agent --http-*` flags.
_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--http-max-connections", "max_connections", int,
     "open connections at once; at the cap the quietest idle one is closed (the open-file limit may lower it)"),
    ("--http-idle-timeout", "idle_timeout_s", float,
     "seconds an idle keep-alive connection, or one still sending its headers, stays open"),
    ("--http-body-timeout", "body_timeout_s", float, "seconds a request body may take to arrive whole (408)"),
    ("--http-max-body-bytes", "max_body_bytes", int, "largest request body (413)"),
    ("--http-max-header-bytes", "max_header_bytes", int, "longest request line or header field (431)"),
    ("--http-max-headers", "max_headers", int, "most header fields in a request (431)"),
    ("--http-max-buffered-bytes", "max_buffered_bytes", int,
     "request bodies held at once across the door (503 beyond)"),
)


def add_door_arguments(parser: Any) -> None:
    """The agent's HTTP front-door limit flags."""
    group = parser.add_argument_group("HTTP front door limits")
    defaults = DEFAULT_LIMITS
    for flag, name, kind, text in _FLAGS:
        group.add_argument(flag, type=kind, default=getattr(defaults, name), dest=f"door_{name}",
                           metavar="N" if kind is int else "S", help=f"{text} (default: %(default)s)")


def door_limits(args: Any) -> DoorLimits:
    """DoorLimits from the parsed flags; a bad value exits naming its flag."""
    values = {name: getattr(args, f"door_{name}") for _, name, _, _ in _FLAGS}
    for flag, name, _, _ in _FLAGS:
        if not values[name] > 0:
            raise SystemExit(f"switchgear agent: {flag} must be positive (got {values[name]})")
    try:
        return DoorLimits(**values)
    except ValueError:
        raise SystemExit("switchgear agent: --http-max-buffered-bytes must be at least --http-max-body-bytes") from None
