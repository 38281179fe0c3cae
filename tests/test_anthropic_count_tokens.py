"""What Claude Code asks of a gateway beyond /v1/messages: `POST /v1/messages/count_tokens` and the
caller's `anthropic-beta` header forwarded. Driven by the official `anthropic` SDK against the door
serving live emulators (an Anthropic-protocol model, an OpenAI-protocol one)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from switchgear.adapters.anthropic import AnthropicAdapter, parse_options
from switchgear.adapters.base import AdapterRequest, ErrorKind, Target, UpstreamError
from switchgear.controlplane.model import SEED_LLM_PRESET
from switchgear.dataplane import http as front_door
from switchgear.dataplane.anthropic_door import Hooks
from switchgear.dataplane.convert import Call
from switchgear.dataplane.scheduling.model import candidate_key
from switchgear.dataplane.snapshot import Pricing, SecretRef
from switchgear.emulators import anthropic as anthropic_emu
from tests import test_fallback_presets as presets
from tests.test_anthropic_door import KEY, NARROW_KEY, governance, serving
from tests.test_stream import Agent, make_agent, view

MESSAGES: Any = [{"role": "user", "content": "how many tokens is this question, roughly?"}]
SYSTEM = "you count things"


@pytest.fixture
async def door() -> AsyncIterator[tuple[str, Agent]]:
    async with serving(governance()) as running:
        yield running


@pytest.fixture
async def sdk(door: tuple[str, Agent]) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=door[0], api_key=KEY, max_retries=0) as client:
        yield client


def _url(agent: Agent, service: str) -> str:
    snap = agent.holder.current
    assert snap is not None
    return snap.services[service].endpoints[0].url.rstrip("/")


async def _stats(agent: Agent, service: str) -> dict[str, Any]:
    base = _url(agent, service).removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{base}/_emulator/stats")).json()  # type: ignore[no-any-return]


async def test_an_anthropic_target_counts_as_messages_would(sdk: anthropic.AsyncAnthropic,
                                                             door: tuple[str, Agent]) -> None:
    counted = await sdk.messages.with_raw_response.count_tokens(model="claude", messages=MESSAGES, system=SYSTEM)
    count = await counted.parse()
    answered = await sdk.messages.create(model="claude", max_tokens=50, messages=MESSAGES, system=SYSTEM)
    assert count.input_tokens == answered.usage.input_tokens > 0  # the upstream's own count
    assert counted.headers["x-switchgear-endpoint"] == "e0" and counted.headers.get("x-switchgear-estimated") is None
    stats = await _stats(door[1], "claude")
    assert stats["by_path"].get("/v1/messages/count_tokens") == 1
    # the count went outside the routing statistics: only the message was an attempt
    assert [e.service for e in door[1].recorder.started] == ["claude"]


async def test_an_openai_target_is_estimated_without_an_upstream_call(sdk: anthropic.AsyncAnthropic,
                                                                      door: tuple[str, Agent]) -> None:
    counted = await sdk.messages.with_raw_response.count_tokens(model="gpt-mini", messages=MESSAGES, system=SYSTEM)
    count = await counted.parse()
    assert counted.headers["x-switchgear-estimated"] == "true"
    chars = len(MESSAGES[0]["content"]) + len(SYSTEM)
    assert count.input_tokens == -(-chars // 4)  # 4 characters a token, rounded up
    assert (await _stats(door[1], "gpt-mini"))["total"] == 0 and door[1].recorder.started == []


async def test_counting_refusals_are_anthropic_shaped(door: tuple[str, Agent]) -> None:
    base, agent = door
    async with anthropic.AsyncAnthropic(base_url=base, api_key="sg-k9-nobody", max_retries=0) as anonymous:
        with pytest.raises(anthropic.AuthenticationError):
            await anonymous.messages.count_tokens(model="claude", messages=MESSAGES)
    async with anthropic.AsyncAnthropic(base_url=base, api_key=NARROW_KEY, max_retries=0) as narrow:  # gpt-mini only
        with pytest.raises(anthropic.PermissionDeniedError):  # native: the pipeline's check
            await narrow.messages.count_tokens(model="claude", messages=MESSAGES)
        with pytest.raises(anthropic.NotFoundError):
            await narrow.messages.count_tokens(model="gpt-mini-not-there", messages=MESSAGES)
    async with httpx.AsyncClient() as http:
        for body, field in [({"model": "claude", "messages": MESSAGES, "max_tokens": 5}, "max_tokens"),
                            ({"model": "claude", "messages": MESSAGES, "stream": True}, "stream"),
                            ({"model": "claude", "messages": []}, "messages"),
                            ({"messages": MESSAGES}, "model")]:
            answer = await http.post(f"{base}/v1/messages/count_tokens", content=orjson.dumps(body),
                                     headers={"x-api-key": KEY, "content-type": "application/json"})
            assert answer.status_code == 400, answer.text
            error = answer.json()
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
            assert error["error"]["message"].startswith(field), error
        malformed = await http.post(f"{base}/v1/messages/count_tokens", content=b"{nope",
                                    headers={"x-api-key": KEY, "content-type": "application/json"})
        assert malformed.status_code == 400 and malformed.json()["type"] == "error"
    assert (await _stats(agent, "claude"))["total"] == 0 and agent.recorder.started == []


async def test_failing_counts_count_against_no_breaker(door: tuple[str, Agent], sdk: anthropic.AsyncAnthropic) -> None:
    agent = door[1]
    async with httpx.AsyncClient() as http:
        faults = await http.post(f"{_url(agent, 'claude')}/_emulator/faults", json={"error_rate": 1.0,
                                                                                   "error_status": 500})
        assert faults.status_code == 200, faults.text
    for _ in range(12):
        with pytest.raises(anthropic.APIStatusError) as info:
            await sdk.messages.count_tokens(model="claude", messages=MESSAGES)
        assert info.value.status_code >= 500
    assert agent.invoker.resilience.gate.unavailable(candidate_key("claude", "e0")) is False
    assert agent.recorder.ended == []  # no observer heard of them


async def test_the_callers_betas_reach_an_anthropic_target(door: tuple[str, Agent],
                                                           sdk: anthropic.AsyncAnthropic) -> None:
    agent, client = door[1], sdk
    betas = ["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"]
    message = await client.beta.messages.create(model="claude", max_tokens=40, messages=MESSAGES, betas=betas)
    assert message.content[0].type == "text"
    async with client.beta.messages.stream(model="claude", max_tokens=40, messages=MESSAGES,
                                           betas=betas[:1]) as stream:
        assert (await stream.get_final_message()).stop_reason == "end_turn"
    await client.beta.messages.count_tokens(model="claude", messages=MESSAGES, betas=betas[1:])
    notes = (await _stats(agent, "claude"))["notes"]
    notes.pop("beta:token-counting-2024-11-01", None)  # (the SDK's own, on its beta count_tokens)
    assert notes == {"beta:interleaved-thinking-2025-05-14": 2, "beta:context-1m-2025-08-07": 2}
    translated = await client.beta.messages.create(model="gpt-mini", max_tokens=40, messages=MESSAGES, betas=betas)
    assert translated.content[0].type == "text"  # an OpenAI target has no betas: dropped, the call served


async def test_malformed_betas_are_refused_before_any_upstream(door: tuple[str, Agent]) -> None:
    base, agent = door
    async with httpx.AsyncClient() as http:
        for beta in ("Not A Beta", "x" * 65, ",".join(f"b{i}" for i in range(17)), "ok-1,semi;colon"):
            answer = await http.post(f"{base}/v1/messages", headers={"x-api-key": KEY, "anthropic-beta": beta},
                                     json={"model": "claude", "max_tokens": 5, "messages": MESSAGES})
            assert answer.status_code == 400, (beta, answer.text)
            assert answer.json()["error"]["message"].startswith("anthropic-beta")
    assert (await _stats(agent, "claude"))["total"] == 0


async def test_the_adapter_merges_the_services_betas_with_the_callers() -> None:
    async with await anthropic_emu.start() as claude, httpx.AsyncClient() as client:
        target = Target(claude.url, api_key="", model="claude-3-sonnet",
                        options=parse_options({"beta": "svc-beta-1, shared-2"}))
        payload = {"messages": MESSAGES, "max_tokens": 5, "anthropic_beta": ["shared-2", "call-3"]}
        await AnthropicAdapter().invoke(client, target, AdapterRequest("messages", payload, 5))
        assert dict(claude.instance.notes) == {"beta:svc-beta-1": 1, "beta:shared-2": 1, "beta:call-3": 1}
        for bad in ("call-3", ["UPPER"], [1], ["b"] * 17):
            with pytest.raises(UpstreamError) as info:
                await AnthropicAdapter().invoke(client, target, AdapterRequest(
                    "messages", {**payload, "anthropic_beta": bad}, 5))
            assert info.value.kind is ErrorKind.CLIENT and "payload.anthropic_beta" in info.value.message
        counted = await AnthropicAdapter().invoke(client, target, AdapterRequest("count_tokens", {
            "messages": MESSAGES, "system": SYSTEM}, 5))
        assert orjson.loads(counted.body)["input_tokens"] > 0 and counted.usage.input_tokens == 0


@pytest.fixture
async def dead_claude() -> AsyncIterator[str]:
    """An open door whose only llm service speaks Anthropic's protocol and is down, with the seed's
    llm preset: a native call that falls back."""
    service = view("claude-dead", "anthropic", [presets.DEAD.removesuffix("/v1")], model="claude-3-sonnet",
                   pricing=Pricing(cost_per_1k_tokens=1.0))
    agent = make_agent(presets.snapshot_with({"llm": SEED_LLM_PRESET}, service))
    runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0")
    yield f"http://{address}"
    await runner.cleanup()
    await agent.pool.close()


async def test_a_native_stream_that_falls_back_is_an_anthropic_stream(dead_claude: str) -> None:
    async with anthropic.AsyncAnthropic(base_url=dead_claude, api_key="unused", max_retries=0) as client:
        whole = await client.messages.with_raw_response.create(model="claude-dead", max_tokens=20, messages=MESSAGES)
        assert whole.headers["x-switchgear-fallback"] == "preset_response"
        assert (await whole.parse()).content[0].text == SEED_LLM_PRESET  # type: ignore[union-attr]
        async with client.messages.stream(model="claude-dead", max_tokens=20, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
            texts = [text async for text in stream.text_stream]
        assert stream.response.headers["x-switchgear-fallback"] == "preset_response"
    assert final.content[0].text == SEED_LLM_PRESET and final.stop_reason == "end_turn"  # type: ignore[union-attr]
    assert "".join(texts) in ("", SEED_LLM_PRESET)


async def test_a_count_on_a_target_without_its_secret_is_refused_cleanly() -> None:
    """The key reference resolves to nothing: the caller gets the agent's misconfiguration (5xx in
    Anthropic's shape), as for a message, not a traceback."""
    async with await anthropic_emu.start(api_key="needed") as claude:
        service = dataclasses.replace(view("claude", "anthropic", [claude.url], model="claude-3-sonnet"),
                                      api_key=SecretRef(env="NOT_SET_ANYWHERE"))
        agent = make_agent(presets.snapshot_with({}, service))
        runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0")
        try:
            async with httpx.AsyncClient() as http:
                answer = await http.post(f"http://{address}/v1/messages/count_tokens",
                                         json={"model": "claude", "messages": MESSAGES})
            assert answer.status_code == 500 and answer.json()["type"] == "error", answer.text
            assert "NOT_SET_ANYWHERE" in answer.json()["error"]["message"]  # the reference, never a value
            assert claude.instance.by_path.get("/v1/messages/count_tokens", 0) == 0
        finally:
            await runner.cleanup()
            await agent.pool.close()


