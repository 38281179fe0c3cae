"""Searches a provider runs for a call (Anthropic's web_search server tool) are counted and
priced per search: what a call costs, how the Anthropic adapter reads the count (unary and
streamed) from the emulator, what the native door answers with the real SDK and charges the
tenant, how the count reaches metrics, the access log and the gRPC messages, and what happens
to a server tool the model's targets cannot run."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from switchgear.adapters.anthropic import AnthropicAdapter, usage_of
from switchgear.adapters.anthropic import parse_options as anthropic_options
from switchgear.adapters.base import MAX_WEB_SEARCHES, AdapterRequest, Target, TokenUsage, anthropic_usage
from switchgear.controlplane.convert import _pricing_from_proto, _pricing_to_proto
from switchgear.controlplane.model import Pricing as ControlPricing
from switchgear.dataplane.access_log import Exchange, parts_of
from switchgear.dataplane.convert import _pricing as agent_pricing
from switchgear.dataplane.door_metrics import DoorMetrics
from switchgear.dataplane.gateway import _response, _stream_end
from switchgear.dataplane.invoke import Result
from switchgear.dataplane.snapshot import Pricing
from switchgear.dataplane.stream import StreamEnd
from switchgear.emulators import anthropic as anthropic_emu
from switchgear.v1 import common_pb2
from switchgear.wire.checks import SnapshotError, check_endpoint
from tests.test_usage_parts import KEY, _charged, _streamed, door, upstreams

PRICES = Pricing(input_cost_per_1k_tokens=1.0, output_cost_per_1k_tokens=2.0, web_search_cost_per_1k_requests=10.0)
SEARCH = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
ASK = "search the web, then search again"  # the emulator searches once per "search"


# ---------------------------------------------------------------------------------------
# pure


def test_a_search_costs_its_price_on_top_of_the_tokens() -> None:
    assert math.isclose(PRICES.charge(TokenUsage(1000, 500, web_search_requests=3)), 1.0 + 1.0 + 0.03)
    assert PRICES.charge(TokenUsage(1000, 500)) == PRICES.cost(1000, 500)  # no search: the routing estimate
    assert Pricing(input_cost_per_1k_tokens=1.0).charge(TokenUsage(0, 0, web_search_requests=7)) == 0.0  # unpriced


@pytest.mark.parametrize(("server_tool_use", "searches"), [
    ({"web_search_requests": 2}, 2),
    ({"web_search_requests": 0, "web_fetch_requests": 3}, 0),  # fetches cost tokens only
    ({}, 0),
    ({"web_search_requests": -1}, 0),  # not a count: not believed
    ({"web_search_requests": True}, 0),
    ({"web_search_requests": "2"}, 0),
    ({"web_search_requests": 2.0}, 0),
    ({"web_search_requests": MAX_WEB_SEARCHES + 1}, 0),  # more than any call runs: not believed
    ("many", 0),
])
def test_anthropic_usage_reads_the_searches(server_tool_use: Any, searches: int) -> None:
    usage = usage_of({"input_tokens": 10, "output_tokens": 5, "server_tool_use": server_tool_use})
    assert usage is not None and usage.web_search_requests == searches
    assert (usage.input_tokens, usage.output_tokens) == (10, 5)  # a bad search count spoils nothing else
    assert anthropic_usage(usage).get("server_tool_use", {}).get("web_search_requests", 0) == searches


def test_the_count_reaches_metrics_access_log_and_the_grpc_messages() -> None:
    metrics = DoorMetrics()
    for searches, cached in ((2, False), (1, False), (4, True)):
        exchange = Exchange("http", "r1")
        exchange.route, exchange.tenant = "claude", "acme"
        exchange.answered(100, 20, 0.03, "e0", 1, cached, parts_of(TokenUsage(100, 20, web_search_requests=searches)))
        metrics.record(exchange)
        exchange.close()
    families = {f.name: f for f in metrics.collect()}
    assert [(s.labels, s.value) for s in families["switchgear_web_searches"].samples] == [
        ({"route": "claude", "tenant": "acme"}, 3.0)]  # the cache hit ran no search
    assert not list(families["switchgear_token_parts"].samples)  # searches are not tokens
    assert orjson.loads(exchange.line())["web_search_requests"] == 4
    usage = TokenUsage(100, 20, web_search_requests=2)
    unary = _response("r1", Result(b"{}", "claude", "e0", 1, 0.1, usage, 0.5, "v1")).usage
    streamed = _stream_end("r1", StreamEnd("claude", "e0", 1, 0.1, 0.01, usage, 0.5, False, "v1")).usage
    assert unary.web_search_requests == streamed.web_search_requests == 2


def test_the_search_price_travels_in_snapshots_and_a_bad_one_is_refused() -> None:
    prices = ControlPricing(input_cost_per_1k_tokens=1.0, web_search_cost_per_1k_requests=10.0)
    wire = _pricing_to_proto(prices)
    assert _pricing_from_proto(wire) == prices
    assert agent_pricing(wire) == Pricing(input_cost_per_1k_tokens=1.0, web_search_cost_per_1k_requests=10.0)
    for bad in (-1.0, math.inf, math.nan):
        endpoint = common_pb2.Endpoint(id="e0", url="http://h", weight=1)
        endpoint.pricing.web_search_cost_per_1k_requests = bad
        with pytest.raises(SnapshotError, match="pricing"):
            check_endpoint(endpoint, "services[0].endpoints[0]")


# ---------------------------------------------------------------------------------------
# the emulator and the adapter


async def test_the_emulator_checks_the_tool_and_searches_at_most_max_uses() -> None:
    async with await anthropic_emu.start() as claude, httpx.AsyncClient() as client:
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}

        async def ask(tools: Any, text: str = ASK) -> httpx.Response:
            return await client.post(f"{claude.url}/v1/messages", headers=headers, json={
                "model": "claude-3-sonnet", "max_tokens": 100, "tools": tools,
                "messages": [{"role": "user", "content": text}]})

        answer = (await ask(SEARCH)).json()
        assert [b["type"] for b in answer["content"]] == [
            "server_tool_use", "web_search_tool_result", "server_tool_use", "web_search_tool_result", "text"]
        assert answer["usage"]["server_tool_use"] == {"web_search_requests": 2}
        capped = (await ask([{**SEARCH[0], "max_uses": 1}])).json()
        assert capped["usage"]["server_tool_use"] == {"web_search_requests": 1}
        assert "server_tool_use" not in (await ask(SEARCH, "hello")).json()["usage"]
        for tools, needle in (([{**SEARCH[0], "name": "search"}], "tools.0.name"),
                              ([{**SEARCH[0], "max_uses": 0}], "tools.0.max_uses"),
                              ([SEARCH[0], SEARCH[0]], "unique"),
                              ([{"type": "web_search_2025", "name": "web_search"}], "tools.0.type")):
            refused = await ask(tools)
            assert refused.status_code == 400 and needle in refused.json()["error"]["message"]


async def test_the_adapter_reads_the_searches_unary_and_streamed() -> None:
    async with upstreams() as (_, claude_url), httpx.AsyncClient() as client:
        adapter, target = AnthropicAdapter(), Target(claude_url, model="claude-3-sonnet",
                                                     options=anthropic_options({}))
        body = {"model": "claude-3-sonnet", "max_tokens": 100, "tools": SEARCH,
                "messages": [{"role": "user", "content": ASK}]}
        unary = await adapter.invoke(client, target, AdapterRequest("messages", body, 5))
        assert unary.usage.web_search_requests == 2 and not unary.usage.estimated
        streamed = await _streamed(adapter, client, target, AdapterRequest("messages", {**body, "stream": True}, 5))
        assert streamed == unary.usage


# ---------------------------------------------------------------------------------------
# the door


async def test_the_native_door_charges_each_search_unary_and_streamed() -> None:
    async with door(PRICES) as (url, quotas, _):
        sdk = anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0)
        tools: Any = SEARCH
        raw = await sdk.messages.with_raw_response.create(
            model="claude", max_tokens=100, tools=tools, messages=[{"role": "user", "content": ASK}])
        answer = await raw.parse()
        assert answer.usage.server_tool_use is not None and answer.usage.server_tool_use.web_search_requests == 2
        expected = PRICES.charge(TokenUsage(answer.usage.input_tokens, answer.usage.output_tokens,
                                            web_search_requests=2))
        assert math.isclose(float(raw.headers["x-switchgear-cost-usd"]), expected, rel_tol=1e-6)
        assert math.isclose(_charged(quotas), expected, rel_tol=1e-9)
        assert expected - PRICES.cost(answer.usage.input_tokens, answer.usage.output_tokens) == pytest.approx(0.02)
        async with sdk.messages.stream(model="claude", max_tokens=100, tools=tools,
                                       messages=[{"role": "user", "content": ASK}]) as stream:
            final = await stream.get_final_message()
        assert final.usage.server_tool_use is not None and final.usage.server_tool_use.web_search_requests == 2
        assert math.isclose(_charged(quotas), expected, rel_tol=1e-9)


async def test_a_stream_the_caller_cuts_after_the_searches_is_charged_for_them() -> None:
    """The searches ran at Anthropic (and are billed) once their results streamed; the count
    comes only on the final message_delta. A caller that reads the results and the first text,
    then hangs up, is charged its searches with the estimate of what it read, not tokens only."""
    async with door(PRICES) as (url, quotas, claude_url):
        async with httpx.AsyncClient(timeout=10) as client:
            await client.post(f"{claude_url}/_emulator/faults", json={"token_delay_ms": 100})
            body = {"model": "claude", "max_tokens": 100, "tools": SEARCH, "stream": True,
                    "messages": [{"role": "user", "content": ASK}]}
            async with client.stream("POST", f"{url}/v1/messages", headers={"x-api-key": KEY}, json=body) as answer:
                assert answer.status_code == 200
                results = 0
                async for line in answer.aiter_lines():
                    results += '"web_search_tool_result"' in line and line.startswith("data:")
                    if '"text_delta"' in line:
                        break  # both searches' results and a first piece of text read: hang up
            assert results == 2
        charged = 0.0
        deadline = asyncio.get_running_loop().time() + 10
        while not charged and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
            charged += _charged(quotas)
        assert charged >= 2 * PRICES.web_search_cost_per_1k_requests / 1000, charged


async def test_a_server_tool_for_a_model_served_by_translation_is_refused_naming_it() -> None:
    async with door(PRICES) as (url, quotas, claude_url):
        async with httpx.AsyncClient() as client:
            before = (await client.get(f"{claude_url}/_emulator/stats")).json()
            answer = await client.post(f"{url}/v1/messages", headers={"x-api-key": KEY}, json={
                "model": "gpt", "max_tokens": 50, "tools": SEARCH, "messages": [{"role": "user", "content": ASK}]})
            assert answer.status_code == 400
            error = answer.json()
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
            assert error["error"]["message"].startswith("tools.0.type:") and "server tool" in error["error"]["message"]
            # a custom tool beside it changes nothing; no upstream was called, nothing charged
            assert (await client.get(f"{claude_url}/_emulator/stats")).json() == before
        assert _charged(quotas) == 0.0


# ---------------------------------------------------------------------------------------
# configuration


def test_a_search_price_loads_on_anthropic_is_described_and_refused_where_it_could_never_apply() -> None:
    from switchgear.cli_config import describe
    from switchgear.controlplane.config import ConfigError, load_config
    from tests.test_config import _yaml

    state = load_config(_yaml("""
        external_services:
          services:
            llm_services:
              anthropic:
                models:
                  - name: claude
                    input_cost_per_1k_tokens: 0.003
                    output_cost_per_1k_tokens: 0.015
                    web_search_cost_per_1k_requests: 10
        """), env={"ANTHROPIC_API_KEY": "k"})
    assert next(s for s in state.services if s.name == "claude").pricing.web_search_cost_per_1k_requests == 10.0
    shown = next(line for line in describe(state).splitlines() if line.strip().startswith("claude "))
    assert "$10/1k web searches" in shown
    with pytest.raises(ConfigError, match=r"web_search_cost_per_1k_requests.*report no searches"):
        load_config(_yaml("""
            external_services:
              services:
                llm_services:
                  openai:
                    models:
                      - name: gpt
                        web_search_cost_per_1k_requests: 25
            """), env={"OPENAI_API_KEY": "k"})


def test_searches_counted_as_they_stream_are_results_not_errors_and_bounded() -> None:
    from switchgear.adapters.anthropic import _MessageStream

    def block(content: Any) -> str:
        return orjson.dumps({"type": "content_block_start", "index": 0, "content_block": {
            "type": "web_search_tool_result", "tool_use_id": "s", "content": content}}).decode()

    for as_chat in (False, True):
        state = _MessageStream(as_chat, 0)
        ran = [state.feed("content_block_start", block(c)) for c in
               ([{"type": "web_search_result", "url": "u"}], {"type": "web_search_tool_result_error",
                                                             "error_code": "max_uses_exceeded"}, [])]
        # (translated to OpenAI chunks, a block that ran no search says nothing)
        assert [chunk.searches if chunk is not None else None for chunk in ran] == [1, None if as_chat else 1, 2]
        state.ran = MAX_WEB_SEARCHES - 1
        assert state.feed("content_block_start", block([])).searches == MAX_WEB_SEARCHES  # type: ignore[union-attr]
        state.feed("content_block_start", block([]))
        assert state.ran == MAX_WEB_SEARCHES
