"""A request names the capabilities it needs; routing keeps only the targets that offer them.

The seed's `discover_services(..., requirements)` → `apply_service_policies`: here a call's
`required_capabilities` (gRPC), `x-switchgear-require` (every HTTP route) or /v1/invoke's
`required_capabilities`, joined by its tenant's `required_capabilities`, become the scheduling
request's capabilities; `filters.has_capabilities` keeps the targets offering all of them (a
category route's, per member service) and `filters.fits_context` those whose context window
holds the call. A call no target can serve is refused before any attempt (FAILED_PRECONDITION /
400 naming what is missing) and changes nothing shared.

In-process: the real Router, Invoker, Streamer, resilience and both doors in front of OpenAI
emulators ("v": the vision model, "t": the text one), each call counted at the emulators.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchgear.adapters import builtin_adapters
from switchgear.dataplane import http as front_door
from switchgear.dataplane.attempts import Resilience
from switchgear.dataplane.convert import (
    MAX_REQUIRED_CAPABILITIES,
    NoTargetFits,
    RequestError,
    capabilities_header,
    category_routes,
    required_capabilities,
)
from switchgear.dataplane.gateway import GatewayServicer
from switchgear.dataplane.governance import Governance, TenantView
from switchgear.dataplane.invoke import Invoker
from switchgear.dataplane.outcome import refusal
from switchgear.dataplane.pipeline import Pipeline, check_fits
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer
from switchgear.dataplane.resilience.breaker import State
from switchgear.dataplane.router import Router
from switchgear.dataplane.scheduling.model import candidate_key
from switchgear.dataplane.snapshot import (
    AgentSettings,
    AgentSnapshot,
    EndpointView,
    Holder,
    RetrySettings,
    ServiceView,
)
from switchgear.dataplane.stream import Streamer
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.emulators.openai import InstanceSpec, start_instances
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from tests.test_invoke_door import _error

ADAPTERS = builtin_adapters()
KEY, PICKY_KEY = "sg-k1-caps-acme", "sg-k2-caps-picky"
CHAT = {"messages": [{"role": "user", "content": "describe it"}], "max_tokens": 8}
REQUIRE = "x-switchgear-require"


def governance() -> Governance:
    """acme requires nothing; picky's policy requires "vision" of every target it is served by."""
    return Governance(
        tenants=MappingProxyType({"acme": TenantView("acme"),
                                  "picky": TenantView("picky", required_capabilities=frozenset({"vision"}))}),
        keys=MappingProxyType({"k1": ("acme", hashlib.sha256(KEY.encode()).digest()),
                               "k2": ("picky", hashlib.sha256(PICKY_KEY.encode()).digest())}))


def service(name: str, url: str, capabilities: tuple[str, ...] = (), *, category: str = "llm",
            endpoints: tuple[EndpointView, ...] = (), context_window: int = 0) -> ServiceView:
    return ServiceView(name=name, category=category, protocol="openai",
                       endpoints=endpoints or (EndpointView(id="e0", url=url),), model="gpt-4o-mini",
                       capabilities=capabilities, context_window=context_window,
                       options=ADAPTERS["openai"].parse_options({}))


def agent_snapshot(urls: Mapping[str, str]) -> AgentSnapshot:
    """"vision-svc" (instance v, capabilities vision + tools), "text-svc" (instance t, tools), and
    the agent's category route "llm" over both; "sized": one service whose two targets have their
    own context windows (e-small 100 tokens on t, e-large 10,000 on v); "embed" (multilingual);
    "chat": a route of one service whose target e-vision (on v) has its own capability vision."""
    members = {
        "vision-svc": service("vision-svc", urls["v"], ("tools", "vision")),
        "text-svc": service("text-svc", urls["t"], ("tools",)),
        "sized": service("sized", "", endpoints=(EndpointView(id="e-small", url=urls["t"], context_window=100),
                                                  EndpointView(id="e-large", url=urls["v"], context_window=10_000))),
        "embed": service("embed", urls["t"], ("multilingual",), category="embedding"),
        # one service whose targets have their own capabilities (a route of one config entry)
        "chat": service("chat", "", endpoints=(EndpointView(id="e-vision", url=urls["v"], capabilities=("vision",)),
                                               EndpointView(id="e-text", url=urls["t"]))),
    }
    routed = {k: v for k, v in members.items() if k in ("vision-svc", "text-svc")}
    services = {**members, **category_routes(routed)}  # ("sized", "chat" kept out of the route: their own tests)
    assert "llm" in services
    return AgentSnapshot("1.caps", MappingProxyType(services), AgentSettings(retry=RetrySettings(max_retries=2)),
                         governance())


