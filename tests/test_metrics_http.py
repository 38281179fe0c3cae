"""The `--metrics-listen` port (switchgear/metrics_http.py): a scrape answers, and idle or
slow clients hold neither threads nor file descriptors without bound (prometheus_client's
own server gives each connection a thread that waits for its request line forever)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from switchgear import metrics_http
from switchgear.controlplane import metrics as cp_metrics
from switchgear.dataplane import metrics as agent_metrics


class _One(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("switchgear_probe_value", "a value to scrape", value=7)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_One())
    return registry


def _until(check: Callable[[], bool], deadline_s: float = 5.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return check()


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def serve() -> Iterator[Callable[..., Any]]:
    servers: list[Any] = []

    def start(**limits: Any) -> tuple[Any, str]:
        server, address = metrics_http.serve(_registry(), "127.0.0.1:0", **limits)
        servers.append(server)
        return server, address

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("plane", ["agent", "control plane"])
def test_both_planes_serve_their_metrics_through_the_bounded_server(plane: str) -> None:
    collector = _One()
    serve_metrics = agent_metrics.serve_metrics if plane == "agent" else cp_metrics.serve_metrics
    server, address = serve_metrics(collector, "127.0.0.1:0")
    try:
        assert isinstance(server, metrics_http.MetricsServer)
        assert "switchgear_probe_value 7.0" in _scrape(address)
    finally:
        server.shutdown()
        server.server_close()


def test_idle_and_slow_connections_hold_at_most_the_cap_and_a_scrape_still_answers(
        serve: Callable[..., Any]) -> None:
    _server, address = serve(max_connections=8, idle_timeout_s=30.0)
    host, port = address.rsplit(":", 1)
    baseline = threading.active_count()
    held = []
    try:
        for k in range(60):  # half silent, half sending their headers a byte at a time (slowloris)
            sock = socket.create_connection((host, int(port)), timeout=5)
            if k % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHo")
            held.append(sock)
        # the server serves each connection on a thread: never more than the cap at once
        assert _until(lambda: threading.active_count() <= baseline + 8)
        assert threading.active_count() <= baseline + 8
        assert "switchgear_probe_value 7.0" in _scrape(address)  # the scraper is not locked out
        # the oldest connections still sending their request were closed to make room
        assert _closed_by_peer(held[0], 5.0) and _closed_by_peer(held[1], 5.0)
    finally:
        for sock in held:
            sock.close()


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(serve: Callable[..., Any]) -> None:
    _server, address = serve(idle_timeout_s=0.3)
    host, port = address.rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert _closed_by_peer(sock, 5.0)
    assert time.monotonic() - started < 3.0
    assert "switchgear_probe_value 7.0" in _scrape(address)


def test_limits_out_of_range_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        metrics_http.serve(_registry(), "127.0.0.1:0", max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        metrics_http.serve(_registry(), "127.0.0.1:0", idle_timeout_s=0)
