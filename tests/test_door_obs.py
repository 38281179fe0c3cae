"""Both front doors as an SRE sees them, against a live agent on loopback.

One agent (in-process, client keys on, a tenant "acme") behind a real OpenAI-shaped upstream
that can fail on demand; traces leave by OTLP/HTTP to a small receiver that decodes the
protobuf the exporter sends. Checked: the Prometheus text of /metrics, parsed with
prometheus_client's parser, moves by exactly what the answers said (a retried request: +1
request, +2 attempts; tokens and USD as reported); every agent family the Grafana dashboard
queries is there; one access-log line per request with the caller's (or a made) request id
and no secret; a request with a `traceparent` is one trace in the receiver, the door's SERVER
span with each attempt its child; refusals are not span errors. Abuse: invalid and oversized
request ids, a malformed traceparent, a flood of unknown model names and of tenants.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from switchgear.controlplane import tenancy
from switchgear.controlplane.model import Category, Pricing, Tenant
from switchgear.controlplane.store import Change
from switchgear.dataplane import access_log
from switchgear.dataplane.access_log import MAX_REQUEST_ID, Exchange
from switchgear.dataplane.door_metrics import OTHER, DoorMetrics
from switchgear.dataplane.server import Options, serve
from switchgear.emulators.openai import InstanceSpec, start_instances
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import REPO, ControlPlane, Upstream, service

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def access_log_through_logging() -> Iterator[None]:
    """Whatever an earlier in-process CLI run configured, these tests read the access log
    through `logging` (caplog)."""
    access_log.reset()
    yield
    access_log.reset()

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


class OtlpReceiver:
    """OTLP/HTTP traces receiver (POST /v1/traces, protobuf) on a thread of its own: the agent's
    exporter posts from its thread, and its shutdown flush blocks the event loop."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        received = self.spans

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        received.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def add_tenant(control_plane: ControlPlane, tenant: str) -> str:
    registry = control_plane.registry
    state = tenancy.create_tenant(registry.state, Tenant(id=tenant))
    key, secret = tenancy.new_key(tenant, "", time.time())
    registry.change(tenancy.add_key(state, key), Change("test", "issue_key", key.id))
    return secret


