"""Fallbacks as the seed writes them: when every service of a call failed, an llm call gets the
seed's preset answer (or the config's `communication.fallback.preset_responses.<category>`),
shaped as its method answers — unary and streamed, through the gRPC Gateway and the HTTP door;
and a chain that ends in the task queue answers a stream too."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import grpc
import httpx
import openai
import orjson
import pytest

from switchgear.cli_config import describe
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.convert import settings_to_proto
from switchgear.controlplane.model import SEED_LLM_PRESET
from switchgear.dataplane import http as front_door
from switchgear.dataplane.attempts import Resilience, ResilienceSettings
from switchgear.dataplane.convert import Call, settings_from_proto
from switchgear.dataplane.resilience.fallback import FallbackSettings
from switchgear.dataplane.snapshot import (
    AgentSettings,
    AgentSnapshot,
    Pricing,
    RetrySettings,
    SecretRef,
    ServiceView,
)
from switchgear.dataplane.stream import StreamEnd, Streamer
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.v1 import gateway_pb2
from tests import test_stream
from tests.test_stream import ADAPTERS, CHAT, Agent, FirstUntried, collect, make_agent, stream_request, view

stub_for = test_stream.stub_for  # the in-process Gateway fixture

DEAD = "http://127.0.0.1:9/v1"  # connection refused: every attempt fails at once


def dead_chat(name: str = "chat") -> ServiceView:
    # priced: a free loopback llm would count as a local model (a fallback of its own)
    return view(name, "openai", [DEAD], model="gpt-4o-mini", pricing=Pricing(cost_per_1k_tokens=1.0))


def snapshot_with(presets: dict[str, str], *services: ServiceView) -> AgentSnapshot:
    settings = AgentSettings(retry=RetrySettings(max_retries=0), preset_responses=MappingProxyType(presets))
    return AgentSnapshot("1.presets", MappingProxyType({s.name: s for s in services}), settings)


def text_of(completion: bytes) -> str:
    content: str = orjson.loads(completion)["choices"][0]["message"]["content"]
    return content


# --- the config ---------------------------------------------------------------------------------


def load(communication: str) -> Any:
    text = "external_services:\n  communication:\n" + textwrap.indent(textwrap.dedent(communication), "    ")
    return load_config(text, env={})


def test_the_seeds_llm_preset_is_the_default_and_reaches_agents() -> None:
    state = load("default_timeout: 30\n")
    assert dict(state.settings.fallback.preset_responses) == {"llm": SEED_LLM_PRESET}
    agent = settings_from_proto(settings_to_proto(state.settings))
    assert dict(agent.preset_responses) == {"llm": SEED_LLM_PRESET}
    assert f'preset llm: "{SEED_LLM_PRESET}"' in describe(state)


def test_preset_responses_merge_over_the_default_and_empty_turns_one_off() -> None:
    state = load("""\
        fallback:
          preset_responses:
            vector_db: '{"results": []}'
            llm: ""
        """)
    agent = settings_from_proto(settings_to_proto(state.settings))
    assert dict(agent.preset_responses) == {"vector_db": '{"results": []}'}
    text = describe(state)
    assert "preset llm: none" in text and 'preset vector_db: "{\\"results\\": []}"' in text


@pytest.mark.parametrize(
    ("yaml", "path", "fragment"),
    [
        ("fallback:\n  preset_responses:\n    chat: hi\n", "communication.fallback.preset_responses.chat",
         "unknown key 'chat'"),
        ("fallback:\n  presets: {}\n", "communication.fallback.presets", "did you mean 'preset_responses'"),
        ("fallback:\n  preset_responses:\n    llm: [1, 2]\n", "communication.fallback.preset_responses.llm",
         "expected a string"),
        ("fallback:\n  preset_responses:\n    llm: '" + "x" * 20_000 + "'\n",
         "communication.fallback.preset_responses.llm", "at most 16384 characters"),
    ],
)
def test_bad_preset_config_names_the_key(yaml: str, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(yaml)
    assert any(p.path == f"external_services.{path}" and fragment in p.message for p in caught.value.problems), (
        caught.value)


# --- the gRPC Gateway ---------------------------------------------------------------------------


async def test_grpc_unary_llm_call_gets_the_seeds_preset_as_a_chat_completion(stub_for: Any) -> None:
    agent = make_agent(snapshot_with({"llm": SEED_LLM_PRESET}, dead_chat()))
    reply = await (await stub_for(agent)).Invoke(gateway_pb2.InvokeRequest(
        request_id="r1", service="chat", method="chat.completions", payload=orjson.dumps(CHAT)))
    assert reply.fallback and reply.fallback_source == "preset_response"
    assert text_of(reply.payload) == SEED_LLM_PRESET
    assert orjson.loads(reply.payload)["choices"][0]["finish_reason"] == "stop"
    await agent.pool.close()


async def test_grpc_stream_gets_the_preset_as_one_chunk_and_an_end_marked_fallback(stub_for: Any) -> None:
    agent = make_agent(snapshot_with({"llm": "Busy: try later."}, dead_chat()))
    chunks, end = await collect((await stub_for(agent)).InvokeStream(stream_request("chat", CHAT)))
    assert [orjson.loads(c)["choices"][0]["delta"]["content"] for c in chunks] == ["Busy: try later."]
    assert end is not None and end.fallback and end.fallback_source == "preset_response"
    assert end.error_kind == "" and end.usage.cost_usd == 0.0
    await agent.pool.close()


async def test_without_a_preset_the_call_still_fails_unavailable(stub_for: Any) -> None:
    agent = make_agent(snapshot_with({}, dead_chat()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect((await stub_for(agent)).InvokeStream(stream_request("chat", CHAT)))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await agent.pool.close()


async def test_the_category_preset_does_not_hide_a_missing_secret(stub_for: Any) -> None:
    """A missing key is this deployment's fault: the caller (and the operator) must see it."""
    keyed = ServiceView(**{**dead_chat().__dict__, "api_key": SecretRef(env="SWITCHGEAR_TEST_UNSET_KEY")})
    agent = make_agent(snapshot_with({"llm": SEED_LLM_PRESET}, keyed))
    stub = await stub_for(agent)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Invoke(gateway_pb2.InvokeRequest(
            request_id="r1", service="chat", method="chat.completions", payload=orjson.dumps(CHAT)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SWITCHGEAR_TEST_UNSET_KEY" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await collect(stub.InvokeStream(stream_request("chat", CHAT)))
    assert streamed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await agent.pool.close()


async def test_a_services_metadata_preset_is_the_exact_body_and_wins(stub_for: Any) -> None:
    svc = ServiceView(**{**dead_chat().__dict__, "metadata": MappingProxyType({"preset_response": '{"own": 1}'})})
    agent = make_agent(snapshot_with({"llm": SEED_LLM_PRESET}, svc))
    reply = await (await stub_for(agent)).Invoke(gateway_pb2.InvokeRequest(
        request_id="r1", service="chat", method="chat.completions", payload=orjson.dumps(CHAT)))
    assert reply.payload == b'{"own": 1}' and reply.fallback_source == "preset_response"
    await agent.pool.close()


# --- the HTTP door ------------------------------------------------------------------------------


@pytest.fixture
async def door() -> AsyncIterator[tuple[str, Agent]]:
    agent = make_agent(snapshot_with({"llm": SEED_LLM_PRESET}, dead_chat("gpt-dead")))
    runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0")
    yield f"http://{address}/v1", agent  # pytest resumes the fixture after a failed test too
    await runner.cleanup()
    await agent.pool.close()


async def test_http_unary_gets_the_preset_with_the_fallback_header(door: tuple[str, Agent]) -> None:
    sdk = openai.AsyncOpenAI(base_url=door[0], api_key="unused", max_retries=0)
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-dead", messages=CHAT["messages"])
    assert raw.headers["x-switchgear-fallback"] == "preset_response"
    assert raw.parse().choices[0].message.content == SEED_LLM_PRESET


async def test_http_stream_gets_the_preset_as_sse_with_the_fallback_header(door: tuple[str, Agent]) -> None:
    body = {"model": "gpt-dead", "messages": CHAT["messages"], "stream": True}
    async with httpx.AsyncClient() as client, client.stream("POST", f"{door[0]}/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["x-switchgear-fallback"] == "preset_response"
        events = [line.removeprefix("data: ") async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert [orjson.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == [SEED_LLM_PRESET]
    sdk = openai.AsyncOpenAI(base_url=door[0], api_key="unused", max_retries=0)
    stream = await sdk.chat.completions.create(model="gpt-dead", messages=CHAT["messages"], stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == SEED_LLM_PRESET


# --- the task queue, for a stream -----------------------------------------------------------------


class Queued:
    def __init__(self, call: Call) -> None:
        self.call = call

    def fallback_body(self) -> dict[str, Any]:
        return {"processed": False, "fallback": True, "task_id": "t-1", "queue_id": f"queue_{self.call.request_id}"}


async def test_a_stream_whose_chain_ends_in_the_task_queue_answers_with_the_task() -> None:
    deferred: list[tuple[Call, str]] = []

    async def defer(call: Call, why: str) -> Queued:
        deferred.append((call, why))
        return Queued(call)

    queue_llm = ResilienceSettings(fallback=FallbackSettings(queue_for_later=frozenset({"llm"})))
    pool = ClientPool()
    streamer = Streamer(ADAPTERS, pool, SecretResolver({}), FirstUntried().pick, resilience=Resilience(queue_llm),
                        defer=defer)
    snap = snapshot_with({}, dead_chat())
    call = Call(request_id="s1", category="", service="chat", method="chat.completions", payload=CHAT,
                priority=5, timeout_s=5.0, user_id="", session_id="")
    items = [item async for item in streamer.stream(call, snap)]
    await pool.close()
    assert len(items) == 2 and isinstance(items[1], StreamEnd)
    assert orjson.loads(bytes(items[0]))["task_id"] == "t-1"  # type: ignore[arg-type]
    assert items[1].fallback and items[1].fallback_source == "task_queue"
    assert len(deferred) == 1 and deferred[0][1].startswith("connect")
