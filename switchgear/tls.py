"""TLS and mutual TLS for Switchgear's gRPC links, from PEM files.

Control plane: `--tls-cert/--tls-key` serve TLS; adding `--tls-client-ca` requires every client
(agents, operators) to present a certificate signed by that CA (mTLS). Agents and the CLI:
`--tls-ca` verifies the control plane; `--tls-cert/--tls-key` present a client certificate.
Agents' application-facing ports (gRPC and the HTTP front door): `--serve-tls-cert`,
`--serve-tls-key`, `--serve-tls-client-ca`, with the same meaning.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class ServerTls:
    cert: str
    key: str
    client_ca: str | None = None  # set: clients must present a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        chain, key = _read(self.cert), _read(self.key)
        assert chain is not None and key is not None
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=_read(self.client_ca), require_client_auth=self.client_ca is not None
        )

    def ssl_context(self, alpn: Sequence[str]) -> ssl.SSLContext:
        """The same TLS for servers on the event loop (the agent's own gRPC server: ["h2"]; its
        HTTP front door: ["http/1.1"]). TLS 1.2 or later, as HTTP/2 requires (RFC 9113 9.2)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(list(alpn))
        return context


@dataclass(frozen=True)
class ClientTls:
    ca: str
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca), private_key=_read(self.key), certificate_chain=_read(self.cert)
        )


class ListenError(RuntimeError):
    """A listener could not be opened (the address is taken, not local, or not allowed); the
    message names the flag and the address, for a one-line refusal at start."""


def add_port(server: grpc.aio.Server, address: str, tls: ServerTls | None, flag: str = "--listen") -> int:
    """Listen on `address` with TLS when configured; returns the bound port. Works for grpc.aio
    servers and switchgear.rpc's (which takes an ssl.SSLContext). ListenError when it cannot."""
    try:
        if tls is None:
            return int(server.add_insecure_port(address))
        add_tls_port = getattr(server, "add_tls_port", None)
        if add_tls_port is not None:
            return int(add_tls_port(address, tls.ssl_context(["h2"])))
        return int(server.add_secure_port(address, tls.credentials()))
    except OSError as exc:  # switchgear.rpc: the socket's own error
        raise ListenError(f"{flag} {address}: {exc.strerror or exc}") from None
    except RuntimeError as exc:  # grpc.aio says only that binding failed
        if "bind" not in str(exc).lower():
            raise
        raise ListenError(f"{flag} {address}: cannot listen there (address in use, or not an address "
                          "of this host)") from None


def aio_channel(address: str, tls: ClientTls | None, options: tuple[tuple[str, int], ...] = ()) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=options)