def scrape(address: str) -> dict[str, Any]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def total(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families.get(name)
    if family is None:
        return 0.0
    suffix = "_total" if family.type == "counter" else ""
    return sum(s.value for s in family.samples if s.name == name + suffix
               and all(s.labels.get(k) == v for k, v in labels.items()))


class Agent:
    def __init__(self, grpc_address: str, http: str, metrics: str, stop: asyncio.Event, task: Any) -> None:
        self.grpc, self.http, self.metrics, self.stop, self.task = grpc_address, http, metrics, stop, task

    async def close(self) -> None:
        self.stop.set()
        await self.task


async def start_agent(control_planes: list[str], otlp_url: str = "", exporter: Any = None) -> Agent:
    loop = asyncio.get_running_loop()
    ready, http, metrics = loop.create_future(), loop.create_future(), loop.create_future()
    stop = asyncio.Event()
    options = Options(control_planes=control_planes, listen="127.0.0.1:0", http_listen="127.0.0.1:0",
                      metrics_listen="127.0.0.1:0", node_id="observed", otlp_endpoint=otlp_url,
                      span_exporter=exporter)
    task = asyncio.ensure_future(serve(options, stop, ready.set_result, http.set_result, metrics.set_result))
    return Agent(await ready, await http, await metrics, stop, task)


async def observed_chat_agent(control_plane: ControlPlane, url: str, otlp: OtlpReceiver,
                              caplog: pytest.LogCaptureFixture) -> tuple[Agent, dict[str, str], str]:
    """A "chat" service on `url`, a tenant "acme", the access log captured and an agent tracing
    to `otlp`: the agent, acme's auth header and the HTTP door's base URL."""
    control_plane.registry.register(service("chat", url, model="gpt-4o-mini"), "test")
    secret = add_tenant(control_plane, "acme")
    caplog.set_level(logging.INFO, logger="switchgear.access")
    agent = await start_agent([control_plane.address], otlp.url)
    return agent, {"Authorization": f"Bearer {secret}"}, f"http://{agent.http}"


async def until_ready(session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with session.get(f"{base}/readyz") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.02)
    raise AssertionError("the agent never became ready")


async def test_both_doors_counted_logged_and_traced(
    control_plane: ControlPlane, upstream: tuple[Upstream, str], otlp: OtlpReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up, url = upstream
    control_plane.registry.register(service("chat", url, url, model="gpt-4o-mini", pricing=Pricing(
        input_cost_per_1k_tokens=1.0, output_cost_per_1k_tokens=2.0)), "test")
    secret = add_tenant(control_plane, "acme")
    caplog.set_level(logging.INFO, logger="switchgear.access")
    agent = await start_agent([control_plane.address], otlp.url)
    auth = {"Authorization": f"Bearer {secret}"}
    base = f"http://{agent.http}"
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, base)
            before = scrape(agent.metrics)
            caplog.clear()
            # 1. HTTP, retried once, with the caller's request id and trace context
            up.fail_next = 1
            async with session.post(f"{base}/v1/chat/completions", json=CHAT, headers={
                    **auth, "x-request-id": "req-abc.1", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) as r:
                assert r.status == 200, await r.text()
                retried_headers = r.headers
                answer = await r.json()
            assert retried_headers["x-request-id"] == "req-abc.1"
            assert retried_headers["x-switchgear-attempts"] == "2"
            http_cost = float(retried_headers["x-switchgear-cost-usd"])
            assert http_cost == pytest.approx((7 * 1.0 + 3 * 2.0) / 1000)
            # 2. gRPC Invoke, its id from metadata
            async with grpc.aio.insecure_channel(agent.grpc) as channel:
                reply = await gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(gateway_pb2.InvokeRequest(
                    service="chat", method="chat.completions", payload=orjson.dumps({"messages": CHAT["messages"]})),
                    metadata=(("authorization", f"Bearer {secret}"), ("x-request-id", "grpc-req-7")), timeout=5)
            assert reply.request_id == "grpc-req-7" and reply.attempts == 1
            # 3. refusals: an unknown model, no key
            async with session.post(f"{base}/v1/chat/completions", json={**CHAT, "model": "nope"},
                                    headers=auth) as r:
                assert r.status == 404
            async with session.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 401
            after = scrape(agent.metrics)
    finally:
        await agent.close()

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # requests vs attempts: the retried request is 1 request, 2 attempts
    assert delta("switchgear_requests", door="http", route="chat", status_class="2xx", tenant="acme") == 1
    assert delta("switchgear_requests", door="grpc", route="chat", status_class="2xx", tenant="acme") == 1
    assert delta("switchgear_requests", door="http", route="unknown", status_class="4xx", tenant="acme") == 1
    assert delta("switchgear_requests", door="http", status_class="4xx", tenant="") == 1  # no key: no tenant
    assert delta("switchgear_upstream_attempts", service="chat") == 3
    assert delta("switchgear_upstream_attempts", service="chat", outcome="retryable") == 1
    assert delta("switchgear_upstream_attempts", service="chat", outcome="success") == 2
    assert delta("switchgear_request_count", service="chat") == 3  # the seed's name: attempts, documented
    # tokens and cost move by what the answers said
    usage = answer["usage"]
    assert delta("switchgear_tokens", route="chat", tenant="acme", direction="input") == \
        usage["prompt_tokens"] + reply.usage.input_tokens
    assert delta("switchgear_tokens", route="chat", tenant="acme", direction="output") == \
        usage["completion_tokens"] + reply.usage.output_tokens
    assert delta("switchgear_cost_usd", route="chat", tenant="acme") == pytest.approx(http_cost + reply.usage.cost_usd)
    assert delta("switchgear_rejections", door="http", reason="model_not_found") == 1
    assert delta("switchgear_rejections", door="http", reason="invalid_api_key") == 1
    # the overhead histogram counts both doors' calls (3 HTTP, 1 gRPC)
    overhead = "switchgear_gateway_overhead_seconds"
    assert _count(after, overhead) - _count(before, overhead) == 4
    assert _count(after, "switchgear_request_duration_seconds", door="http") >= 3
    # every family the dashboard's agent panels query has series on a live agent
    dashboard = json.loads((REPO / "dashboards" / "switchgear.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "$agent_job" in t["expr"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"switchgear_\w+", e)}
    assert {"switchgear_requests", "switchgear_tokens", "switchgear_cost_usd", "switchgear_rejections"} <= used
    for family in used:
        assert family in after and after[family].samples, family

    # the access log: one JSON line per request, no secret
    lines = [r.getMessage() for r in caplog.records if r.name == "switchgear.access"]
    assert len(lines) == 4, lines
    assert all(secret not in line and "Bearer" not in line for line in lines)
    entries = [orjson.loads(line) for line in lines]
    retried, grpc_entry, not_found, no_key = entries
    assert retried["request_id"] == "req-abc.1" and retried["door"] == "http" and retried["status"] == 200
    assert (retried["attempts"], retried["tenant"], retried["route"]) == (2, "acme", "chat")
    assert retried["input_tokens"] == 7 and retried["cost_usd"] == pytest.approx(http_cost)
    assert retried["method"] == "chat.completions" and retried["latency_ms"] > 0
    assert grpc_entry["door"] == "grpc" and grpc_entry["request_id"] == "grpc-req-7" and grpc_entry["status"] == "OK"
    assert (not_found["status"], not_found["reason"], not_found["route"]) == (404, "model_not_found", "")
    assert (no_key["status"], no_key["reason"], no_key["tenant"]) == (401, "invalid_api_key", "")
    assert re.fullmatch(r"[0-9a-f]{32}", no_key["request_id"])  # made when the caller sent none

    # one trace: the HTTP door's SERVER span continues the caller's, each attempt its child
    traced = [s for s in otlp.spans if s.trace_id.hex() == TRACE_ID]
    (server,) = [s for s in traced if s.kind == s.SPAN_KIND_SERVER]
    attempts = [s for s in traced if s.kind == s.SPAN_KIND_CLIENT]
    assert len(traced) == 3 and len(attempts) == 2
    assert server.parent_span_id.hex() == PARENT_ID
    assert server.name == "POST /v1/chat/completions"
    assert all(a.parent_span_id == server.span_id for a in attempts)
    attrs = {a.key: _value(a.value) for a in server.attributes}
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.id"] == "c1" and attrs["gen_ai.response.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs["switchgear.request_id"] == "req-abc.1" and attrs["http.response.status_code"] == 200
    for span in attempts:
        a = {kv.key: _value(kv.value) for kv in span.attributes}
        assert span.name == "chat gpt-4o-mini" and a["gen_ai.operation.name"] == "chat"
        assert a["server.address"] == "127.0.0.1" and a["server.port"] > 0
    # the attempt that served carries the inference call's answer (GenAI: the CLIENT span's);
    # the failed one has none
    failed, served = sorted(({kv.key: _value(kv.value) for kv in a.attributes} for a in attempts),
                            key=lambda a: a["switchgear.attempt"])
    assert (served["gen_ai.response.id"], served["gen_ai.response.model"]) == ("c1", "gpt-4o-mini")
    assert served["gen_ai.response.finish_reasons"] == ["stop"]
    assert (served["gen_ai.usage.input_tokens"], served["gen_ai.usage.output_tokens"]) == (7, 3)
    assert failed["error.type"] == "retryable" and not any(k.startswith("gen_ai.response.") for k in failed)
    # refusals are the caller's: not ERROR, no exception event; the gRPC call has its SERVER span
    servers = [s for s in otlp.spans if s.kind == s.SPAN_KIND_SERVER]
    assert len(servers) == 4
    for span in servers:
        assert span.status.code != span.status.STATUS_CODE_ERROR and not span.events, span.name


def _count(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families.get(name)
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples if s.name == f"{name}_count"
               and all(s.labels.get(k) == v for k, v in labels.items()))


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind)


async def test_request_ids_and_trace_context_from_outsiders_are_bounded(
    control_plane: ControlPlane, upstream: tuple[Upstream, str], otlp: OtlpReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An oversized or odd x-request-id is replaced (the answer says which id was used); a
    malformed traceparent starts a new trace; 200 unknown model names and a flood of tenants
    add no series beyond "unknown" / the cap."""
    agent, auth, base = await observed_chat_agent(control_plane, upstream[1], otlp, caplog)
    used_ids = []
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, base)
            caplog.clear()
            for bad in ("x" * (MAX_REQUEST_ID + 1), "id with spaces", "id\"}{,inject", "a/b"):
                async with session.post(f"{base}/v1/chat/completions", json=CHAT,
                                        headers={**auth, "x-request-id": bad}) as r:
                    assert r.status == 200
                    used_ids.append(r.headers["x-request-id"])
                    assert r.headers["x-request-id"] != bad
            async with session.post(f"{base}/v1/chat/completions", json=CHAT, headers={
                    **auth, "x-request-id": "k" * MAX_REQUEST_ID, "traceparent": "00-zz-not-a-trace-01"}) as r:
                assert r.status == 200 and r.headers["x-request-id"] == "k" * MAX_REQUEST_ID
            for i in range(200):
                async with session.post(f"{base}/v1/chat/completions", json={**CHAT, "model": f"flood-{i}"},
                                        headers=auth) as r:
                    assert r.status == 404
            families = scrape(agent.metrics)
        async with grpc.aio.insecure_channel(agent.grpc) as channel:  # the gRPC door: the same bound
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for given in ("g" * (MAX_REQUEST_ID + 1), "new\nline"):
                reply = await stub.Invoke(gateway_pb2.InvokeRequest(
                    service="chat", method="chat.completions", request_id=given,
                    payload=orjson.dumps({"messages": CHAT["messages"]})),
                    metadata=(("authorization", auth["Authorization"]),), timeout=5)
                used_ids.append(reply.request_id)
    finally:
        await agent.close()
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in used_ids)
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "switchgear.access"]
    assert len(lines) == 207
    assert [line["request_id"] for line in lines[:4] + lines[-2:]] == used_ids
    routes = {s.labels["route"] for s in families["switchgear_requests"].samples}
    assert routes == {"chat", "unknown"}
    assert len(families["switchgear_request_duration_seconds"].samples) < 3 * 20  # two routes' buckets
    # the malformed traceparent: a trace of its own, its server span a root
    roots = [s for s in otlp.spans if s.kind == s.SPAN_KIND_SERVER and not s.parent_span_id]
    assert len(roots) == 207


def test_label_cardinality_is_bounded() -> None:
    metrics = DoorMetrics(max_tenants=10, max_routes=20)
    for i in range(1000):
        exchange = Exchange("http", "r")
        exchange.route, exchange.tenant, exchange.status_class = f"model-{i}", f"tenant-{i}", "2xx"
        exchange.reason = f"reason-{i}"
        exchange.answered(1, 1, 0.001, "e0", 1)
        exchange.close()
        metrics.record(exchange)
    tenants = {key[3] for key in metrics.requests}
    routes = {key[1] for key in metrics.requests}
    assert len(tenants) == 11 and OTHER in tenants
    assert len(routes) == 21 and OTHER in routes
    assert len({key[1] for key in metrics.rejections}) <= 65
    assert sum(metrics.requests.values()) == 1000  # nothing dropped, only folded
    assert sum(v for (_, _, direction), v in metrics.tokens.items() if direction == "input") == 1000


async def test_probes_answer_before_the_first_snapshot() -> None:
    """No control plane reachable: /healthz 200, /readyz 503; no other path answers without a
    key, and the probes say nothing but their state."""
    agent = await start_agent(["127.0.0.1:9"])
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://{agent.http}"
            async with session.get(f"{base}/healthz") as r:
                assert r.status == 200 and await r.json() == {"status": "ok"}
            async with session.get(f"{base}/readyz") as r:
                assert r.status == 503 and await r.json() == {"status": "not ready"}
            async with session.post(f"{base}/readyz") as r:
                assert r.status == 405
            async with session.get(f"{base}/readyz?verbose=1") as r:
                assert r.status == 503 and await r.json() == {"status": "not ready"}
            async with session.get(f"{base}/metrics") as r:  # the API port answers only its own paths
                assert r.status == 404 and "switchgear_" not in await r.text()
    finally:
        await agent.close()


async def test_streams_embeddings_and_refusals_on_both_doors(control_plane: ControlPlane,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Streams through either door log their tokens; an embeddings attempt is an "embeddings"
    span; gRPC NOT_FOUND and UNAUTHENTICATED leave the SERVER span unset, with no stack trace."""
    exporter = InMemorySpanExporter()
    async with await start_instances([InstanceSpec("a")]) as group:
        control_plane.registry.register(service("chat", group.urls["a"], model="gpt-4o-mini"), "test")
        control_plane.registry.register(dataclasses.replace(service(
            "embed", group.urls["a"], model="text-embedding-3-small"), category=Category.EMBEDDING), "test")
        secret = add_tenant(control_plane, "acme")
        caplog.set_level(logging.INFO, logger="switchgear.access")
        agent = await start_agent([control_plane.address], exporter=exporter)
        base = f"http://{agent.http}"
        auth = {"Authorization": f"Bearer {secret}"}
        try:
            async with aiohttp.ClientSession() as session:
                await until_ready(session, base)
                caplog.clear()
                async with session.post(f"{base}/v1/chat/completions", headers=auth, json={
                        **CHAT, "stream": True, "stream_options": {"include_usage": True}}) as r:
                    events = [line for line in (await r.text()).splitlines() if line.startswith("data: {")]
                    assert r.status == 200 and r.headers["x-request-id"]
                usage = orjson.loads(events[-1][6:])["usage"]
                async with session.post(f"{base}/v1/embeddings", headers=auth,
                                        json={"model": "embed", "input": "hello"}) as r:
                    assert r.status == 200
            async with grpc.aio.insecure_channel(agent.grpc) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                request = gateway_pb2.InvokeRequest(service="chat", method="chat.completions",
                                                    payload=orjson.dumps({"messages": CHAT["messages"]}))
                items = [item async for item in stub.InvokeStream(gateway_pb2.InvokeStreamRequest(
                    request=request), metadata=(("authorization", f"Bearer {secret}"),), timeout=5)]
                end = items[-1].end
                for metadata, service_name, code in (((), "chat", grpc.StatusCode.UNAUTHENTICATED),
                                                     ((("authorization", f"Bearer {secret}"),), "nope",
                                                      grpc.StatusCode.NOT_FOUND)):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Invoke(gateway_pb2.InvokeRequest(
                            service=service_name, method="chat.completions", payload=b"{}"),
                            metadata=metadata, timeout=5)
                    assert info.value.code() == code
        finally:
            await agent.close()
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "switchgear.access"]
    http_stream, embedded, grpc_stream, unauthenticated, not_found = lines
    assert (http_stream["input_tokens"], http_stream["output_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert http_stream["input_tokens"] > 0 and http_stream["attempts"] == 1
    assert embedded["method"] == "embeddings" and embedded["route"] == "embed" and embedded["status"] == 200
    assert grpc_stream["door"] == "grpc" and grpc_stream["status"] == "OK" and end.usage.input_tokens > 0
    assert (grpc_stream["input_tokens"], grpc_stream["output_tokens"]) == (end.usage.input_tokens,
                                                                           end.usage.output_tokens)
    assert (unauthenticated["status"], unauthenticated["reason"]) == ("UNAUTHENTICATED", "unauthenticated")
    assert (not_found["status"], not_found["route"]) == ("NOT_FOUND", "")
    spans = exporter.get_finished_spans()
    (embedding,) = [s for s in spans if s.kind == SpanKind.CLIENT and s.attributes["switchgear.service"] == "embed"]
    assert embedding.name == "embeddings text-embedding-3-small"
    assert embedding.attributes["gen_ai.operation.name"] == "embeddings"
    assert embedding.attributes["gen_ai.response.model"] == "text-embedding-3-small"
    # each stream's attempt span carries its answer's model, id and finish reason too
    streamed = [s for s in spans if s.kind == SpanKind.CLIENT and s.attributes["switchgear.service"] == "chat"]
    assert len(streamed) == 2  # the HTTP door's stream and the gRPC door's
    for span in streamed:
        assert span.attributes["gen_ai.response.finish_reasons"] == ("stop",)
        assert span.attributes["gen_ai.response.model"] == "gpt-4o-mini" and span.attributes["gen_ai.response.id"]
    refused = [s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("rpc.grpc.status_code") in (5, 16)]
    assert len(refused) == 2
    for span in refused:
        assert span.status.status_code == StatusCode.UNSET and not span.events


async def test_the_anthropic_door_is_logged_and_counted_like_the_openai_door(
    control_plane: ControlPlane, upstream: tuple[Upstream, str], caplog: pytest.LogCaptureFixture,
) -> None:
    """POST /v1/messages (translated to the OpenAI-protocol upstream) gets the same access-log
    line and request metrics as /v1/chat/completions: route, tenant, tokens, cost, endpoint."""
    _, url = upstream
    control_plane.registry.register(service("chat", url, model="gpt-4o-mini", pricing=Pricing(
        input_cost_per_1k_tokens=1.0, output_cost_per_1k_tokens=2.0)), "test")
    secret = add_tenant(control_plane, "acme")
    caplog.set_level(logging.INFO, logger="switchgear.access")
    agent = await start_agent([control_plane.address])
    base = f"http://{agent.http}"
    message = {"model": "chat", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, base)
            before = scrape(agent.metrics)
            caplog.clear()
            async with session.post(f"{base}/v1/messages", json=message, headers={"x-api-key": secret}) as r:
                assert r.status == 200, await r.text()
                answer = await r.json()
            async with session.post(f"{base}/v1/messages", json={**message, "stream": True},
                                    headers={"x-api-key": secret}) as r:
                assert r.status == 200
                await r.read()
            after = scrape(agent.metrics)
    finally:
        await agent.close()
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "switchgear.access"]
    assert len(lines) == 2, lines
    unary, streamed = lines
    for line in lines:
        assert (line["door"], line["status"], line["route"], line["tenant"]) == ("http", 200, "chat", "acme")
    assert unary["endpoint"] == "e0" and unary["attempts"] == 1
    assert unary["input_tokens"] == answer["usage"]["input_tokens"] > 0 and unary["cost_usd"] > 0
    # this upstream does not stream: the stream's attempts failed over to the seed's LLM preset, and
    # its line still says how many attempts the stream end reported (0 when nothing was noted)
    assert streamed["attempts"] >= 1
    assert total(after, "switchgear_requests", door="http", route="chat", tenant="acme") - \
        total(before, "switchgear_requests", door="http", route="chat", tenant="acme") == 2


async def test_the_callers_session_is_logged_and_traced_bounded_on_both_doors(
    control_plane: ControlPlane, upstream: tuple[Upstream, str], otlp: OtlpReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The seed's `session_id` (InvokeRequest.session_id, HTTP `x-switchgear-session`) is the
    access line's `session` and the SERVER span's `session.id`; one an outsider chose freely
    (too long, odd characters) is "invalid", none is ""."""
    agent, auth, base = await observed_chat_agent(control_plane, upstream[1], otlp, caplog)
    given = ["conv-42", "s" * MAX_REQUEST_ID, "s" * (MAX_REQUEST_ID + 1), "a b", '"}{,inject', ""]
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, base)
            caplog.clear()
            for i, sid in enumerate(given):
                headers = {**auth, "x-request-id": f"http-{i}", **({"x-switchgear-session": sid} if sid else {})}
                async with session.post(f"{base}/v1/chat/completions", json=CHAT, headers=headers) as r:
                    assert r.status == 200
        async with grpc.aio.insecure_channel(agent.grpc) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for i, sid in enumerate([*given, "new\nline"]):
                await stub.Invoke(gateway_pb2.InvokeRequest(
                    service="chat", method="chat.completions", request_id=f"grpc-{i}", session_id=sid,
                    payload=orjson.dumps({"messages": CHAT["messages"]})),
                    metadata=(("authorization", auth["Authorization"]),), timeout=5)
    finally:
        await agent.close()
    expected = ["conv-42", "s" * MAX_REQUEST_ID, "invalid", "invalid", "invalid", ""]
    lines = {line["request_id"]: line for line in
             (orjson.loads(r.getMessage()) for r in caplog.records if r.name == "switchgear.access")}
    assert [lines[f"http-{i}"]["session"] for i in range(len(given))] == expected
    assert [lines[f"grpc-{i}"]["session"] for i in range(len(given) + 1)] == [*expected, "invalid"]
    sessions = {}
    for span in otlp.spans:
        if span.kind == span.SPAN_KIND_SERVER:
            attrs = {a.key: _value(a.value) for a in span.attributes}
            sessions[attrs["switchgear.request_id"]] = attrs.get("session.id", "")
    assert sessions["http-0"] == sessions["grpc-0"] == "conv-42"
    assert sessions["http-2"] == sessions["grpc-6"] == "invalid" and sessions["http-5"] == sessions["grpc-5"] == ""
