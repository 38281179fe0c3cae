"""Routes (issue 15): a route's targets each call with their own protocol, key, model and prices,
from the config through the control plane's snapshot to the agent's attempt and its answer."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from switchgear.adapters import builtin_adapters
from switchgear.adapters.base import ErrorKind, UpstreamError
from switchgear.controlplane import convert
from switchgear.controlplane.config import ConfigError, load_config, load_config_file
from switchgear.controlplane.model import RegistryState
from switchgear.controlplane.snapshot import Snapshot
from switchgear.dataplane import http as front_door
from switchgear.dataplane.convert import Call, RequestError, convert_snapshot, snapshot_from_proto
from switchgear.dataplane.invoke import CallFailed, Invoker
from switchgear.dataplane.snapshot import AgentSnapshot, EndpointView, Holder, SecretRef, ServiceView
from switchgear.dataplane.stream import Streamer
from switchgear.dataplane.target_limits import TargetLimits
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.emulators import anthropic as anthropic_emu
from switchgear.emulators.common import Running
from switchgear.emulators.openai import EmulatorGroup, Faults, InstanceSpec, start_instances
from switchgear.v1 import common_pb2, discovery_pb2
from switchgear.wire import checks

ADAPTERS = builtin_adapters()
SEED = Path(__file__).resolve().parent.parent / "config" / "external_services_unified.yaml"
SEED_ENV = {"OPENAI_API_KEY": "x", "ANTHROPIC_API_KEY": "y", "PINECONE_API_KEY": "z"}
KEY_A, KEY_C = "route-key-openai-5d1e", "route-key-anthropic-93b0"
MESSAGES = [{"role": "user", "content": "hello route"}]


def route_yaml(openai_url: str, claude_url: str, extra: str = "") -> str:
    return f"""
external_services:
  communication:
    retry_policy: {{max_retries: 2}}
  services:
    llm_services:
      chat:
        protocol: openai
        model: gpt-4o-mini
        timeout: 20
        endpoints:
          - id: oa
            url: {openai_url}
            api_key: ${{ROUTE_KEY_A}}
            provider: openai
            input_cost_per_1k_tokens: 1.0
            output_cost_per_1k_tokens: 2.0
            rpm_limit: 600
            tags: {{region: us, tier: paid}}
          - id: claude
            url: {claude_url}
            protocol: anthropic
            model: claude-3-sonnet
            api_key: ${{ROUTE_KEY_C}}
            provider: anthropic
            cost_per_request: 0.5
            options: {{max_response_bytes: 1Mi}}
{extra}"""


def wire(state: RegistryState) -> discovery_pb2.Snapshot:
    """The snapshot agents get of `state`."""
    return convert.snapshot_to_proto(Snapshot("1.t", 1, "t", state))


def agent_view(state: RegistryState) -> AgentSnapshot:
    return snapshot_from_proto(wire(state), "1.t", ADAPTERS)


# --- config and control plane ---------------------------------------------------------------


def test_targets_carry_their_own_fields_and_only_key_references_travel() -> None:
    state = load_config(route_yaml("http://127.0.0.1:1/v1", "http://127.0.0.1:2"), env={})
    msg = wire(state)
    (chat,) = [s for s in msg.services if s.name == "chat"]
    oa, claude = chat.endpoints
    assert (oa.protocol, oa.api_key.env, oa.provider, oa.rpm_limit) == ("", "ROUTE_KEY_A", "openai", 600)
    assert (oa.pricing.input_cost_per_1k_tokens, oa.pricing.output_cost_per_1k_tokens) == (1.0, 2.0)
    assert dict(oa.tags) == {"region": "us", "tier": "paid"}
    assert (claude.protocol, claude.model, claude.api_key.env) == ("anthropic", "claude-3-sonnet", "ROUTE_KEY_C")
    assert claude.pricing.cost_per_request == 0.5
    assert orjson.loads(claude.options_json) == {"max_response_bytes": 1 << 20}
    # the round trip through the Admin API's form keeps every target field
    assert convert.service_from_proto(chat) == state.service("chat")
    # a key value set in the control plane's environment never reaches the snapshot
    state = load_config(route_yaml("http://127.0.0.1:1/v1", "http://127.0.0.1:2"), env={"ROUTE_KEY_A": KEY_A})
    assert KEY_A.encode() not in wire(state).SerializeToString()


@pytest.mark.parametrize(("target", "path", "message"), [
    ("protocol: carrier-pigeon", "endpoints[1].protocol", "unknown protocol"),
    ("cost_per_request: -1", "endpoints[1].cost_per_request", "must be a finite number >= 0"),
    ("api_key: sk-literal-0000", "endpoints[1].api_key", "literal secrets are not allowed"),
    ("rpm_limit: -5", "endpoints[1].rpm_limit", "must be an integer from 0"),
    ("options: {max_response_bytes: 0}", "endpoints[1].options.max_response_bytes", "must be a size from 1 byte"),
    ("options: {chat_path: 7}", "endpoints[1]", "chat_path"),
])
def test_a_bad_target_value_is_refused_naming_its_path(target: str, path: str, message: str) -> None:
    text = f"""
