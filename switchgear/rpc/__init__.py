"""The agent's own gRPC server (HTTP/2 on the event loop): see server.py and http2.py."""

from switchgear.rpc.http2 import Limits
from switchgear.rpc.server import Context, Server, server

__all__ = ["Context", "Limits", "Server", "server"]
