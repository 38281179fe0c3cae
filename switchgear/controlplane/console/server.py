"""The console's HTTP server under aiohttp's app: a connection cap and quiet protocol refusals.

- **Connections**: at most `max_connections` at once; one past it is closed as it is accepted,
  before a byte is read (aiohttp has no cap of its own), so idle or slow sockets cannot pile up.
- **Refusals**: aiohttp answers a request it cannot parse (two Content-Lengths, a bad header
  character, an oversized header) itself, quoting the offending bytes, and logs them with a
  traceback; those bytes can hold the session cookie. Here the answer is the status's fixed
  phrase with the console's security headers, and the log is one WARNING line (at most one a
  second) naming the error's class, never the request.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger("switchgear.controlplane.console")


class _Connection(RequestHandler):
    def __init__(self, server: _Server, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self._server.connections) > self._server.max_connections:
            self.force_close()
            transport.close()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 and not isinstance(exc, HttpProcessingError):
            log.error("console request %s %s failed: %s", request.method, request.path, type(exc).__name__,
                      exc_info=exc)
        else:
            now = self._loop.time()
            if now - self._server.warned_at >= 1.0:
                self._server.warned_at = now
                log.warning("console refused a request from %s: %s (%d)", request.remote, type(exc).__name__, status)
        if request.writer.output_size > 0:  # as aiohttp's: an answer has begun, the connection is done
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        phrase = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else "Error"
        response = web.Response(status=status, text=f"{status} {phrase}\n", headers=self._server.headers)
        response.force_close()  # the connection's framing is not to be trusted after this
        return response


class _Server(web.Server):
    def __init__(self, *args: Any, max_connections: int, headers: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.headers = dict(headers)
        self.warned_at = -1.0

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class ConsoleRunner(web.AppRunner):
    """An AppRunner whose server caps connections and refuses unparseable requests quietly."""

    def __init__(self, app: web.Application, *, max_connections: int, headers: Mapping[str, str],
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._headers = headers

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _Server(made.request_handler, request_factory=made.request_factory,
                       max_connections=self._max_connections, headers=self._headers, **self._kwargs)