external_services:
  services:
    llm_services:
      chat:
        protocol: openai
        endpoints:
          - http://127.0.0.1:1/v1
          - {{url: "http://127.0.0.1:2", {target}}}
"""
    from switchgear.controlplane.agent_check import agent_problems
    with pytest.raises(ConfigError) as info:
        load_config(text, env={}, check=agent_problems)
    shown = str(info.value)
    assert path in shown and message in shown, shown
    assert "sk-literal-0000" not in shown


def test_the_seeds_config_gives_an_llm_route_over_its_llm_services() -> None:
    state = load_config_file(SEED, env=SEED_ENV)
    assert not [s for s in wire(state).services if s.name == "llm"]  # derived by agents, not sent
    llm = agent_view(state).services["llm"]
    by_source = {e.source_service: e for e in llm.endpoints}
    assert set(by_source) == {s.name for s in state.services if s.category.value == "llm"}
    assert {"gpt-4", "gpt-3.5-turbo", "claude-3-sonnet"} <= set(by_source)
    for name, endpoint in by_source.items():
        spec = state.service(name)
        assert spec is not None
        target = llm.target(endpoint)
        assert endpoint.id == f"{name}.{spec.endpoints[0].id}" and endpoint.priority == spec.priority
        assert (target.protocol, target.model) == (spec.protocol, spec.model)
        assert target == agent_view(state).services[name].targets[spec.endpoints[0].id]  # the service's own
        assert target.pricing.cost_per_1k_tokens == spec.pricing.cost_per_1k_tokens
        assert target.api_key == (None if spec.api_key is None else SecretRef(env=spec.api_key.env))
    assert llm.target(by_source["claude-3-sonnet"]).api_key == SecretRef(env="ANTHROPIC_API_KEY")
    assert llm.target(by_source["llama2-7b"]).api_key is None  # a keyless local model stays keyless
    cheapest = min(llm.endpoints, key=lambda e: llm.target(e).pricing.cost_per_1k_tokens)
    assert llm.target(cheapest).model == "llama2-7b"
    assert "document" not in agent_view(state).services  # documents are not interchangeable


def test_a_service_named_like_a_category_route_is_refused() -> None:
    text = SEED.read_text(encoding="utf-8").replace('- name: "gpt-3.5-turbo"', '- name: "llm"')
    with pytest.raises(ConfigError) as info:
        load_config(text, env=SEED_ENV)
    assert "clashes with the category route 'llm'" in str(info.value)


# --- the agent's checks -----------------------------------------------------------------------


def test_agent_checks_name_the_target_field() -> None:
    state = load_config(route_yaml("http://127.0.0.1:1/v1", "http://127.0.0.1:2"), env={})
    msg = wire(state)
    msg.services[0].endpoints[1].options_json = '{"max_response_bytes": "big"}'
    with pytest.raises(checks.SnapshotError) as info:
        snapshot_from_proto(msg, "1.t", ADAPTERS)
    assert info.value.path == "services[chat].endpoints[1].options_json.max_response_bytes"
    msg = wire(state)
    msg.services[0].endpoints[0].api_key.env = ""
    with pytest.raises(checks.SnapshotError) as info:
        snapshot_from_proto(msg, "1.t", ADAPTERS)
    assert info.value.path == "services[chat].endpoints[0].api_key"
    msg = wire(state)
    msg.services[0].endpoints[0].pricing.cost_per_request = float("nan")
    with pytest.raises(checks.SnapshotError) as info:
        snapshot_from_proto(msg, "1.t", ADAPTERS)
    assert info.value.path == "services[chat].endpoints[0].pricing"


def test_a_target_of_a_protocol_this_agent_lacks_is_left_out() -> None:
    state = load_config(route_yaml("http://127.0.0.1:1/v1", "http://127.0.0.1:2"), env={})
    msg = wire(state)
    msg.services[0].endpoints[1].protocol = "carrier-pigeon"
    view = snapshot_from_proto(msg, "1.t", ADAPTERS).services["chat"]
    assert [e.id for e in view.endpoints] == ["oa"] and not view.unsupported
    msg.services[0].endpoints[0].protocol = "carrier-pigeon"
    view = snapshot_from_proto(msg, "1.t", ADAPTERS).services["chat"]
    assert view.unsupported and not view.endpoints


def test_effective_targets_are_built_once_per_snapshot() -> None:
    state = load_config(route_yaml("http://127.0.0.1:1/v1", "http://127.0.0.1:2"), env={})
    view = agent_view(state).services["chat"]
    oa, claude = view.endpoints
    assert view.target(oa) is view.target(oa)  # looked up, not built per call
    assert (view.target(oa).protocol, view.target(oa).model) == ("openai", "gpt-4o-mini")  # as the service
    assert (view.target(claude).protocol, view.target(claude).model) == ("anthropic", "claude-3-sonnet")
    assert view.target(claude).limits.max_response_bytes == 1 << 20
    assert view.target(oa).limits.max_response_bytes != 1 << 20


# --- calls through one route to two providers --------------------------------------------------


class ById:
    """Picks the endpoint named in `order` (the next one not excluded)."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def pick(self, service: ServiceView, exclude: Collection[str] = (), **_: Any) -> EndpointView | None:
        return next((e for i in self.order for e in service.endpoints if e.id == i and i not in exclude), None)