@dataclass
class Served:
    url: str
    stub: gateway_pb2_grpc.GatewayServiceStub
    group: Any
    router: Router
    resilience: Resilience

    def calls(self, instance: str) -> int:
        return int(self.group.stats(instance)["total"])

    async def post(self, path: str, body: object, key: str | None = KEY, **headers: Any) -> httpx.Response:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.post(f"{self.url}{path}", content=orjson.dumps(body),
                                     headers={"Content-Type": "application/json", **headers})

    def shared_state(self) -> tuple[Any, ...]:
        """What a call's failures would change: breakers, resilience counters, live stats."""
        keys = [candidate_key(s, e) for s, e in (("llm", "vision-svc.e0"), ("llm", "text-svc.e0"),
                                                   ("vision-svc", "e0"), ("text-svc", "e0"))]
        breakers = [self.resilience.breakers.get(*k.split("/", 1)).state for k in keys]
        stats = [(s.in_flight, s.mean_latency.value, s.last_sample_at) for s in map(self.router.stats.get, keys)]
        return tuple(breakers), self.resilience.stats.as_dict(), tuple(stats)


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Served]:
    async with await start_instances([InstanceSpec("v"), InstanceSpec("t")]) as group:
        snap = agent_snapshot(group.urls)
        holder, pool = Holder(), ClientPool()
        holder.current = snap
        router = Router(holder=holder)
        resilience = Resilience(stats=router.stats)
        resilience.apply(snap)
        router.scheduler = type(router.scheduler)(router.stats, router.scheduler.rng, resilience.gate.unavailable)
        secrets = SecretResolver({})
        invoker = Invoker(ADAPTERS, pool, secrets, router, resilience=resilience)
        streamer = Streamer(ADAPTERS, pool, secrets, router.pick, resilience=resilience)
        pipeline = Pipeline(invoker.invoke, auth_required=True, quotas=QuotaEnforcer(LocalCounters()), cache=None)
        runner, address = await front_door.start(holder, invoker, streamer, "127.0.0.1:0", pipeline)
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(holder, invoker, streamer, pipeline),
                                                              server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Served(f"http://{address}", gateway_pb2_grpc.GatewayServiceStub(channel), group, router, resilience)
        finally:
            await channel.close()
            await server.stop(None)
            await runner.cleanup()
            await pool.close()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as running:
        yield running


def _grpc_request(service_name: str, *needs: str, payload: Mapping[str, Any] = CHAT) -> gateway_pb2.InvokeRequest:
    return gateway_pb2.InvokeRequest(service=service_name, method="chat.completions", payload=orjson.dumps(payload),
                                     required_capabilities=list(needs))


KEY_METADATA = (("authorization", f"Bearer {KEY}"),)


# --- every door routes a requirement to the targets offering it ----------------------------


async def test_grpc_requests_needing_vision_go_to_the_vision_target_under_load(served: Served) -> None:
    async def one() -> str:
        answer = await served.stub.Invoke(_grpc_request("llm", "vision"), metadata=KEY_METADATA)
        return str(answer.endpoint)

    endpoints = await asyncio.gather(*(one() for _ in range(40)))
    assert set(endpoints) == {"vision-svc.e0"}
    assert (served.calls("v"), served.calls("t")) == (40, 0)
    # Without the requirement the route spreads over both (what makes the filter's effect visible).
    plain = await asyncio.gather(*(served.stub.Invoke(_grpc_request("llm"), metadata=KEY_METADATA)
                                   for _ in range(40)))
    assert {a.endpoint for a in plain} == {"vision-svc.e0", "text-svc.e0"}


