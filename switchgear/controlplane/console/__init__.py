"""The operator console: web pages on the control plane (`--console-listen ADDR`, off by default).

app.py serves them (aiohttp), pages.py renders them, backend.py reads and changes state through
this control plane's own gRPC services, sessions.py holds logins; static/ is the page's own
small script and stylesheet (no third-party code, no build step). See docs/console.md.
"""

from __future__ import annotations

from switchgear.controlplane.console.app import Console, ConsoleOptions
from switchgear.controlplane.console.backend import Backend


def loopback_target(address: str) -> str:
    """Where this process reaches its own gRPC port: a wildcard host becomes loopback."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def build_console(options: ConsoleOptions, grpc_address: str, tokens: dict[str, str]) -> Console:
    return Console(options, Backend(loopback_target(grpc_address), tokens["admin"]), tokens)


__all__ = ["Console", "ConsoleOptions", "build_console", "loopback_target"]
