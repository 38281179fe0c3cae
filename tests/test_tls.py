"""TLS and mTLS on real gRPC servers (grpc.aio and switchgear.rpc) and on a real agent's
application-facing ports, with certificates the test makes."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import grpc
import httpx
import orjson
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from switchgear import rpc
from switchgear.dataplane.server import Options, serve
from switchgear.tls import ClientTls, ServerTls, add_port, aio_channel
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from tests.certs import make_certs
from tests.conftest import ControlPlane, Upstream, service

SERVERS = {"grpcio": grpc.aio.server, "switchgear": rpc.server}


async def check(address: str, tls: ClientTls | None) -> int:
    async with aio_channel(address, tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


@pytest.mark.parametrize("kind", sorted(SERVERS))
@pytest.mark.parametrize("mutual", [False, True])
async def test_tls_and_mtls(tmp_path: Path, mutual: bool, kind: str) -> None:
    certs = make_certs(tmp_path)
    server = SERVERS[kind]()
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


async def test_switchgear_rpc_exposes_the_client_certificate(tmp_path: Path) -> None:
    """With mutual TLS, a handler sees grpc's x509 auth context keys; over TLS without a client
    certificate it sees none."""
    certs = make_certs(tmp_path)
    seen: list[tuple[dict[str, list[bytes]], object, object]] = []

    async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append((context.auth_context(), context.peer_identity_key(), context.peer_identities()))
        return b"ok"

    server = rpc.Server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Who", {"Am": grpc.unary_unary_rpc_method_handler(whoami)}),))
    port = add_port(server, "127.0.0.1:0", ServerTls(certs.server_cert, certs.server_key, certs.ca))
    await server.start()
    try:
        async with aio_channel(f"127.0.0.1:{port}", ClientTls(certs.ca, certs.client_cert, certs.client_key)) as ch:
            assert await ch.unary_unary("/test.Who/Am")(b"", timeout=5) == b"ok"
    finally:
        await server.stop(None)
    (context, key, identities), = seen
    assert context["transport_security_type"] == [b"ssl"]
    assert context["x509_common_name"] == [b"agent"]  # tests/certs.py names the client "agent"
    assert key == "x509_common_name" and identities == [b"agent"]  # that certificate has no SAN


async def test_agent_serves_grpc_and_http_over_mutual_tls(
    tmp_path: Path, control_plane: ControlPlane, upstream: tuple[Upstream, str]
) -> None:
    certs = make_certs(tmp_path)
    _, url = upstream
    control_plane.registry.register(service("chat", url, model="gpt-4o-mini"), "test")
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    http_ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    options = Options(control_planes=[control_plane.address], listen="127.0.0.1:0", http_listen="127.0.0.1:0",
                      auth_required=False, serve_tls=ServerTls(certs.server_cert, certs.server_key, certs.ca))
    task = asyncio.ensure_future(serve(options, stop, ready.set_result, http_ready.set_result))
    try:
        address, http_address = await asyncio.wait_for(ready, 10), await asyncio.wait_for(http_ready, 10)
        request = gateway_pb2.InvokeRequest(service="chat", method="chat.completions",
                                            payload=orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}))
        with_cert = ClientTls(certs.ca, certs.client_cert, certs.client_key)
        async with aio_channel(address, with_cert) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # until the agent holds its first snapshot
                try:
                    reply = await stub.Invoke(request, timeout=5)
                    break
                except grpc.aio.AioRpcError as exc:
                    if "no snapshot" not in (exc.details() or "") or asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.05)
        assert orjson.loads(reply.payload)["usage"]["total_tokens"] == 10
        for refused in (ClientTls(certs.ca), None):  # no client certificate; plaintext
            async with aio_channel(address, refused) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(request, timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        verify = ssl.create_default_context(cafile=certs.ca)
        verify.load_cert_chain(certs.client_cert, certs.client_key)
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(verify=verify) as client:
            answer = await client.post(f"https://{http_address}/v1/chat/completions", json=body, timeout=5)
        assert answer.status_code == 200 and answer.json()["usage"]["total_tokens"] == 10
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=certs.ca)) as client:
            with pytest.raises(httpx.HTTPError):  # the server asks for a certificate this client lacks
                await client.post(f"https://{http_address}/v1/chat/completions", json=body, timeout=5)
    finally:
        stop.set()
        await task