async def test_a_targets_own_capabilities_on_a_one_service_route(served: Served) -> None:
    answers = await asyncio.gather(*(served.post("/v1/chat/completions", {"model": "chat", **CHAT},
                                                 **{REQUIRE: "vision"}) for _ in range(30)))
    assert {a.headers["x-switchgear-target"] for a in answers} == {"e-vision"}
    assert (served.calls("v"), served.calls("t")) == (30, 0)
    spread = await asyncio.gather(*(served.post("/v1/chat/completions", {"model": "chat", **CHAT})
                                    for _ in range(30)))
    assert {a.headers["x-switchgear-target"] for a in spread} == {"e-vision", "e-text"}


async def test_embeddings_read_the_header(served: Served) -> None:
    body = {"model": "embed", "input": ["hello"]}
    assert (await served.post("/v1/embeddings", body, **{REQUIRE: "multilingual"})).status_code == 200
    refused = await served.post("/v1/embeddings", body, **{REQUIRE: "vision"})
    assert refused.status_code == 400 and _error(refused)["code"] == "capability_not_offered"
    assert served.calls("t") == 1 and served.calls("v") == 0


async def test_a_grpc_stream_honours_the_requirement(served: Served) -> None:
    for _ in range(6):
        call = _grpc_request("llm", "vision", payload={**CHAT, "stream": True})
        request = gateway_pb2.InvokeStreamRequest(request=call)
        ends = [m.end for m in [m async for m in served.stub.InvokeStream(request, metadata=KEY_METADATA)]
                if m.HasField("end")]
        assert [e.endpoint for e in ends] == ["vision-svc.e0"]
    assert served.calls("t") == 0


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "llm", **CHAT}),
    ("/v1/chat/completions", {"model": "llm", "stream": True, **CHAT}),
    ("/v1/messages", {"model": "llm", "max_tokens": 8, "messages": [{"role": "user", "content": "describe it"}]}),
    ("/v1/responses", {"model": "llm", "input": "describe it", "max_output_tokens": 16}),
    ("/v1/invoke", {"service": "llm", "method": "chat.completions", "payload": CHAT}),
])
async def test_every_http_route_reads_the_header(served: Served, path: str, body: dict[str, Any]) -> None:
    for _ in range(12):
        answer = await served.post(path, body, **{REQUIRE: "vision"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-switchgear-target"] == "vision-svc.e0"
    assert (served.calls("v"), served.calls("t")) == (12, 0)


async def test_the_invoke_routes_field_joins_the_header(served: Served) -> None:
    body = {"service": "llm", "method": "chat.completions", "payload": CHAT, "required_capabilities": ["tools"]}
    answer = await served.post("/v1/invoke", body, **{REQUIRE: "vision"})
    assert answer.status_code == 200 and answer.json()["endpoint"] == "vision-svc.e0"
    refused = await served.post("/v1/invoke", {**body, "required_capabilities": ["audio"]}, **{REQUIRE: "vision"})
    assert refused.status_code == 400 and _error(refused)["code"] == "capability_not_offered"
    assert "['audio']" in _error(refused)["message"]


async def test_the_tenants_required_capabilities_filter_per_target(served: Served) -> None:
    """Before, a tenant requiring "vision" was refused the whole route (its capabilities were the
    members' intersection); now it is served by the route's vision target, every time."""
    for _ in range(10):
        answer = await served.post("/v1/chat/completions", {"model": "llm", **CHAT}, key=PICKY_KEY)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-switchgear-target"] == "vision-svc.e0"
    assert served.calls("t") == 0
    # A plain service lacking it is still refused, naming the capability.
    refused = await served.post("/v1/chat/completions", {"model": "text-svc", **CHAT}, key=PICKY_KEY)
    assert refused.status_code == 403 and "vision" in _error(refused)["message"]
    # Its visible models: those with a vision target.
    async with httpx.AsyncClient() as client:
        listed = await client.get(f"{served.url}/v1/models", headers={"Authorization": f"Bearer {PICKY_KEY}"})
    assert {m["id"] for m in listed.json()["data"]} == {"llm", "vision-svc", "chat"}


async def test_models_show_capabilities_and_context_windows(served: Served) -> None:
    async with httpx.AsyncClient() as client:
        listed = await client.get(f"{served.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    models = {m["id"]: m for m in listed.json()["data"]}
    assert models["llm"]["switchgear_capabilities"] == ["tools", "vision"]
    assert {t["id"]: t["capabilities"] for t in models["llm"]["switchgear_targets"]} == {
        "vision-svc.e0": ["tools", "vision"], "text-svc.e0": ["tools"]}
    assert {t["id"]: t["context_window"] for t in models["sized"]["switchgear_targets"]} == {
        "e-small": 100, "e-large": 10_000}


# --- nothing fits: a distinct refusal that changes nothing shared -------------------------


async def test_nothing_offers_it_is_refused_naming_it_and_changes_nothing(served: Served) -> None:
    before = served.shared_state()
    for _ in range(30):  # a flood of them: no attempt, no breaker, no stats, no upstream call
        answer = await served.post("/v1/chat/completions", {"model": "llm", **CHAT}, **{REQUIRE: "vision, audio"})
        assert answer.status_code == 400
        error = _error(answer)
        assert (error["code"], error["param"]) == ("capability_not_offered", "required_capabilities")
        assert "['audio']" in error["message"] and answer.headers["x-switchgear-missing-capabilities"] == "audio"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Invoke(_grpc_request("llm", "audio"), metadata=KEY_METADATA)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "['audio']" in (info.value.details() or "")
    # Each offered, but no one target offers both: refused too, naming them.
    both = await served.post("/v1/chat/completions", {"model": "llm", **CHAT}, **{REQUIRE: "vision,video"})
    assert both.status_code == 400 and "video" in _error(both)["message"]
    assert served.shared_state() == before
    assert served.calls("v") + served.calls("t") == 0
    assert all(state is State.CLOSED for state in served.shared_state()[0])
    good = await served.post("/v1/chat/completions", {"model": "llm", **CHAT}, **{REQUIRE: "vision"})
    assert good.status_code == 200 and good.headers["x-switchgear-attempts"] == "1"


def test_check_fits_names_missing_or_together() -> None:
    snap = agent_snapshot({"v": "http://127.0.0.1:9/v1", "t": "http://127.0.0.1:9/v1"})
    route = snap.services["llm"]
    call = dataclasses.replace(_call("llm"), capabilities=frozenset({"vision", "tools"}))
    check_fits(call, route)  # the vision target has both
    with pytest.raises(NoTargetFits) as info:
        check_fits(dataclasses.replace(call, capabilities=frozenset({"audio", "vision"})), route)
    assert info.value.missing == ("audio",)
    odd = dict(snap.services)
    odd["text-svc"] = dataclasses.replace(odd["text-svc"], capabilities=("audio",))
    route2 = category_routes({k: v for k, v in odd.items() if k in ("vision-svc", "text-svc")})["llm"]
    with pytest.raises(NoTargetFits) as info:
        check_fits(dataclasses.replace(call, capabilities=frozenset({"audio", "vision"})), route2)
    assert info.value.missing == ("audio", "vision") and "no one target" in str(info.value)
    shown = refusal(info.value)
    assert (shown.grpc_status, shown.http_status, shown.code) == ("FAILED_PRECONDITION", 400,
                                                                   "capability_not_offered")


def _call(name: str, payload: Mapping[str, Any] = CHAT) -> Any:
    from switchgear.dataplane.convert import Call
    return Call(request_id="r", category="", service=name, method="chat.completions", payload=payload,
                priority=5, timeout_s=0.0, user_id="", session_id="")


# --- context windows --------------------------------------------------------------------


async def test_a_call_too_long_for_a_target_goes_to_one_whose_window_holds_it(served: Served) -> None:
    long = {"messages": [{"role": "user", "content": "x" * 2000}], "max_tokens": 8}  # ~500 tokens > 100
    for _ in range(10):
        answer = await served.stub.Invoke(_grpc_request("sized", payload=long), metadata=KEY_METADATA)
        assert answer.endpoint == "e-large"
    assert served.calls("t") == 0
    short = await asyncio.gather(*(served.stub.Invoke(_grpc_request("sized"), metadata=KEY_METADATA)
                                   for _ in range(30)))
    assert {a.endpoint for a in short} == {"e-small", "e-large"}


async def test_a_call_too_long_for_every_target_is_refused_before_any_attempt(served: Served) -> None:
    huge = {"model": "sized", "messages": [{"role": "user", "content": "x" * 50_000}], "max_tokens": 8}
    before = served.shared_state()
    answer = await served.post("/v1/chat/completions", huge)
    assert answer.status_code == 400
    assert _error(answer)["code"] == "context_length_exceeded" and "10000" in _error(answer)["message"]
    asked_too_much = {"model": "sized", **CHAT, "max_tokens": 20_000}  # the asked answer counts
    assert (await served.post("/v1/chat/completions", asked_too_much)).status_code == 400
    assert served.calls("v") + served.calls("t") == 0 and served.shared_state() == before


# --- malformed requirements: 400 / INVALID_ARGUMENT naming the header or field ------------


@pytest.mark.parametrize("header", [
    "Vision",                                   # upper case
    "vision,,tools",                            # an empty item
    "a" * 65,                                   # too long
    ",".join(f"c{i}" for i in range(MAX_REQUIRED_CAPABILITIES + 1)),  # too many
    "vi sion",                                  # a blank inside
    "vision;q=1",                               # not a name
    "ünïcode".encode(),                         # raw UTF-8 bytes in the header
])
async def test_a_malformed_header_is_refused_naming_it(served: Served, header: str | bytes) -> None:
    before = served.shared_state()
    extra: dict[str, Any] = {REQUIRE: header}
    answer = await served.post("/v1/chat/completions", {"model": "llm", **CHAT}, **extra)
    assert answer.status_code == 400, answer.text
    assert (_error(answer)["param"] or "").startswith(REQUIRE)
    messages = await served.post("/v1/messages", {"model": "llm", "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": "x"}]},
                                 **extra)
    assert messages.status_code == 400 and messages.json()["type"] == "error"  # Anthropic's shape
    assert served.calls("v") + served.calls("t") == 0 and served.shared_state() == before


async def test_header_abuse_anonymous_and_oversized(served: Served) -> None:
    anonymous = await served.post("/v1/chat/completions", {"model": "llm", **CHAT}, key=None, **{REQUIRE: "vision"})
    assert anonymous.status_code == 401
    # A header as large as the server takes: refused by count before it is split, or by aiohttp's bound.
    big = await served.post("/v1/chat/completions", {"model": "llm", **CHAT}, **{REQUIRE: "a," * 4000})
    assert big.status_code == 400
    assert served.calls("v") + served.calls("t") == 0


@pytest.mark.parametrize(("names", "path"), [
    (["vision", "Vision"], "required_capabilities[1]"),
    ([""], "required_capabilities[0]"),
    (["x" * 65], "required_capabilities[0]"),
    ([f"c{i}" for i in range(17)], "required_capabilities"),
])
async def test_a_malformed_grpc_field_is_invalid_argument_naming_it(served: Served, names: list[str],
                                                                    path: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Invoke(_grpc_request("llm", *names), metadata=KEY_METADATA)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(path + ":")
    assert served.calls("v") + served.calls("t") == 0


@pytest.mark.parametrize("value", ["vision", [1], [None], {"a": 1}, ["ok", "no pe"]])
async def test_a_malformed_invoke_field_is_refused_naming_it(served: Served, value: object) -> None:
    answer = await served.post("/v1/invoke", {"service": "llm", "method": "chat.completions", "payload": CHAT,
                                              "required_capabilities": value})
    assert answer.status_code == 400 and (_error(answer)["param"] or "").startswith("required_capabilities")


# --- the parser -------------------------------------------------------------------------

NAME = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789_.:-"), min_size=1, max_size=64)


@settings(max_examples=300, deadline=None)
@given(st.lists(NAME, min_size=1, max_size=MAX_REQUIRED_CAPABILITIES), st.sampled_from([",", ", ", " ,\t"]),
       st.integers(1, 3))
def test_header_round_trip(names: list[str], separator: str, lines: int) -> None:
    """Any list of valid names, however spaced and split over repeated header lines, parses to its set."""
    text = separator.join(names)
    parts = [text] if lines == 1 or len(names) < lines else [separator.join(names[i::lines]) for i in range(lines)]
    assert capabilities_header(parts, REQUIRE) == frozenset(names)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=3))
