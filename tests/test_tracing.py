"""Traces from a real agent (in-process, on loopback) with the SDK's in-memory span exporter.

The caller's W3C trace context arrives as gRPC metadata; the agent's Invoke span continues that
trace, each upstream attempt is a child span with the GenAI attributes, and the upstream (a
tiny local OpenAI-shaped server that records request headers) receives `traceparent` naming
the attempt span. With tracing off no span is made and no header is added.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from switchgear.dataplane.server import Options, serve
from switchgear.dataplane.snapshot import Holder
from switchgear.dataplane.tracing import Tracing, response_attributes, upstream_headers
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import ControlPlane, Upstream, service

pytestmark = pytest.mark.timeout(60)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


async def run_agent(
    control_plane: ControlPlane, exporter: InMemorySpanExporter | None, grpc_server: str = "switchgear"
) -> tuple[str, asyncio.Event, Any]:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    options = Options(control_planes=[control_plane.address], listen="127.0.0.1:0", node_id="traced",
                      span_exporter=exporter, auth_required=False,  # client keys are governance's test
                      grpc_server=grpc_server)
    task = asyncio.ensure_future(serve(options, stop, ready.set_result))
    return await ready, stop, task


async def invoke(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> gateway_pb2.InvokeResponse:
    payload = orjson.dumps({"messages": [{"role": "user", "content": "hello"}]})
    request = gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=payload)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(200):  # until the agent holds its first snapshot
            try:
                return await stub.Invoke(request, metadata=metadata, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or "no snapshot" not in (exc.details() or ""):
                    raise
                await asyncio.sleep(0.05)
    raise AssertionError("agent never got a snapshot")


@pytest.mark.parametrize("grpc_server", ["switchgear", "grpcio"])  # the interceptor sees the same on both
async def test_invoke_and_attempt_spans_with_genai_attributes_and_traceparent_upstream(
    control_plane: ControlPlane, upstream: tuple[Upstream, str], grpc_server: str
) -> None:
    up, url = upstream
    control_plane.registry.register(service("chat", url, url, model="gpt-4o-mini"), "test")
    exporter = InMemorySpanExporter()
    address, stop, task = await run_agent(control_plane, exporter, grpc_server)
    try:
        await invoke(address)  # warm-up: the agent has its snapshot
        exporter.clear()
        up.headers.clear()
        up.fail_next = 1  # the first attempt fails over: two attempt spans under one Invoke
        reply = await invoke(address, (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
    finally:
        stop.set()
        await task
    assert reply.attempts == 2
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "switchgear.v1.GatewayService/Invoke"]
    attempts = sorted((s for s in spans if s.name == "chat gpt-4o-mini"),  # GenAI: "{operation} {model}"
                      key=lambda s: s.attributes["switchgear.attempt"])
    assert len(spans) == 3 and len(attempts) == 2
    # the caller's trace continues: same trace id, the caller's span is the parent
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None and format(root.parent.span_id, "016x") == PARENT_ID
    for span in attempts:
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert span.attributes["gen_ai.system"] == "openai"
        assert span.attributes["gen_ai.request.model"] == "gpt-4o-mini"
        assert span.attributes["switchgear.service"] == "chat"
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["server.address"] == "127.0.0.1" and span.attributes["server.port"] > 0
    failed, served = attempts
    assert failed.attributes["error.type"] == "retryable" and failed.status.status_code.name == "ERROR"
    assert served.attributes["gen_ai.usage.input_tokens"] == 7
    assert served.attributes["gen_ai.usage.output_tokens"] == 3
    assert root.attributes["switchgear.attempts"] == 2
    assert root.attributes["gen_ai.usage.output_tokens"] == 3
    assert root.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    # each upstream request carried the trace context of its own attempt span
    assert len(up.headers) == 2
    for headers, span in zip(up.headers, attempts, strict=True):
        _version, trace_id, span_id, _flags = headers["traceparent"].split("-")
        assert (trace_id, span_id) == (TRACE_ID, format(span.context.span_id, "016x"))


async def test_an_unsampled_trace_exports_nothing_and_still_propagates_upstream(
    control_plane: ControlPlane, upstream: tuple[Upstream, str]
) -> None:
    """The caller's trace is not sampled (flags 00): no span is exported, no attempt span is
    made, and the upstream still receives the caller's trace id, not sampled."""
    up, url = upstream
    control_plane.registry.register(service("chat", url, model="gpt-4o-mini"), "test")
    exporter = InMemorySpanExporter()
    address, stop, task = await run_agent(control_plane, exporter)
    try:
        await invoke(address)  # warm-up: the agent has its snapshot
        exporter.clear()
        up.headers.clear()
        reply = await invoke(address, (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00"),))
    finally:
        stop.set()
        await task
    assert reply.attempts == 1
    assert exporter.get_finished_spans() == ()
    (headers,) = up.headers
    _version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (trace_id, flags) == (TRACE_ID, "00") and span_id != PARENT_ID  # the agent's (server) span


async def test_tracing_off_makes_no_spans_and_adds_no_header(
    control_plane: ControlPlane, upstream: tuple[Upstream, str]
) -> None:
    assert Tracing.configure(Holder()) is None  # no endpoint, no exporter: nothing installed
    up, url = upstream
    control_plane.registry.register(service("chat", url, model="gpt-4o-mini"), "test")
    address, stop, task = await run_agent(control_plane, None)
    try:
        await invoke(address, (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
    finally:
        stop.set()
        await task
    assert up.headers and all("traceparent" not in h for h in up.headers)
    assert upstream_headers() == {}  # no current span anywhere


def test_new_traces_are_sampled_by_the_ratio_on_the_trace_id_they_carry() -> None:
    """The server span asks the provider's sampler itself (unsampled spans skip the SDK): a
    recorded span keeps the trace id the decision was made on, so the ratio is the configured
    one (TraceIdRatioBased: the low 64 bits below ratio * 2^64), and an unsampled request still
    propagates a valid trace id, flagged not sampled."""
    exporter = InMemorySpanExporter()
    half = Tracing.configure(Holder(), exporter=exporter, sample_ratio=0.5)
    assert half is not None
    recorded = 0
    for _ in range(200):
        with half.server_span("POST /v1/chat/completions", {}, {"http.request.method": "POST"}) as span:
            context, recording = span.get_span_context(), span.is_recording()
            _version, trace_id, _span_id, flags = upstream_headers()["traceparent"].split("-")
        assert int(trace_id, 16) == context.trace_id != 0
        assert recording == (context.trace_id & (2**64 - 1) < 2**63) == bool(int(flags, 16) & 1)
        recorded += recording
    finished = exporter.get_finished_spans()
    assert len(finished) == recorded and 40 < recorded < 160
    assert all(s.context.trace_id & (2**64 - 1) < 2**63 for s in finished)
    assert all(s.attributes["http.request.method"] == "POST" for s in finished)


def test_response_attributes_read_openai_and_anthropic_answers() -> None:
    """The answer's id, model and finish reasons, from each shape an attempt's answer comes in."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.configure(Holder(), exporter=exporter)
    assert tracing is not None
    answers = {
        "openai": b'{"id": "c1", "model": "gpt-4o-mini", "choices": [{"finish_reason": "length"}]}',
        "anthropic": b'{"id": "msg_1", "type": "message", "model": "claude-3", "stop_reason": "end_turn"}',
        "anthropic stream": b'{"type": "message_start", "message": {"id": "msg_2", "model": "claude-3"}}',
        "not json": b"<html>",
        "not an object": b"[1]",
    }
    for name, body in answers.items():
        with tracing.tracer.start_as_current_span(name) as span:
            response_attributes(span, body)
    tracing.shutdown()
    got = {s.name: dict(s.attributes or {}) for s in exporter.get_finished_spans()}
    assert got["openai"] == {"gen_ai.response.id": "c1", "gen_ai.response.model": "gpt-4o-mini",
                             "gen_ai.response.finish_reasons": ("length",)}
    assert got["anthropic"] == {"gen_ai.response.id": "msg_1", "gen_ai.response.model": "claude-3",
                                "gen_ai.response.finish_reasons": ("end_turn",)}
    assert got["anthropic stream"] == {"gen_ai.response.id": "msg_2", "gen_ai.response.model": "claude-3"}
    assert got["not json"] == got["not an object"] == {}


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_an_exception_leaves_the_server_span_ended_unmarked_and_the_context_restored(ratio: float) -> None:
    """An exception passing through `server_span` (sampled: the SDK's span; unsampled: the span
    made without it) propagates, leaves no current span behind, and does not mark the span
    ERROR nor record it (the door sets the status from the answer)."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.configure(Holder(), exporter=exporter, sample_ratio=ratio)
    assert tracing is not None
    carrier = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"} if ratio else {}
    with pytest.raises(KeyError), tracing.server_span("POST /v1/chat/completions", carrier, {}) as span:
        assert upstream_headers()["traceparent"].split("-")[2] == format(span.get_span_context().span_id, "016x")
        raise KeyError("the handler's own failure")
    assert upstream_headers() == {}  # the caller's context is current again
    finished = exporter.get_finished_spans()
    if ratio:
        (ended,) = finished
        assert ended.context.trace_id == int(TRACE_ID, 16) and ended.parent is not None
        assert ended.status.status_code.name == "UNSET" and not ended.events
    else:
        assert finished == () and not span.is_recording()


def test_the_traced_adapter_says_what_its_adapter_says_about_idempotence() -> None:
    """Hedging asks each call's adapter whether the call may be repeated (invoke.idempotent): the
    tracing wrapper answers as the adapter it wraps, and says nothing when that one says nothing."""
    from switchgear.adapters import builtin_adapters
    from switchgear.dataplane.invoke import idempotent
    from switchgear.dataplane.tracing import TracedAdapter
    from tests.test_pipeline import call

    openai = builtin_adapters()["openai"]
    chat, unknown = call(), dataclasses.replace(call(), method="images.generate")
    assert idempotent(TracedAdapter(openai), chat) is idempotent(openai, chat) is True
    assert idempotent(TracedAdapter(openai), unknown) is idempotent(openai, unknown) is False

    class Silent:
        protocol, methods = "silent", frozenset({"chat.completions"})

    assert not hasattr(TracedAdapter(Silent()), "idempotent")  # type: ignore[arg-type]
    assert idempotent(TracedAdapter(Silent()), chat) is False  # type: ignore[arg-type]
