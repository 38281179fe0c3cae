"""The `--metrics-listen` port of both planes: Prometheus text from a registry, on a thread, bounded.

prometheus_client's `start_http_server` gives every connection a thread that waits for the
request line with no timeout, so an idle or slow (slowloris) client holds a thread and a file
descriptor — from the open-file budget the process's doors share — for as long as it likes,
and many clients hold many. `serve` runs the same WSGI app (`make_wsgi_app`) under two bounds:

- a connection that sends nothing for `idle_timeout_s` (10 s) while its request arrives, or
  stalls a write as long, is closed;
- at most `max_connections` (32) are open at once: one more closes the oldest connection still
  sending its request (the quietest, as the HTTP door does), or is itself closed when all are
  being answered. A scraper sends its request at once, so idle sockets cannot lock it out.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

MAX_CONNECTIONS = 32
IDLE_TIMEOUT_S = 10.0


class _Handler(WSGIRequestHandler):
    server: MetricsServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout_s)  # each read and write of the exchange

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # (reads the headers)
        self.server.answering(self.connection)  # its request is in: no longer a candidate to close
        return parsed

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per scrape


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `max_connections` of them (see the module docstring)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, max_connections: int,
                 idle_timeout_s: float) -> None:
        self.address_family = family
        self.max_connections, self.idle_timeout_s = max_connections, idle_timeout_s
        self._lock = threading.Lock()
        self._open: dict[socket.socket, float | None] = {}  # → when it opened while its request arrives
        super().__init__(address, _Handler)

    def answering(self, conn: socket.socket) -> None:
        with self._lock:
            if conn in self._open:
                self._open[conn] = None

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._open) >= self.max_connections:
                waiting = [(opened, conn) for conn, opened in self._open.items() if opened is not None]
                if not waiting:
                    self.shutdown_request(request)  # every slot is answering a scrape
                    return
                _opened, oldest = min(waiting, key=lambda pair: pair[0])
                del self._open[oldest]
                with contextlib.suppress(OSError):  # (already gone)
                    # wakes its thread's read with EOF; the thread then closes the socket itself
                    oldest.shutdown(socket.SHUT_RDWR)
            self._open[request] = time.monotonic()
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)
        # else a client that timed out or went away: socketserver would print a traceback

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(request, None)


def serve(registry: CollectorRegistry, listen: str, *, max_connections: int = MAX_CONNECTIONS,
          idle_timeout_s: float = IDLE_TIMEOUT_S) -> tuple[MetricsServer, str]:
    """Serve `registry` at /metrics on `listen` ("host:port", port 0 picks one; an empty host is
    127.0.0.1) from a daemon thread. Returns (server, bound "host:port"); `server.shutdown()`
    stops it. Raises OSError when the address cannot be bound."""
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, got {max_connections}")
    if not idle_timeout_s > 0:
        raise ValueError(f"idle_timeout_s must be above 0, got {idle_timeout_s}")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server = MetricsServer((host, int(port)), family, max_connections, idle_timeout_s)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    bound = f"[{host}]" if ":" in host else host
    return server, f"{bound}:{server.server_port}"