def test_any_header_is_a_set_of_valid_names_or_a_refusal_naming_it(values: list[str]) -> None:
    try:
        parsed = capabilities_header(values, REQUIRE)
    except RequestError as exc:
        assert exc.path.startswith(REQUIRE) and "\n" not in str(exc)
        return
    assert len(parsed) <= MAX_REQUIRED_CAPABILITIES
    assert all(required_capabilities([name], "x") == {name} for name in parsed)


# --- context windows come from the config -------------------------------------------------

CONFIG = """\
external_services:
  services:
    llm_services:
      chat:
        protocol: openai
        model: gpt-4o-mini
        context_window: 128000
        capabilities: [vision, tools]
        endpoints:
          - {id: big, url: "http://127.0.0.1:9/v1"}
          - {id: small, url: "http://127.0.0.1:9/v1", model: gpt-3.5-turbo, context_window: 4096,
             capabilities: [tools]}
"""


def test_context_window_is_read_per_service_and_target_and_reaches_the_candidates() -> None:
    from switchgear.cli_config import describe
    from switchgear.controlplane.config import load_config
    from switchgear.controlplane.convert import service_to_proto
    from switchgear.dataplane.convert import convert_snapshot
    from switchgear.dataplane.scheduling.model import candidates_of
    from switchgear.v1 import discovery_pb2

    state = load_config(CONFIG, env={})
    spec = state.service("chat")
    assert spec is not None and spec.context_window == 128000
    assert [e.context_window for e in spec.endpoints] == [0, 4096]
    shown = describe(state)
    assert "context_window=128000" in shown and "context_window=4096" in shown and "capabilities=vision,tools" in shown
    assert "capabilities=tools" in shown
    msg = discovery_pb2.Snapshot(services=[service_to_proto(spec)])
    view = convert_snapshot(msg, "1", ADAPTERS).snapshot.services["chat"]
    assert {c.endpoint: (c.context_window, c.capabilities) for c in candidates_of(view)} == {
        "big": (128000, frozenset({"vision", "tools"})), "small": (4096, frozenset({"tools"}))}
    assert view.offered == {"vision", "tools"}


