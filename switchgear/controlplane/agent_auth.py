"""Agent authentication: who may make the calls only agents make, and as which node.

Agents' calls (AGENT_SERVICES and AGENT_METHODS: the snapshot stream, load reports, and the
task worker's lease, heartbeat, complete, payload download and deferred invocation) need an
agent credential, one of:

- a client certificate signed by the control plane's `--tls-client-ca` (mutual TLS: the TLS
  handshake refuses any connection without one, so every call that reaches a servicer has
  presented it);
- the agent bootstrap token as `authorization: Bearer <token>`, compared in constant time. The
  control plane makes it beside its store on first start (`<db>.agent-token`, mode 0600) unless
  `--agent-token-file` names it; agents read it from their own `--agent-token-file` or
  $SWITCHGEAR_AGENT_TOKEN.

Roles stay apart: the admin token is not an agent credential and the agent token opens no
Admin or Governance call (a token is compared with its own role's token only); tenant client
keys pass neither. `--agent-auth none` turns this off for loopback development; on any other
address the control plane refuses to start so unless `--insecure-agents` is given too.

Node identity for load reports (`NodeSessions`). Every agent holding the bootstrap token
presents the same credential, so the credential alone cannot say which node is reporting. A
snapshot stream is issued a fresh random report token in its response headers
(`switchgear-report-token`); a load-report stream for node X is accepted only with the token of
a snapshot stream that X holds open on this control plane, and only while it stays open. The
agent's reporter follows its snapshot client (same address, that stream's token).

Why this rather than a per-node token minted at first connect and kept: it needs no stored
state (a restarted control plane, or another replica, simply issues new tokens as agents
resubscribe), no token outlives the snapshot stream it was issued on, and "reports for
unknown nodes are refused" falls out, since a node without a live snapshot stream here has no
token. With mTLS the same rule applies (certificates need not name nodes). The limit of a
shared bootstrap token stays: its holder may subscribe under any node id, as any agent may.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from switchgear.controlplane.auth import AGENT_METHODS, bearer_matches, denied

#: Services only agents call (every method of each).
AGENT_SERVICES = ("/switchgear.v1.DiscoveryService/", "/switchgear.v1.LoadReportingService/")

#: Response header of a snapshot stream: the token its node's load reports must carry.
REPORT_TOKEN_HEADER = "switchgear-report-token"

TOKEN_ENV = "SWITCHGEAR_AGENT_TOKEN"


def is_agent_call(method: str) -> bool:
    return method.startswith(AGENT_SERVICES) or method in AGENT_METHODS


class AgentAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses agents' calls (UNAUTHENTICATED) without the agent token, unless `mtls` (the
    server requires a client certificate from its client CA, so the handshake already proved
    one). Other calls pass through untouched (AdminTokenInterceptor guards operators' calls)."""

    def __init__(self, token: str, *, mtls: bool = False) -> None:
        self._token = token
        self._mtls = mtls

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not is_agent_call(method) or self._mtls:
            return handler
        if bearer_matches(details.invocation_metadata, self._token):
            return handler
        return denied(handler, f"{method} is for agents: it needs the agent token (metadata "
                               "'authorization: Bearer <token>', the control plane's <db>.agent-token) "
                               "or a client certificate from the cluster CA")


class NodeSessions:
    """The report tokens of the snapshot streams open on this control plane, by node id (see
    the module docstring). Event-loop only."""

    def __init__(self) -> None:
        self._open: dict[str, set[str]] = {}

    def open(self, node_id: str) -> str:
        token = secrets.token_urlsafe(24)
        self._open.setdefault(node_id, set()).add(token)
        return token

    def close(self, node_id: str, token: str) -> None:
        tokens = self._open.get(node_id, set())
        tokens.discard(token)
        if not tokens:
            self._open.pop(node_id, None)

    def valid(self, node_id: str, token: str) -> bool:
        """Whether `token` is that of a snapshot stream `node_id` holds open (constant time per
        token compared: a stream's token is a secret)."""
        found = False
        for held in self._open.get(node_id, ()):
            found |= hmac.compare_digest(held.encode(), token.encode())
        return found


def report_token(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REPORT_TOKEN_HEADER and isinstance(value, str):
            return value
    return ""


def is_loopback(listen: str) -> bool:
    """Whether a listen address ("host:port", "[v6]:port") reaches this machine only."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, "" or "0.0.0.0"-like wildcards: reachable from elsewhere
