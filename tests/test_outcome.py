"""One refusal mapping for both doors (outcome.py), the JSON depth limit, the tenant in-flight
cap, and what a stream cut by its caller is charged: tables and in-memory fakes."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
import pytest

from switchgear.adapters.base import ErrorKind, TokenUsage, UpstreamError
from switchgear.dataplane import gateway, http
from switchgear.dataplane.attempts import CallFailed
from switchgear.dataplane.convert import MAX_JSON_DEPTH, RequestError, check_depth
from switchgear.dataplane.events import AttemptEnd
from switchgear.dataplane.governance import (
    InFlight,
    PermissionDenied,
    Quota,
    TenantBusy,
    TenantView,
    Unauthenticated,
)
from switchgear.dataplane.outcome import REFUSED, Refusal, ServiceNotFound, Unsupported, public_text, refusal
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer, QuotaExceeded
from switchgear.dataplane.reporter import LoadAccumulator
from switchgear.dataplane.resilience.admission import Rejection, ShedReason
from switchgear.dataplane.resilience.admission_edge import Shed
from switchgear.dataplane.resilience.signals import Signal, signal_of
from switchgear.dataplane.snapshot import AgentSnapshot, Pricing, ServiceView
from switchgear.dataplane.stream import Meter, StreamEnd, StreamItem
from tests.test_pipeline import bearer, call, snapshot


def upstream(kind: ErrorKind, status: int | None = None, retry: float | None = None) -> CallFailed:
    return CallFailed(UpstreamError(kind, "boom", status=status, retry_after_s=retry), 2, "chat", "e1")


@pytest.mark.parametrize(
    ("exc", "grpc_status", "http_status", "code", "retry_after"),
    [
        (Unauthenticated("no key"), "UNAUTHENTICATED", 401, "invalid_api_key", None),
        (PermissionDenied("service", "no"), "PERMISSION_DENIED", 403, "permission_denied", None),
        (RequestError("payload.x", "bad"), "INVALID_ARGUMENT", 400, "invalid_value", None),
        (ServiceNotFound("service: none"), "NOT_FOUND", 404, "model_not_found", None),
        (Unsupported("service x: protocol y"), "UNIMPLEMENTED", 501, "unsupported", None),
        (QuotaExceeded("12 requests per minute used", 7.2), "RESOURCE_EXHAUSTED", 429, "rate_limit_exceeded", "8"),
        (TenantBusy("t", 2), "RESOURCE_EXHAUSTED", 429, "tenant_in_flight_limit", "1"),
        (Shed(Rejection(1, "chat", "e0", 1, ShedReason.QUEUE_FULL, 0.3)), "RESOURCE_EXHAUSTED", 429, "overloaded",
         "1"),
        (Shed(Rejection(1, "chat", "e0", 1, ShedReason.DEADLINE, 2.5)), "DEADLINE_EXCEEDED", 504, "queue_timeout",
         "3"),
        (upstream(ErrorKind.RATE_LIMITED, 429, 0.2), "RESOURCE_EXHAUSTED", 429, "rate_limit_exceeded", "1"),
        (upstream(ErrorKind.RETRYABLE, 503), "UNAVAILABLE", 503, "upstream_unavailable", None),
        (upstream(ErrorKind.CONNECT), "UNAVAILABLE", 503, "upstream_unavailable", None),
        (upstream(ErrorKind.TIMEOUT), "DEADLINE_EXCEEDED", 504, "upstream_timeout", None),
        (upstream(ErrorKind.CLIENT, 400), "INVALID_ARGUMENT", 400, "upstream_rejected", None),
        (upstream(ErrorKind.CLIENT, 413), "INVALID_ARGUMENT", 413, "upstream_rejected", None),  # its own 4xx
        (upstream(ErrorKind.CONTEXT_LENGTH, 400), "INVALID_ARGUMENT", 400, "context_length_exceeded", None),
        (upstream(ErrorKind.AUTH, 401), "FAILED_PRECONDITION", 502, "upstream_auth_failed", None),
        (upstream(ErrorKind.CONFIG), "FAILED_PRECONDITION", 500, "agent_misconfigured", None),
    ],
)
def test_every_failure_has_one_refusal(exc: Exception, grpc_status: str, http_status: int, code: str,
                                       retry_after: str | None) -> None:
    assert isinstance(exc, REFUSED)
    r = refusal(exc)
    assert (r.grpc_status, r.http_status, r.code, r.retry_after) == (grpc_status, http_status, code, retry_after)
    assert grpc.StatusCode[r.grpc_status]  # a real status name


def test_anything_else_is_not_a_refusal() -> None:
    with pytest.raises(TypeError):
        refusal(ValueError("x"))


class FakeContext:
    def __init__(self) -> None:
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    async def abort(self, code: grpc.StatusCode, message: str) -> NoReturn:
        self.aborted = (code, message)
        raise RuntimeError("aborted")


async def test_both_doors_render_the_same_refusal() -> None:
    r = refusal(upstream(ErrorKind.RATE_LIMITED, 429, 2.4))
    context = FakeContext()
    with pytest.raises(RuntimeError):
        await gateway.render(context, r)  # type: ignore[arg-type]
    assert context.aborted == (grpc.StatusCode.RESOURCE_EXHAUSTED, r.message)
    trailers = dict(context.trailers)
    error = http.render(r)
    assert (error.status, error.message, error.code) == (429, r.message, "rate_limit_exceeded")
    assert trailers["retry-after"] == error.headers["Retry-After"] == "3"
    for name in ("attempts", "error-kind", "upstream-status", "endpoint"):
        assert trailers[f"switchgear-{name}"] == error.headers[f"x-switchgear-{name}"]


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        ("POST http://10.0.0.7:8080/v1/chat/completions: connection reset", "connection reset",
         ("10.0.0.7", "8080", "/v1", "http")),
        ("All connection attempts failed to ('127.0.0.1', 43521)", "connection attempts failed",
         ("127.0.0.1", "43521")),
        ("Cannot connect to host llm.internal.example:443 ssl:default", "Cannot connect", ("llm.internal", "443")),
        ("upstream [::1]:9000 refused", "refused", ("::1", "9000")),
        ("error at /srv/models/secret/path", "error at", ("/srv", "secret")),
        ("Invalid type for 'max_tokens': expected an integer", "Invalid type for 'max_tokens'", ()),
    ],
)
def test_public_text_hides_where_the_upstream_lives(text: str, kept: str, gone: tuple[str, ...]) -> None:
    shown = public_text(text)
    assert kept in shown
    assert not [g for g in gone if g in shown], shown


def test_an_upstream_failure_names_service_endpoint_and_kind_but_no_address() -> None:
    failed = CallFailed(UpstreamError(ErrorKind.CONNECT, "POST http://127.0.0.1:9/v1/chat/completions: refused"),
                        3, "chat", "e2")
    message = refusal(failed).message
    assert message.startswith("service chat endpoint e2: connect after 3 attempt(s):")
    assert "127.0.0.1" not in message and "/v1" not in message


def test_caller_faults_are_neutral_everywhere_shared() -> None:
    assert {k for k in ErrorKind if k.caller_fault} == {ErrorKind.CLIENT, ErrorKind.CONTEXT_LENGTH}
    assert signal_of(ErrorKind.CLIENT) is signal_of(ErrorKind.CONTEXT_LENGTH) is Signal.NEUTRAL
    acc = LoadAccumulator()
    from switchgear.dataplane.events import AttemptStart

    for i, kind in enumerate((ErrorKind.CLIENT, ErrorKind.CONTEXT_LENGTH, None)):
        acc.attempt_started(AttemptStart(f"r{i}", "chat", "llm", "e0", 1, 5))
        acc.attempt_ended(AttemptEnd(f"r{i}", "chat", "llm", "e0", 1, 0.01, kind))
    (load,) = acc.drain()
    assert (load.requests_issued, load.requests_succeeded, list(load.requests_failed), load.in_flight) == (1, 1, [], 0)
    assert load.latency_count == 1


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a": 1}, None),
        ({"a": [[["x"]]]}, None),
        ([[1]], None),
        ({"deep": "[" * (MAX_JSON_DEPTH - 1)}, None),  # a string is not nesting
    ],
)
def test_json_within_the_depth_limit_passes(value: Any, path: str | None) -> None:
    check_depth(value)


def nest(levels: int) -> Any:
    """`levels` arrays, one inside the other, around a string (depth counts containers)."""
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


def test_json_nested_exactly_to_the_limit_passes_and_one_more_is_refused_naming_the_field() -> None:
    check_depth({"ok": nest(MAX_JSON_DEPTH - 1), "other": 1})  # the object is level 1
    check_depth(nest(MAX_JSON_DEPTH))
    with pytest.raises(RequestError) as info:
        check_depth({"fine": [1], "tools": nest(MAX_JSON_DEPTH)}, path="payload")
    assert info.value.path == "payload.tools" and str(MAX_JSON_DEPTH) in info.value.message
    with pytest.raises(RequestError) as info:
        check_depth(nest(MAX_JSON_DEPTH + 1))
    assert info.value.path == "body"
    with pytest.raises(RequestError):  # far deeper than the recursion limit: the check is iterative
        check_depth({"x": nest(100_000)})


def test_in_flight_cap_counts_per_tenant() -> None:
    capped, free = TenantView(id="capped", max_in_flight=2), TenantView(id="free")
    slots = InFlight()
    slots.enter(capped)
    slots.enter(capped)
    with pytest.raises(TenantBusy):
        slots.enter(capped)
    for _ in range(50):
        slots.enter(free)  # no cap, and another tenant's count
    slots.leave(capped)
    slots.enter(capped)
    assert (slots.count("capped"), slots.count("free")) == (2, 50)


def test_meter_charges_what_was_sent() -> None:
    service = ServiceView(name="chat", category="llm", protocol="openai", endpoints=(),
                          pricing=Pricing(cost_per_1k_tokens=1.0))
    assert Meter().charge() == (TokenUsage(), 0.0)  # nothing sent, nothing charged
    cut = Meter(service=service, prompt_chars=401, sent_chars=9)
    assert cut.charge() == (TokenUsage(101, 3, estimated=True), pytest.approx(0.104))
    reported = Meter(service=service, prompt_chars=401, sent_chars=9, reported=TokenUsage(90, 4))
    assert reported.charge()[0] == TokenUsage(90, 4)


async def test_pipeline_charges_a_stream_its_caller_abandons() -> None:
    service = ServiceView(name="chat", category="llm", protocol="openai", endpoints=())
    snap = snapshot(quota=Quota(tokens_per_minute=100))
    quotas = QuotaEnforcer(LocalCounters())

    async def nothing(_c: Any, _s: AgentSnapshot) -> Any:
        raise AssertionError("unary path not used")

    async def open_stream(c: Any, _s: AgentSnapshot, meter: Meter) -> Any:
        meter.service, meter.prompt_chars = service, 400
        for _ in range(100):
            meter.sent_chars += 4
            yield b"{}"
        yield StreamEnd("chat", "e0", 1, 0.0, 0.0, TokenUsage(100, 100), 0.0, False, "1.a")

    pipe = Pipeline(nothing, auth_required=True, quotas=quotas, cache=None)
    principal = pipe.identify(bearer("acme"), snap)
    items = pipe.stream(call(), snap, principal, open_stream)
    first: StreamItem = await anext(items)
    assert first == b"{}"
    assert pipe.in_flight.count("acme") == 1
    await items.aclose()  # the caller went away after one chunk
    assert pipe.in_flight.count("acme") == 0
    assert quotas.drain_usage()["acme"].tokens == 100 + 1  # the prompt and one chunk's token
    with pytest.raises(QuotaExceeded):
        await anext(pipe.stream(call(), snap, principal, open_stream))


def test_refusal_is_frozen() -> None:
    r = Refusal("k", "INTERNAL", 500, "m", "server_error")
    with pytest.raises(AttributeError):
        r.message = "changed"  # type: ignore[misc]


def test_max_in_flight_travels_from_the_control_plane_to_the_agent() -> None:
    from switchgear.controlplane.convert_governance import policy_from_proto, policy_to_proto
    from switchgear.controlplane.model import Tenant, TenantPolicy
    from switchgear.controlplane.validate import validate_governance
    from switchgear.dataplane.convert_governance import governance_from_proto
    from switchgear.v1 import governance_pb2

    wire = policy_to_proto(TenantPolicy(max_in_flight=3))
    assert policy_from_proto(wire).max_in_flight == 3
    agent_view = governance_from_proto([governance_pb2.Tenant(id="t", policy=wire)], [])
    assert agent_view.tenants["t"].max_in_flight == 3
    problems = validate_governance([Tenant(id="t", policy=TenantPolicy(max_in_flight=-1))], [])
    assert [p.path for p in problems] == ["tenants[t].policy.max_in_flight"]


def test_the_cli_refuses_a_negative_in_flight_cap_with_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from switchgear.cli import main

    with pytest.raises(SystemExit) as info:
        main(["tenants", "create", "t", "--max-in-flight", "-1"])
    assert info.value.code == 2 and "--max-in-flight" in capsys.readouterr().err


def test_the_depth_check_trusts_a_text_with_few_brackets_and_walks_one_with_many() -> None:
    import orjson

    shallow = {"messages": [{"role": "user", "content": "[" * 500}]}  # brackets in a string are not levels
    check_depth(shallow, raw=orjson.dumps(shallow))
    deep_text = b'{"x": ' + b"[" * MAX_JSON_DEPTH + b"1" + b"]" * MAX_JSON_DEPTH + b"}"
    with pytest.raises(RequestError):
        check_depth(orjson.loads(deep_text), raw=deep_text)


async def test_a_unary_call_holds_its_tenants_slot_until_it_ends() -> None:
    import asyncio

    from tests.test_pipeline import Upstream, pipeline

    release = asyncio.Event()
    pipe = pipeline(Upstream(release), cache=False)
    snap = snapshot(max_in_flight=1)
    acme, globex = pipe.identify(bearer("acme"), snap), pipe.identify(bearer("globex"), snap)
    first = asyncio.ensure_future(pipe.invoke(call(text="one"), snap, acme))
    for _ in range(100):  # let it take the slot and wait upstream
        if pipe.in_flight.count("acme"):
            break
        await asyncio.sleep(0)
    with pytest.raises(TenantBusy):
        await pipe.invoke(call(text="two"), snap, acme)
    other = asyncio.ensure_future(pipe.invoke(call(text="three"), snap, globex))  # another tenant's own slot
    release.set()
    await asyncio.gather(first, other)
    assert (pipe.in_flight.count("acme"), pipe.in_flight.count("globex")) == (0, 0)
    with pytest.raises(ServiceNotFound):  # a refused call gives nothing to give back
        await pipe.invoke(call(service="nope"), snap, acme)
    assert pipe.in_flight.count("acme") == 0


def test_the_control_plane_ignores_caller_faults_an_older_agent_reports() -> None:
    from switchgear.controlplane.collector import Collector, LoadDelta

    collector = Collector()
    collector.record("old-agent", [LoadDelta(service="chat", endpoint="a", category="llm", issued=10, succeeded=4,
                                             failed=(("client", 5), ("context_length", 1)))], 100.0)
    collector.record("old-agent", [LoadDelta(service="chat", endpoint="b", category="llm", issued=4, succeeded=3,
                                             failed=(("retryable", 1),))], 100.0)
    a, b = collector.stats(("chat", "a"), 60.0, 100.5), collector.stats(("chat", "b"), 60.0, 100.5)
    assert (a.failed, a.error_rate, a.success_rate) == (0, 0.0, 1.0)
    assert (b.failed, b.error_rate) == (1, 0.25)


def test_the_agents_json_depth_flag_defaults_to_the_documented_limit_and_refuses_nonsense(
        capsys: pytest.CaptureFixture[str]) -> None:
    from switchgear.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["agent", "--control-plane", "127.0.0.1:1"])
    assert args.max_json_depth == MAX_JSON_DEPTH == 64
    assert parser.parse_args(["agent", "--control-plane", "x", "--max-json-depth", "8"]).max_json_depth == 8
    for bad in ("1", "129", "-3", "deep"):
        with pytest.raises(SystemExit):
            parser.parse_args(["agent", "--control-plane", "x", "--max-json-depth", bad])
        assert "--max-json-depth" in capsys.readouterr().err


def test_both_doors_parse_with_the_pipelines_depth_limit() -> None:
    import orjson

    from switchgear.dataplane.convert import call_from_proto
    from switchgear.v1 import gateway_pb2

    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "tree": nest(7)}
    raw = orjson.dumps(body)  # the tree's deepest array is level 8
    assert http.parse_body(raw, 8)["tree"] == body["tree"]
    with pytest.raises(RequestError) as info:
        http.parse_body(raw, 7)
    assert info.value.path == "tree"
    request = gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=raw)
    assert call_from_proto(request, 8).payload["tree"] == body["tree"]
    with pytest.raises(RequestError) as info:
        call_from_proto(request, 7)
    assert info.value.path == "payload.tree"