@pytest.fixture
async def providers() -> AsyncIterator[tuple[EmulatorGroup, Running]]:
    async with (
        await start_instances([InstanceSpec("a", api_key=KEY_A)]) as group,
        await anthropic_emu.start(api_key=KEY_C) as claude,
    ):
        yield group, claude


def make_invoker(snap: AgentSnapshot, env: dict[str, str]) -> tuple[Invoker, Streamer, ById, ClientPool, Holder]:
    pool, picker, holder = ClientPool(), ById(), Holder()
    holder.current = snap
    secrets = SecretResolver(env)
    return (Invoker(ADAPTERS, pool, secrets, picker), Streamer(ADAPTERS, pool, secrets, picker.pick), picker, pool,
            holder)


def chat_call(**kw: Any) -> Call:
    return Call(request_id="r1", category="", service="chat", method="chat.completions",
                payload={"model": "chat", "messages": MESSAGES}, priority=5, timeout_s=kw.pop("timeout_s", 0.0),
                user_id="", session_id="", **kw)


async def test_each_target_gets_its_own_key_model_and_prices(providers: tuple[EmulatorGroup, Running]) -> None:
    group, claude = providers
    snap = agent_view(load_config(route_yaml(group.urls["a"], claude.url), env={}))
    invoker, streamer, picker, pool, holder = make_invoker(snap, {"ROUTE_KEY_A": KEY_A, "ROUTE_KEY_C": KEY_C})
    try:
        picker.order = ["oa"]
        first = await invoker.invoke(chat_call(), snap)
        picker.order = ["claude"]
        second = await invoker.invoke(chat_call(), snap)  # an OpenAI-shaped call served by the Anthropic adapter
        assert orjson.loads(second.body)["object"] == "chat.completion"
        assert first.target is not None and second.target is not None
        assert (first.endpoint, first.target.provider, first.target.model) == ("oa", "openai", "gpt-4o-mini")
        assert (second.endpoint, second.target.provider, second.target.protocol) == ("claude", "anthropic", "anthropic")
        u = first.usage
        assert u.input_tokens > 0
        assert first.cost_usd == pytest.approx((u.input_tokens * 1.0 + u.output_tokens * 2.0) / 1000)
        assert second.cost_usd == pytest.approx(0.5)
        # a stream's end names its target and charges its prices too
        picker.order = ["claude"]
        items = [item async for item in streamer.stream(chat_call(), snap)]
        end = items[-1]
        assert end.target is not None and end.target.provider == "anthropic"  # type: ignore[union-attr]
        assert end.cost_usd == pytest.approx(0.5)  # type: ignore[union-attr]
        # the HTTP door says which target served, and /v1/models lists the route's providers
        runner, address = await front_door.start(holder, invoker, streamer, "127.0.0.1:0")
        try:
            async with httpx.AsyncClient(base_url=f"http://{address}") as http:
                picker.order = ["claude"]
                answer = await http.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES})
                assert answer.status_code == 200
                assert answer.headers["x-switchgear-target"] == "claude"
                assert answer.headers["x-switchgear-provider"] == "anthropic"
                assert answer.headers["x-switchgear-target-model"] == "claude-3-sonnet"
                picker.order = ["claude"]
                streamed = await http.post("/v1/chat/completions",
                                           json={"model": "chat", "messages": MESSAGES, "stream": True})
                assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
                assert (streamed.headers["x-switchgear-target"], streamed.headers["x-switchgear-provider"]) == (
                    "claude", "anthropic")
                models = (await http.get("/v1/models")).json()["data"]
                assert {m["id"]: m["switchgear_providers"] for m in models} == {"chat": ["anthropic", "openai"]}
                for bad in ("-1", "two", "1" * 5000, "3", "1.5"):
                    refused = await http.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES},
                                              headers={"x-switchgear-max-retries": bad})
                    assert refused.status_code == 400, bad
                    assert "max_retries" in refused.text or "max-retries" in refused.text
                refused = await http.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES},
                                          headers={"x-switchgear-timeout": "25"})
                assert refused.status_code == 400 and "route's timeout (20 s)" in refused.text
                ok = await http.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES},
                                     headers={"x-switchgear-max-retries": "0", "x-switchgear-timeout": "5"})
                assert ok.status_code == 200
        finally:
            await runner.cleanup()
    finally:
        await pool.close()