async def test_a_caller_gone_before_the_answer_begins_releases_the_upstream_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every door opens its streams with Hooks.open_stream: when the caller is gone by the time the
    first item is in (the answer's headers cannot be sent), the stream is closed there and then
    (the upstream connection released, the call charged), not whenever it is collected."""
    closed: list[bool] = []

    async def items() -> AsyncIterator[bytes]:
        try:
            yield b'{"first": 1}'
            yield b'{"second": 2}'
        finally:
            closed.append(True)

    class FakePipeline:
        def stream(self, call: object, snapshot: object, principal: object, open_stream: object) -> object:
            return items()

    async def gone(self: object, request: object) -> None:
        raise ConnectionResetError("the caller went away")

    monkeypatch.setattr(web.StreamResponse, "prepare", gone)
    hooks = Hooks(lambda r: None, lambda *a: None, lambda *a: None, lambda r: {},  # type: ignore[arg-type,return-value]
                  lambda r: FakePipeline(), lambda r: type("S", (), {"stream": None})(),  # type: ignore[arg-type,return-value]
                  lambda r, s: None)
    call = Call("r1", "", "claude", "messages", {}, 5, 0.0, "", "")
    with pytest.raises(ConnectionResetError):
        await hooks.open_stream(make_mocked_request("POST", "/v1/messages"), call, None, None,  # type: ignore[arg-type]
                                "request-id")
    assert closed == [True]
