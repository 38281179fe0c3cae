"""The agent's gRPC port answers the same on its own server (switchgear.rpc, the default) and on
grpc.aio (`--grpc-server grpcio`): statuses, details, trailing metadata, health and reflection,
seen through a real grpc.aio client against a real agent and a local OpenAI-shaped upstream."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from switchgear import rpc
from switchgear.dataplane.server import Options, serve
from switchgear.rpc import http2
from switchgear.rpc.http2 import DATA, END_STREAM, frame
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import ControlPlane, Upstream, no_presets, service
from tests.test_rpc_server import Client, message
from tests.test_tracing import invoke, run_agent

pytestmark = pytest.mark.timeout(60)

PAYLOAD = orjson.dumps({"messages": [{"role": "user", "content": "hello"}]})


async def observe(address: str, up: Upstream) -> dict[str, object]:
    """What a client sees of the agent's port: one of each kind of answer."""
    seen: dict[str, object] = {}
    reply = await invoke(address)  # also waits for the first snapshot
    seen["ok"] = (reply.endpoint, reply.attempts, orjson.loads(reply.payload)["usage"]["total_tokens"])
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for name, request in (
            ("unknown service", gateway_pb2.InvokeRequest(service="nope", method="chat.completions", payload=PAYLOAD)),
            ("bad payload", gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=b"{")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Invoke(request, timeout=5)
            seen[name] = (failed.value.code(), failed.value.details())
        up.fail_next = 10  # every attempt fails: the status and the trailers say why
        call = stub.Invoke(gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=PAYLOAD),
                           timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        up.fail_next = 0
        trailers = {k: v for k, v in (await call.trailing_metadata() or ())}
        seen["upstream down"] = (failed.value.code(), trailers.get("switchgear-error-kind"),
                                 trailers.get("switchgear-upstream-status"), "switchgear-attempts" in trailers)
        health = health_pb2_grpc.HealthStub(channel)
        seen["health"] = (await health.Check(health_pb2.HealthCheckRequest(service="switchgear.v1.GatewayService"),
                                             timeout=5)).status
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        seen["health unknown"] = failed.value.code()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [r async for r in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)]
        seen["services"] = sorted(s.name for s in replies[0].list_services_response.service)
    seen.update(await bad_input(address))
    return seen


async def bad_input(address: str) -> dict[str, object]:
    """Status and message for bytes no client library would send: a `-bin` value that is not
    base64, and a request that is not an InvokeRequest."""
    seen: dict[str, object] = {}
    invoke_path = "/switchgear.v1.GatewayService/Invoke"
    async with Client.open(address) as client:
        for sid, (name, extra, payload) in enumerate((
            ("bad -bin", [("x-key-bin", "!!!not base64***")], b""),
            ("corrupt protobuf", [], b"\xff\xff\xff"),
        )):
            client.send(client.headers(2 * sid + 1, invoke_path, extra=extra),
                        frame(DATA, END_STREAM, 2 * sid + 1, message(payload)))
            answer = await client.response(2 * sid + 1)
            status = answer.trailers or answer.headers
            seen[name] = (status["grpc-status"], status.get("grpc-message"))
    return seen


async def test_both_grpc_servers_answer_alike(control_plane: ControlPlane, upstream: tuple[Upstream, str]) -> None:
    up, url = upstream
    control_plane.registry.register(service("chat", url, model="gpt-4o-mini"), "test")
    no_presets(control_plane.registry)  # a failed call must fail here, not get the seed's LLM preset
    seen = {}
    for kind in ("switchgear", "grpcio"):
        address, stop, task = await run_agent(control_plane, None, kind)
        try:
            seen[kind] = await observe(address, up)
        finally:
            stop.set()
            await task
    ours = seen["switchgear"]
    assert ours["ok"][2] == 10
    assert ours["unknown service"][0] == grpc.StatusCode.NOT_FOUND
    assert ours["bad payload"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert ours["upstream down"] == (grpc.StatusCode.UNAVAILABLE, "retryable", "503", True)
    assert ours["health"] == health_pb2.HealthCheckResponse.SERVING
    assert ours["health unknown"] == grpc.StatusCode.NOT_FOUND
    assert "switchgear.v1.GatewayService" in ours["services"]  # type: ignore[operator]
    assert ours["bad -bin"] == ("13", "Error parsing 'x-key-bin' metadata: illegal base64 encoding")
    assert ours["corrupt protobuf"][0] == "2"  # type: ignore[index]  # grpc.aio's UNKNOWN, message and all
    assert seen["switchgear"] == seen["grpcio"]


async def test_the_agent_applies_its_grpc_limits(control_plane: ControlPlane) -> None:
    """Options.grpc_limits (the --grpc-* flags) reach the agent's server: with a cap of one
    connection, a second is refused with GOAWAY ENHANCE_YOUR_CALM while the first is served."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    options = Options(control_planes=[control_plane.address], listen="127.0.0.1:0", node_id="limited",
                      auth_required=False, grpc_limits=rpc.Limits(max_connections=1))
    task = asyncio.ensure_future(serve(options, stop, ready.set_result))
    try:
        address = await ready
        async with Client.open(address) as first:
            await first.until(http2.SETTINGS)  # accepted: it holds the one place
            async with Client.open(address) as second:
                assert await second.closed_or_goaway() == http2.ENHANCE_YOUR_CALM
            first.send(first.headers(1, "/grpc.health.v1.Health/Check"), frame(DATA, END_STREAM, 1, message(b"")))
            assert (await first.response(1)).headers[":status"] == "200"
    finally:
        stop.set()
        await task
