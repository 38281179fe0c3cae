"""TLS and mTLS on a real gRPC server, with certificates the test makes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from switchgear.tls import ClientTls, ServerTls, add_port, aio_channel
from tests.certs import make_certs


async def check(address: str, tls: ClientTls | None) -> int:
    async with aio_channel(address, tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


@pytest.mark.parametrize("mutual", [False, True])
async def test_tls_and_mtls(tmp_path: Path, mutual: bool) -> None:
    certs = make_certs(tmp_path)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = add_port(server, "127.0.0.1:0", ServerTls(certs.server_cert, certs.server_key,
                                                      certs.ca if mutual else None))
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        with_cert = ClientTls(certs.ca, certs.client_cert, certs.client_key)
        assert await check(address, with_cert) == health_pb2.HealthCheckResponse.SERVING
        refused = [ClientTls(certs.other_ca), None]  # a server we cannot verify; plaintext
        if mutual:
            refused.append(ClientTls(certs.ca))  # no client certificate
        else:
            assert await check(address, ClientTls(certs.ca)) == health_pb2.HealthCheckResponse.SERVING
        for tls in refused:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(address, tls)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def test_half_a_client_certificate_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        ClientTls("ca.pem", cert="agent.pem").credentials()