async def test_a_key_unset_on_the_agent_fails_cleanly_and_names_only_the_reference(
    providers: tuple[EmulatorGroup, Running],
) -> None:
    group, claude = providers
    snap = agent_view(load_config(route_yaml(group.urls["a"], claude.url), env={}))
    invoker, _, picker, pool, _ = make_invoker(snap, {"ROUTE_KEY_A": KEY_A})  # no ROUTE_KEY_C here
    try:
        picker.order = ["claude"]
        with pytest.raises(CallFailed) as info:
            await invoker.invoke(chat_call(), snap)
        assert "env:ROUTE_KEY_C is not set on this agent" in str(info.value.error)
        assert KEY_A not in repr(info.value.error) and KEY_C not in repr(info.value.error)
        picker.order = ["oa"]
        assert (await invoker.invoke(chat_call(), snap)).endpoint == "oa"  # the other target still serves
    finally:
        await pool.close()


async def test_per_request_overrides_are_bounded_by_the_route(providers: tuple[EmulatorGroup, Running]) -> None:
    group, claude = providers
    snap = agent_view(load_config(route_yaml(group.urls["a"], claude.url), env={}))
    invoker, _, picker, pool, _ = make_invoker(snap, {"ROUTE_KEY_A": KEY_A, "ROUTE_KEY_C": KEY_C})
    try:
        with pytest.raises(RequestError) as info:
            await invoker.invoke(chat_call(max_retries=3), snap)  # the policy allows 2
        assert info.value.path == "max_retries"
        with pytest.raises(RequestError) as info:
            await invoker.invoke(chat_call(timeout_s=21.0), snap)  # the route's timeout is 20 s
        assert info.value.path == "timeout"
        # max_retries 0: one attempt, no failover to the second target (which would have answered)
        picker.order = ["oa", "claude"]
        group.set_faults("a", Faults(fail_next=1, error_status=503))
        failed = await invoker.invoke(chat_call(max_retries=0), snap)
        # one attempt, then the seed's LLM preset answered (config-wide fallback), not claude
        assert (failed.attempts, failed.fallback_source, failed.endpoint) == (1, "preset_response", "")
        group.set_faults("a", Faults(fail_next=1, error_status=503))
        served = await invoker.invoke(chat_call(max_retries=1), snap)
        assert (served.endpoint, served.attempts) == ("claude", 2)
    finally:
        await pool.close()