@pytest.mark.parametrize(("where", "value"), [("service", "-1"), ("service", "1.5"), ("service", "99999999999"),
                                              ("endpoint", "-5"), ("endpoint", "big")])
def test_a_bad_context_window_is_refused_naming_the_key(where: str, value: str) -> None:
    from switchgear.controlplane.config import ConfigError, load_config

    text = CONFIG.replace("context_window: 128000", f"context_window: {value}") if where == "service" \
        else CONFIG.replace("context_window: 4096", f"context_window: {value}")
    with pytest.raises(ConfigError) as info:
        load_config(text, env={})
    paths = [p.path for p in info.value.problems]
    assert len(paths) == 1 and paths[0].endswith("context_window"), paths


async def test_a_cached_answer_answers_only_calls_requiring_what_its_key_required() -> None:
    """An answer a text target gave (no requirement) is not served to a call requiring vision."""
    from switchgear.adapters.base import TokenUsage
    from switchgear.dataplane.cache import MemoryCache
    from switchgear.dataplane.cache_shared import ResponseCache
    from switchgear.dataplane.invoke import Result

    snap = dataclasses.replace(agent_snapshot({"v": "http://127.0.0.1:9/v1", "t": "http://127.0.0.1:9/v1"}),
                               settings=AgentSettings(cache_enabled=True, cache_ttl_s=MappingProxyType(
                                   {"llm_responses": 60.0})))
    served_by: list[frozenset[str]] = []

    async def invoke(call: Any, snapshot: AgentSnapshot) -> Result:
        served_by.append(call.capabilities)
        return Result(body=b"{}", service="llm", endpoint="x", attempts=1, latency_s=0.0,
                      usage=TokenUsage(1, 1), cost_usd=0.0, version=snapshot.version)

    pipeline = Pipeline(invoke, auth_required=False, quotas=QuotaEnforcer(LocalCounters()),
                        cache=ResponseCache(MemoryCache(1 << 20)))
    plain = _call("llm")
    vision = dataclasses.replace(plain, capabilities=frozenset({"vision"}))
    assert not (await pipeline.invoke(plain, snap, None)).cached
    assert (await pipeline.invoke(plain, snap, None)).cached
    assert not (await pipeline.invoke(vision, snap, None)).cached  # its own key
    assert (await pipeline.invoke(vision, snap, None)).cached
    assert served_by == [frozenset(), frozenset({"vision"})]


