"""One request through either front door, as the edge sees it: its id, its access-log line.

Each request the HTTP door or the gRPC Gateway serves is an `Exchange`, current on the
request's task while it runs (`current()`): the door notes what it learns (route, tenant,
status, what the answer said of tokens and cost), the attempt observer (door_metrics.py) counts
its upstream attempts, and when it ends one JSON line goes to the `switchgear.access` logger:

    {"ts": 1767225600.123, "door": "http", "request_id": "...", "method": "chat.completions",
     "route": "chat", "tenant": "acme", "endpoint": "e0", "status": 200, "attempts": 2,
     "latency_ms": 12.3, "input_tokens": 7, "output_tokens": 3, "cost_usd": 0.0001,
     "cached": false, "reason": "", "session": ""}

with "cache_read_input_tokens", "cache_write_input_tokens" and "reasoning_tokens" (parts of the
input and output counts) and "web_search_requests" (searches the provider ran, priced per search)
added when the answer reported any.

Never a key, a header or a payload: the route is a service the snapshot names (else
"unknown"), `reason` an error code from a fixed set. `--access-log` sends the lines to stderr
(default), a file, or nowhere (`off`).

Sessions: the seed's `ExternalServiceRequest.session_id` (`InvokeRequest.session_id`, the HTTP
header `x-switchgear-session`) groups a caller's requests, as `session` on the line and
`session.id` on the server span: kept when it is 1 to `MAX_REQUEST_ID` characters of
`[A-Za-z0-9._:-]`, "invalid" otherwise, "" when not given (`session_label`).

Request ids: the caller's `x-request-id` (HTTP header or gRPC metadata) is kept when it is 1 to
`MAX_REQUEST_ID` characters of `[A-Za-z0-9._:-]`; anything else is replaced by a new id (the
answer carries the id actually used), so a log line never holds what an outsider chose freely.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import logging
import os
import re
import time
from typing import Any, BinaryIO

import orjson

from switchgear.dataplane.convert import new_request_id

ACCESS_LOGGER = "switchgear.access"
MAX_REQUEST_ID = 128
_ID_RE = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_REQUEST_ID}}}")

log = logging.getLogger(ACCESS_LOGGER)

_CURRENT: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar("switchgear_exchange", default=None)


def request_id(given: str | None) -> str:
    """The caller's id when it is acceptable (see the module docstring), else a new one."""
    if given and len(given) <= MAX_REQUEST_ID and _ID_RE.fullmatch(given):
        return given
    return new_request_id()


def session_label(given: str | None) -> str:
    """The caller's session id fit for a log line: itself when acceptable (as a request id),
    "" when not given, else "invalid" (never what an outsider chose freely)."""
    if not given:
        return ""
    return given if len(given) <= MAX_REQUEST_ID and _ID_RE.fullmatch(given) else "invalid"


def label(text: str) -> str:
    """A caller-chosen name (a gRPC call's method) fit for a log line: itself when it is short
    and plain, else "invalid"."""
    if not text:
        return ""
    return text if len(text) <= 64 and _ID_RE.fullmatch(text) else "invalid"


Parts = tuple[int, int, int, int]
NO_PARTS: Parts = (0, 0, 0, 0)
#: The token counts that are parts of input_tokens / output_tokens, then the web searches the
#: provider ran (not tokens), in `Parts` order.
PART_KEYS = ("cache_read_input_tokens", "cache_write_input_tokens", "reasoning_tokens", "web_search_requests")


def parts_of(usage: Any) -> Parts:
    """(cache read, cache write, reasoning) tokens and web searches of a TokenUsage or a gateway
    Usage message."""
    return (int(usage.cache_read_input_tokens), int(usage.cache_write_input_tokens), int(usage.reasoning_tokens),
            int(usage.web_search_requests))


def current() -> Exchange | None:
    """The request being served on this task (None outside a front door, e.g. task worker calls)."""
    return _CURRENT.get()