async def test_a_targets_rpm_limit_moves_calls_to_the_next_target(providers: tuple[EmulatorGroup, Running]) -> None:
    group, claude = providers
    text = route_yaml(group.urls["a"], claude.url).replace("rpm_limit: 600", "rpm_limit: 2")
    snap = agent_view(load_config(text, env={}))
    invoker, _, picker, pool, _ = make_invoker(snap, {"ROUTE_KEY_A": KEY_A, "ROUTE_KEY_C": KEY_C})
    try:
        picker.order = ["oa", "claude"]
        served = [(await invoker.invoke(chat_call(), snap)).endpoint for _ in range(3)]
        assert served == ["oa", "oa", "claude"]
        assert group.stats("a")["by_path"]["/v1/chat/completions"] == 2  # the third never reached it
    finally:
        await pool.close()


def test_tpm_limit_counts_answer_tokens_in_one_minute_windows() -> None:
    now = [1000.0]
    limits = TargetLimits(clock=lambda: now[0])
    target = dataclasses.replace(agent_view(load_config(
        route_yaml("http://127.0.0.1:1/v1", "http://127.0.0.1:2"), env={})).services["chat"].targets["oa"],
        rpm_limit=0, tpm_limit=100)
    limits.admit("chat", "oa", target)
    limits.used("chat", "oa", 120)  # the call that crosses the limit was served ...
    with pytest.raises(UpstreamError) as info:
        limits.admit("chat", "oa", target)  # ... the next one waits for the window's end
    assert info.value.kind is ErrorKind.RATE_LIMITED and info.value.retry_after_s == pytest.approx(60.0)
    assert "tpm_limit of 100" in info.value.message
    now[0] += 60.0
    limits.admit("chat", "oa", target)


def test_a_category_route_target_is_served_as_its_service_endpoint_is() -> None:
    msg = wire(load_config_file(SEED, env=SEED_ENV))
    gpt4 = next(s for s in msg.services if s.name == "gpt-4")
    gpt4.endpoints[0].health = common_pb2.HEALTH_STATE_EJECTED  # as the control plane's overlay serves it
    llm = snapshot_from_proto(msg, "1.t", ADAPTERS).services["llm"]
    health = {e.id: e.health for e in llm.endpoints}
    assert (health["gpt-4.default"], health["claude-3-sonnet.default"]) == ("ejected", "healthy")
    # a service this agent rejects is left out of the route, and nothing else
    gpt4.options_json = '{"chat_pth": "/x"}'
    converted = convert_snapshot(msg, "1.t", ADAPTERS)
    assert [r.service for r in converted.rejections] == ["gpt-4"]
    assert "gpt-4.default" not in {e.id for e in converted.snapshot.services["llm"].endpoints}
    assert "claude-3-sonnet.default" in {e.id for e in converted.snapshot.services["llm"].endpoints}


async def test_a_targets_max_tokens_caps_what_a_call_asks_of_it(providers: tuple[EmulatorGroup, Running]) -> None:
    group, claude = providers
    text = route_yaml(group.urls["a"], claude.url).replace("rpm_limit: 600",
                                                           "rpm_limit: 600\n            max_tokens: 3")
    snap = agent_view(load_config(text, env={}))
    invoker, _, picker, pool, _ = make_invoker(snap, {"ROUTE_KEY_A": KEY_A, "ROUTE_KEY_C": KEY_C})
    try:
        asks = {"model": "chat", "messages": MESSAGES, "max_tokens": 50}
        picker.order = ["oa"]
        capped = await invoker.invoke(dataclasses.replace(chat_call(), payload=asks), snap)
        assert capped.usage.output_tokens == 3
        assert orjson.loads(capped.body)["choices"][0]["finish_reason"] == "length"
        picker.order = ["claude"]  # no max_tokens of its own: the call's ask stands
        assert (await invoker.invoke(dataclasses.replace(chat_call(), payload=asks), snap)).usage.output_tokens > 3
    finally:
        await pool.close()