def test_a_token_count_is_never_too_long_but_a_call_is() -> None:
    snap = agent_snapshot({"v": "http://127.0.0.1:9/v1", "t": "http://127.0.0.1:9/v1"})
    long = {"messages": [{"role": "user", "content": "x" * 50_000}]}
    check_fits(dataclasses.replace(_call("sized", long), method="count_tokens"), snap.services["sized"])
    with pytest.raises(NoTargetFits) as info:
        check_fits(_call("sized", long), snap.services["sized"])
    assert info.value.largest == 10_000 and info.value.tokens == 12_501  # ("user" counts too)


# --- what the payload shows it needs ----------------------------------------------------

IMAGE_CHAT = {"messages": [{"role": "user", "content": [
    {"type": "text", "text": "what is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}], "max_tokens": 8}


@pytest.mark.parametrize(("payload", "names", "found"), [
    (IMAGE_CHAT, {"vision", "tools"}, {"vision"}),
    (IMAGE_CHAT, {"tools"}, set()),  # only names the service's targets offer are looked for
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, {"vision"}, {"vision"}),
    ({**CHAT, "tools": [{"type": "function"}]}, {"tools", "vision"}, {"tools"}),
    ({**CHAT, "tools": []}, {"tools"}, set()),
    ({**CHAT, "functions": [{"name": "f"}]}, {"tools"}, {"tools"}),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {}}}, {"json_schema"}, {"json_schema"}),
    ({**CHAT, "response_format": {"type": "json_object"}}, {"json_schema"}, set()),
    ({"messages": "not a list", "response_format": "odd"}, {"vision", "json_schema"}, set()),
    ({"messages": [None, 3, {"content": [None, "x", {"type": 5}]}]}, {"vision"}, set()),
])
def test_inferred(payload: dict[str, Any], names: set[str], found: set[str]) -> None:
    from switchgear.dataplane.scheduling.model import inferred

    assert inferred(payload, frozenset(names)) == found


async def test_an_image_goes_to_a_vision_target_without_being_asked(served: Served) -> None:
    """The route's targets offer "vision" (one of them), so an image part requires it; a service
    none of whose targets offers it is not looked into (the text service still takes the image)."""
    answers = await asyncio.gather(*(served.post("/v1/chat/completions", {"model": "llm", **IMAGE_CHAT})
                                     for _ in range(20)))
    assert {a.headers["x-switchgear-target"] for a in answers} == {"vision-svc.e0"}
    assert served.calls("t") == 0
    plain = await served.post("/v1/chat/completions", {"model": "text-svc", **IMAGE_CHAT})
    assert plain.status_code == 200 and served.calls("t") == 1
    tools = await asyncio.gather(*(served.post("/v1/chat/completions",
                                               {"model": "llm", **CHAT, "tools": [{"type": "function", "function": {
                                                   "name": "f", "parameters": {"type": "object"}}}]})
                                   for _ in range(30)))  # both targets offer tools: both serve
    assert {a.headers["x-switchgear-target"] for a in tools} == {"vision-svc.e0", "text-svc.e0"}