class Exchange:
    """One request at a door. Fields are filled as the request goes; `finish` ends it."""

    __slots__ = ("_token", "attempts", "cached", "cost_usd", "door", "endpoint", "input_tokens", "latency_s",
                 "limits", "method", "output_tokens", "parts", "reason", "request_id", "route", "session", "started",
                 "status", "status_class", "tenant", "upstream_s")

    def __init__(self, door: str, request_id: str) -> None:
        self.door = door
        self.request_id = request_id
        self.method = self.route = self.tenant = self.endpoint = self.reason = self.session = ""
        self.status: int | str = 0
        self.status_class = ""
        self.attempts = self.input_tokens = self.output_tokens = 0
        self.cost_usd = self.latency_s = self.upstream_s = 0.0  # upstream_s: its attempts' own time
        self.cached = False
        self.parts = NO_PARTS  # (cache read, cache write) input tokens, reasoning output tokens, web searches
        self.limits: tuple[Any, ...] = ()  # quota.Limit: the tenant's rate limits after its admission (headers)
        self.started = time.perf_counter()
        self._token: contextvars.Token[Exchange | None] | None = _CURRENT.set(self)

    def answered(self, input_tokens: int, output_tokens: int, cost_usd: float, endpoint: str, attempts: int,
                 cached: bool = False, parts: Parts = NO_PARTS) -> None:
        """What the answer said: its usage (and its `parts`), cost, the endpoint that served
        it, the attempts made."""
        self.input_tokens, self.output_tokens, self.cost_usd = input_tokens, output_tokens, cost_usd
        self.parts = parts
        if endpoint:
            self.endpoint = endpoint
        if attempts:
            self.attempts = attempts
        self.cached = cached

    def close(self) -> None:
        """Stops being current and fixes the latency (idempotent)."""
        if self._token is not None:
            self.latency_s = time.perf_counter() - self.started
            try:
                _CURRENT.reset(self._token)
            except ValueError:  # closed on another context (a generator finalised elsewhere)
                _CURRENT.set(None)
            self._token = None

    def line(self) -> bytes:
        line: dict[str, Any] = {
            "ts": time.time(), "door": self.door, "request_id": self.request_id, "method": self.method,
            "route": self.route, "tenant": self.tenant, "endpoint": self.endpoint, "status": self.status,
            "attempts": self.attempts, "latency_ms": round(self.latency_s * 1e3, 3),
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 8), "cached": self.cached, "reason": self.reason,
            "session": self.session,
        }
        if any(self.parts):
            line.update(zip(PART_KEYS, self.parts, strict=True))
        return orjson.dumps(line)


def note_tenant(tenant_id: str) -> None:
    exchange = _CURRENT.get()
    if exchange is not None:
        exchange.tenant = tenant_id


def note_route(service: str) -> None:
    """A service the snapshot names (the door checked it)."""
    exchange = _CURRENT.get()
    if exchange is not None:
        exchange.route = service


def note_limits(limits: tuple[Any, ...]) -> None:
    """The tenant's rate limits as its admission left them (quota.Limit), for the doors to tell."""
    exchange = _CURRENT.get()
    if exchange is not None:
        exchange.limits = limits


def note_answer(usage: Any, cost_usd: float, endpoint: str, attempts: int, cached: bool = False) -> None:
    """`usage`: a TokenUsage or a gateway Usage message (the same field names)."""
    exchange = _CURRENT.get()
    if exchange is not None:
        exchange.answered(int(usage.input_tokens), int(usage.output_tokens), cost_usd, endpoint, attempts, cached,
                          parts_of(usage))


def note_reason(code: str | None) -> None:
    exchange = _CURRENT.get()
    if exchange is not None and code:
        exchange.reason = code


FLUSH_S = 0.2  # lines reach the file within this (one write per batch, not per request)


class _Sink(logging.Handler):
    """The `switchgear.access` lines to a binary file (stderr's descriptor, or a file), buffered
    and flushed within FLUSH_S by a timer on the running loop: a line through `logging`'s
    records, formatting and per-record flush cost ~25 us, this ~1 us. Records logged to the
    logger by other code land here too."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self._out = out
        self._pending = False
        atexit.register(self.flush)

    def line(self, data: bytes) -> None:
        self._out.write(data + b"\n")
        if not self._pending:
            self._pending = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_S, self.flush)
            except RuntimeError:  # no loop on this thread: at once
                self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        self.line(self.format(record).encode())

    def flush(self) -> None:
        self._pending = False
        with contextlib.suppress(OSError, ValueError):  # closed, or a full disk: the log is best effort
            self._out.flush()

    def close(self) -> None:
        self.flush()
        atexit.unregister(self.flush)
        with contextlib.suppress(OSError):
            self._out.close()
        super().close()


_sink: _Sink | None = None


def write(exchange: Exchange) -> None:
    """The exchange's access-log line (nothing when the log is off)."""
    if _sink is not None:
        _sink.line(exchange.line())
    elif log.isEnabledFor(logging.INFO):  # not configured (in-process use): through logging
        log.info("%s", exchange.line().decode())


def reset() -> None:
    """Back to the unconfigured state (lines through `logging`), for in-process use after a
    `configure` (the CLI's) in the same process."""
    global _sink
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    _sink = None
    log.propagate = True
    log.setLevel(logging.NOTSET)


def configure(target: str) -> None:
    """`--access-log`: "stderr" (default), "off", or a file path (appended to). The lines are the
    JSON alone, on their own sink (not repeated by the root logger's handlers)."""
    global _sink
    reset()
    log.propagate = False
    if target == "off":
        log.setLevel(logging.CRITICAL + 1)
        return
    try:
        out = os.fdopen(os.dup(2), "ab") if target in ("", "stderr") else open(target, "ab")  # noqa: SIM115
    except OSError as exc:
        raise ValueError(f"--access-log {target}: {exc.strerror}") from None
    _sink = _Sink(out)
    _sink.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_sink)
    log.setLevel(logging.INFO)
