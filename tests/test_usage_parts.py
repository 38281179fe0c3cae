"""Prompt-cache and reasoning tokens, end to end: TokenUsage's parts, what they cost, how both
adapters read them (unary and streamed) from the emulators, what each door answers with the
real SDKs, what a tenant is charged, and providers answering counts that cannot be true."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from switchgear.adapters.anthropic import AnthropicAdapter, messages_from_chat, usage_of
from switchgear.adapters.anthropic import parse_options as anthropic_options
from switchgear.adapters.base import (
    MAX_TOKEN_COUNT,
    AdapterRequest,
    ErrorKind,
    Target,
    TokenUsage,
    UpstreamError,
    anthropic_usage,
    openai_usage,
    responses_usage,
    token_count,
    usage_with_parts,
)
from switchgear.adapters.openai import OpenAIAdapter, _reported_usage
from switchgear.controlplane.convert import _pricing_from_proto, _pricing_to_proto
from switchgear.controlplane.model import Pricing as ControlPricing
from switchgear.dataplane import http as front_door
from switchgear.dataplane.access_log import Exchange
from switchgear.dataplane.convert import _pricing as agent_pricing
from switchgear.dataplane.door_metrics import DoorMetrics
from switchgear.dataplane.gateway import _response, _stream_end
from switchgear.dataplane.governance import Governance, TenantView
from switchgear.dataplane.invoke import Result
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer
from switchgear.dataplane.snapshot import Pricing
from switchgear.dataplane.stream import StreamEnd
from switchgear.dataplane.tracing import usage_attributes
from switchgear.emulators import anthropic as anthropic_emu
from switchgear.emulators.openai import (
    CACHE_MIN_TOKENS,
    REASONING_TOKENS,
    InstanceSpec,
    PromptCache,
    start_instances,
)
from switchgear.v1 import common_pb2
from switchgear.wire.checks import SnapshotError, check_endpoint
from tests.test_stream import make_agent, snapshot, view

KEY = "sg-k1-usage-door-secret"
# 1100 tokens (each "wN" is one emulator token): over OpenAI's 1024-token caching minimum.
LONG = " ".join(f"w{i}" for i in range(1100))
PRICES = Pricing(input_cost_per_1k_tokens=1.0, output_cost_per_1k_tokens=2.0,
                 cache_read_input_cost_per_1k_tokens=0.1, cache_write_input_cost_per_1k_tokens=1.25)


# ---------------------------------------------------------------------------------------
# pure: what a call costs, what a count is


@pytest.mark.parametrize(("pricing", "usage", "usd"), [
    # no cache use: input and output at their prices, plus the request price
    (Pricing(input_cost_per_1k_tokens=1.0, output_cost_per_1k_tokens=2.0, cost_per_request=0.5),
     TokenUsage(1000, 500), 0.5 + 1.0 + 1.0),
    # cache reads at their price, the uncached rest at the input price
    (PRICES, TokenUsage(1000, 0, cache_read_input_tokens=800), 0.2 * 1.0 + 0.8 * 0.1),
    # cache writes at theirs
    (PRICES, TokenUsage(1000, 0, cache_write_input_tokens=1000), 1.25),
    # all four kinds at once; reasoning tokens are output tokens
    (PRICES, TokenUsage(3000, 1000, cache_read_input_tokens=1000, cache_write_input_tokens=1000, reasoning_tokens=600),
     1.0 + 0.1 + 1.25 + 2.0),
    # an unset cache price is the input price (per-direction, else the flat one)
    (Pricing(input_cost_per_1k_tokens=1.0), TokenUsage(1000, 0, cache_read_input_tokens=500,
                                                       cache_write_input_tokens=500), 1.0),
    (Pricing(cost_per_1k_tokens=3.0), TokenUsage(1000, 1000, cache_read_input_tokens=1000), 6.0),
    (Pricing(cost_per_1k_tokens=3.0, cache_read_input_cost_per_1k_tokens=0.3),
     TokenUsage(1000, 1000, cache_read_input_tokens=1000), 0.3 + 3.0),
    (Pricing(), TokenUsage(10**6, 10**6, cache_read_input_tokens=10), 0.0),
])
def test_charge_prices_each_kind_of_token(pricing: Pricing, usage: TokenUsage, usd: float) -> None:
    assert math.isclose(pricing.charge(usage), usd, rel_tol=1e-12, abs_tol=1e-12)


def test_charge_without_cache_parts_is_the_routing_estimate() -> None:
    for usage in (TokenUsage(0, 0), TokenUsage(123, 45), TokenUsage(10**6, 1)):
        assert PRICES.charge(usage) == PRICES.cost(usage.input_tokens, usage.output_tokens)


@pytest.mark.parametrize(("value", "count"), [
    (0, 0), (7, 7), (MAX_TOKEN_COUNT, MAX_TOKEN_COUNT), (MAX_TOKEN_COUNT + 1, None), (10**400, None), (-1, None),
    (1.5, None), (2.0, None), (True, None), ("12", None), (None, None), ([3], None),
])
def test_a_token_count_is_a_bounded_integer(value: Any, count: int | None) -> None:
    assert token_count(value) == count


def test_parts_never_exceed_their_totals() -> None:
    assert usage_with_parts(100, 10, 60, 60, 99) == TokenUsage(
        100, 10, cache_read_input_tokens=60, cache_write_input_tokens=40, reasoning_tokens=10)
    assert usage_with_parts(100, 10, -5, "x", 2**40) == TokenUsage(100, 10)  # not counts: no parts
    assert TokenUsage(10, 0, cache_read_input_tokens=8, cache_write_input_tokens=2).uncached_input_tokens == 0


@pytest.mark.parametrize(("usage", "expected"), [
    ({"prompt_tokens": 1200, "completion_tokens": 300, "prompt_tokens_details": {"cached_tokens": 1024},
      "completion_tokens_details": {"reasoning_tokens": 256}},
     TokenUsage(1200, 300, cache_read_input_tokens=1024, reasoning_tokens=256)),
    ({"prompt_tokens": 5, "completion_tokens": 2}, TokenUsage(5, 2)),
    ({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None,
      "completion_tokens_details": "x"}, TokenUsage(5, 2)),
    # a detail that is not a count, or more than its total, is not believed past the total
    ({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": -3},
      "completion_tokens_details": {"reasoning_tokens": 1e9}}, TokenUsage(5, 2)),
    ({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 50}},
     TokenUsage(5, 2, cache_read_input_tokens=5)),
    # totals that are not counts: no reported usage (the adapter estimates instead)
    ({"prompt_tokens": 2**31, "completion_tokens": 2}, None),
    ({"prompt_tokens": -1, "completion_tokens": 2}, None),
    ({"prompt_tokens": "5", "completion_tokens": 2}, None),
])
def test_openai_usage_details(usage: dict[str, Any], expected: TokenUsage | None) -> None:
    assert _reported_usage({"usage": usage}) == expected


@pytest.mark.parametrize(("usage", "expected"), [
    # Anthropic's input_tokens leaves the cache parts out; TokenUsage's counts all input
    ({"input_tokens": 50, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200, "output_tokens": 9},
     TokenUsage(1250, 9, cache_read_input_tokens=1000, cache_write_input_tokens=200)),
    ({"input_tokens": 50, "output_tokens": 9}, TokenUsage(50, 9)),
    ({"input_tokens": 50, "cache_read_input_tokens": None, "output_tokens": 9}, None),
    ({"input_tokens": 50, "cache_read_input_tokens": -1, "output_tokens": 9}, None),
    ({"input_tokens": 50, "cache_creation_input_tokens": 2**31, "output_tokens": 9}, None),
    ({"input_tokens": 50, "cache_creation_input_tokens": 0.5, "output_tokens": 9}, None),
    ({"output_tokens": 9}, None),
    # three in-range counts whose sum is out of range: the total is capped, parts within it
    ({"input_tokens": MAX_TOKEN_COUNT, "cache_read_input_tokens": MAX_TOKEN_COUNT, "output_tokens": 0},
     TokenUsage(MAX_TOKEN_COUNT, 0, cache_read_input_tokens=MAX_TOKEN_COUNT)),
])
def test_anthropic_usage_adds_the_cache_parts_back(usage: dict[str, Any], expected: TokenUsage | None) -> None:
    assert usage_of(usage) == expected


def test_each_shape_of_usage() -> None:
    usage = TokenUsage(1250, 300, cache_read_input_tokens=1000, cache_write_input_tokens=200, reasoning_tokens=100)
    assert openai_usage(usage) == {
        "prompt_tokens": 1250, "completion_tokens": 300, "total_tokens": 1550,
        "prompt_tokens_details": {"cached_tokens": 1000}, "completion_tokens_details": {"reasoning_tokens": 100},
        "cache_creation_input_tokens": 200}
    assert anthropic_usage(usage) == {"input_tokens": 50, "cache_creation_input_tokens": 200,
                                      "cache_read_input_tokens": 1000, "output_tokens": 300}
    assert responses_usage(usage) == {
        "input_tokens": 1250, "input_tokens_details": {"cached_tokens": 1000}, "output_tokens": 300,
        "output_tokens_details": {"reasoning_tokens": 100}, "total_tokens": 1550}
    assert "cache_creation_input_tokens" not in openai_usage(TokenUsage(5, 1))


# ---------------------------------------------------------------------------------------
# the emulators' caches


def test_openai_prompt_cache_follows_the_documented_rule() -> None:
    now = [0.0]
    cache = PromptCache(lambda: now[0])
    short = " ".join(f"s{i}" for i in range(CACHE_MIN_TOKENS - 1))
    assert cache.openai("m", [short]) == 0 and cache.openai("m", [short]) == 0  # under 1024: never cached
    assert cache.openai("m", [LONG]) == 0
    assert cache.openai("m", [LONG]) == 1024  # the longest seen prefix, in 128-token steps
    assert cache.openai("other-model", [LONG]) == 0
    longer = LONG + " " + " ".join(f"x{i}" for i in range(300))  # 1400 tokens sharing the 1100
    assert cache.openai("m", [longer]) == 1024
    assert cache.openai("m", [longer]) == 1280
    now[0] += 301.0  # past the TTL
    assert cache.openai("m", [LONG]) == 0


async def test_anthropic_emulator_writes_then_reads_marked_prefixes() -> None:
    body = {"model": "claude-3-sonnet", "max_tokens": 20,
            "system": [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "what now"}]}
    async with await anthropic_emu.start() as emu, httpx.AsyncClient() as client:
        async def usage(payload: dict[str, Any]) -> dict[str, Any]:
            answer = await client.post(f"{emu.url}/v1/messages", json=payload, headers={"anthropic-version": "x"})
            assert answer.status_code == 200, answer.text
            found: dict[str, Any] = answer.json()["usage"]
            return found
        first, second = await usage(body), await usage(body)
        assert (first["cache_creation_input_tokens"], first["cache_read_input_tokens"]) == (1100, 0)
        assert (second["cache_creation_input_tokens"], second["cache_read_input_tokens"]) == (0, 1100)
        assert first["input_tokens"] == second["input_tokens"] == 2  # only what follows the breakpoint
        unmarked = {**body, "system": LONG}
        assert (await usage(unmarked))["cache_read_input_tokens"] == 0
        short = {**body, "system": [{"type": "text", "text": "brief", "cache_control": {"type": "ephemeral"}}]}
        assert (await usage(short))["cache_creation_input_tokens"] == 0  # under 1024 tokens: not cached
        for bad, message in (
            ({**body, "system": [{"type": "text", "text": "a", "cache_control": {"type": "persistent"}}]},
             "system.0.cache_control.type"),
            ({**body, "system": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral",
                                                                               "ttl": "2h"}}]},
             "system.0.cache_control.ttl"),
            ({**body, "system": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}] * 5},
             "A maximum of 4 blocks with cache_control"),
        ):
            answer = await client.post(f"{emu.url}/v1/messages", json=bad, headers={"anthropic-version": "x"})
            assert answer.status_code == 400 and message in answer.json()["error"]["message"]


# ---------------------------------------------------------------------------------------
# both adapters, unary and streamed, against the emulators


@contextlib.asynccontextmanager
async def upstreams() -> AsyncIterator[tuple[str, str]]:
    """(OpenAI emulator base URL serving gpt-4o-mini and o4-mini, Anthropic emulator URL)."""
    spec = InstanceSpec("a", model_ids=("gpt-4o-mini", "o4-mini"))
    async with await start_instances([spec]) as group, await anthropic_emu.start() as claude:
        yield group.urls["a"], claude.url


async def _streamed(adapter: Any, client: httpx.AsyncClient, target: Target, request: AdapterRequest) -> TokenUsage:
    usage = None
    async for chunk in adapter.stream(client, target, request):
        usage = chunk.usage or usage
    assert usage is not None
    return usage


async def test_openai_adapter_reads_cached_and_reasoning_tokens_unary_and_streamed() -> None:
    async with upstreams() as (url, _), httpx.AsyncClient() as client:
        adapter = OpenAIAdapter()
        mini, o4 = Target(url, model="gpt-4o-mini"), Target(url, model="o4-mini")
        chat = {"messages": [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]}
        first = await adapter.invoke(client, mini, AdapterRequest("chat.completions", chat, 5))
        again = await adapter.invoke(client, mini, AdapterRequest("chat.completions", chat, 5))
        assert first.usage.cache_read_input_tokens == 0 and first.usage.input_tokens == 1101
        assert again.usage == dataclasses.replace(first.usage, cache_read_input_tokens=1024)
        streamed = await _streamed(adapter, client, mini, AdapterRequest("chat.completions", chat, 5))
        assert streamed == again.usage and not streamed.estimated
        thinking = {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high"}
        reasoned = await adapter.invoke(client, o4, AdapterRequest("chat.completions", thinking, 5))
        assert reasoned.usage.reasoning_tokens == REASONING_TOKENS["high"]
        assert reasoned.usage.output_tokens > REASONING_TOKENS["high"]  # reasoning is part of the output
        streamed = await _streamed(adapter, client, o4, AdapterRequest("chat.completions", thinking, 5))
        assert streamed.reasoning_tokens == REASONING_TOKENS["high"]
        with pytest.raises(UpstreamError) as refused:  # a model that does not reason refuses the effort
            await adapter.invoke(client, mini, AdapterRequest("chat.completions", thinking, 5))
        assert refused.value.kind == ErrorKind.CLIENT and "reasoning_effort" in str(refused.value)


async def test_anthropic_adapter_reads_cache_tokens_natively_and_from_openai_parts() -> None:
    async with upstreams() as (_, url), httpx.AsyncClient() as client:
        adapter, target = AnthropicAdapter(), Target(url, model="claude-3-sonnet", options=anthropic_options({}))
        native = {"model": "claude-3-sonnet", "max_tokens": 20,
                  "system": [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                  "messages": [{"role": "user", "content": "hi"}]}
        wrote = await adapter.invoke(client, target, AdapterRequest("messages", native, 5))
        read = await _streamed(adapter, client, target, AdapterRequest("messages", native, 5))
        assert wrote.usage == TokenUsage(1101, wrote.usage.output_tokens, cache_write_input_tokens=1100)
        assert read == TokenUsage(1101, read.output_tokens, cache_read_input_tokens=1100)
        # the same breakpoint on an OpenAI-format part (LiteLLM's extension) reaches Anthropic
        chat = {"messages": [
            {"role": "system", "content": [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": "hi"}]}
        assert messages_from_chat(chat, "m", 10)["system"] == [
            {"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
        mapped = await adapter.invoke(client, target, AdapterRequest("chat.completions", chat, 5))
        assert mapped.usage.cache_read_input_tokens == 1100  # the native call above wrote this prefix
        assert orjson.loads(mapped.body)["usage"]["prompt_tokens_details"] == {"cached_tokens": 1100}
        streamed = await _streamed(adapter, client, target, AdapterRequest("chat.completions", chat, 5))
        assert streamed.cache_read_input_tokens == 1100 and streamed.input_tokens == 1101
        for bad, path in (({"type": "ephemeral", "ttl": "1d"}, "payload.messages[0].content[0].cache_control.ttl"),
                          ({"type": "forever"}, "payload.messages[0].content[0].cache_control")):
            part = {"type": "text", "text": "x", "cache_control": bad}
            with pytest.raises(UpstreamError) as refused:
                await adapter.invoke(client, target, AdapterRequest(
                    "chat.completions", {"messages": [{"role": "user", "content": [part]}]}, 5))
            assert refused.value.kind == ErrorKind.CLIENT and str(refused.value).startswith(path)


@pytest.mark.parametrize("answer", [
    {"input_tokens": -5, "cache_read_input_tokens": 10, "output_tokens": 3},
    {"input_tokens": 5, "cache_read_input_tokens": 10**30, "output_tokens": 3},
    {"input_tokens": 5, "cache_creation_input_tokens": "many", "output_tokens": 3},
    {"input_tokens": 5, "cache_creation_input_tokens": True, "output_tokens": 3},
])
async def test_anthropic_answer_with_impossible_counts_is_estimated_not_believed(answer: dict[str, Any]) -> None:
    """A provider's impossible usage (a protocol fake answering it) costs an estimate, never a
    negative or astronomic charge, and raises nothing."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                         "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                                         "usage": answer})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        response = await AnthropicAdapter().invoke(
            client, Target("http://h", model="m", options=anthropic_options({})),
            AdapterRequest("chat.completions", {"messages": [{"role": "user", "content": "hello"}]}, 5))
    assert response.usage.estimated and 0 < response.usage.input_tokens < 10
    assert 0 <= PRICES.charge(response.usage) < 1.0


# ---------------------------------------------------------------------------------------
# the doors, with the real SDKs, and what the tenant is charged


@contextlib.asynccontextmanager
async def door(prices: Pricing = PRICES) -> AsyncIterator[tuple[str, QuotaEnforcer, str]]:
    """The HTTP door (keys required) in front of both emulators, every model priced `prices`:
    (its URL, its quota enforcer, the Anthropic emulator's URL)."""
    tenants = Governance(tenants=MappingProxyType({"acme": TenantView("acme")}),
                         keys=MappingProxyType({"k1": ("acme", hashlib.sha256(KEY.encode()).digest())}))
    async with upstreams() as (openai_url, claude_url):
        snap = snapshot(view("claude", "anthropic", [claude_url], model="claude-3-sonnet", pricing=prices),
                        view("gpt", "openai", [openai_url], model="gpt-4o-mini", pricing=prices),
                        view("o4", "openai", [openai_url], model="o4-mini", pricing=prices))
        agent = make_agent(dataclasses.replace(snap, governance=tenants))
        quotas = QuotaEnforcer(LocalCounters())
        pipeline = Pipeline(agent.invoker.invoke, auth_required=True, quotas=quotas, cache=None)
        runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0",
                                                 pipeline)
        try:
            yield f"http://{address}", quotas, claude_url
        finally:
            await runner.cleanup()
            await agent.pool.close()


def _charged(quotas: QuotaEnforcer) -> float:
    tally = quotas.drain_usage().get("acme")
    return tally.cost_usd if tally is not None else 0.0


async def test_openai_door_reports_and_charges_cached_and_reasoning_tokens() -> None:
    async with door() as (url, quotas, _):
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        messages: Any = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
        await sdk.chat.completions.create(model="gpt", messages=messages)
        _charged(quotas)
        raw = await sdk.chat.completions.with_raw_response.create(model="gpt", messages=messages)
        answer = raw.parse()
        assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
        assert answer.usage.prompt_tokens == 1101 and answer.usage.prompt_tokens_details.cached_tokens == 1024
        expected = PRICES.charge(TokenUsage(1101, answer.usage.completion_tokens, cache_read_input_tokens=1024))
        assert math.isclose(float(raw.headers["x-switchgear-cost-usd"]), expected, rel_tol=1e-6)
        assert math.isclose(_charged(quotas), expected, rel_tol=1e-9)
        assert expected < PRICES.cost(1101, answer.usage.completion_tokens)  # the discount reached the budget
        stream = await sdk.chat.completions.create(model="o4", messages=[{"role": "user", "content": "hi"}],
                                                   stream=True, stream_options={"include_usage": True},
                                                   reasoning_effort="low")
        usage = [chunk.usage async for chunk in stream if chunk.usage is not None][-1]
        assert usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS["low"]
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0


async def test_anthropic_door_reports_cache_parts_as_anthropic_does() -> None:
    system: Any = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
    async with door() as (url, quotas, _):
        sdk = anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0)
        wrote = await sdk.messages.create(model="claude", max_tokens=50, system=system,
                                          messages=[{"role": "user", "content": "hi"}])
        assert (wrote.usage.input_tokens, wrote.usage.cache_creation_input_tokens,
                wrote.usage.cache_read_input_tokens) == (1, 1100, 0)
        write_cost = PRICES.charge(TokenUsage(1101, wrote.usage.output_tokens, cache_write_input_tokens=1100))
        assert math.isclose(_charged(quotas), write_cost, rel_tol=1e-9)
        async with sdk.messages.stream(model="claude", max_tokens=50, system=system,
                                       messages=[{"role": "user", "content": "hi"}]) as stream:
            final = await stream.get_final_message()
        assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (1, 1100)
        read_cost = PRICES.charge(TokenUsage(1101, final.usage.output_tokens, cache_read_input_tokens=1100))
        assert math.isclose(_charged(quotas), read_cost, rel_tol=1e-9) and read_cost < write_cost
        # an OpenAI-protocol target through the Anthropic door: OpenAI's cached tokens as a cache read
        await sdk.messages.create(model="gpt", max_tokens=50, system=LONG, messages=[{"role": "user", "content": "hi"}])
        again = await sdk.messages.create(model="gpt", max_tokens=50, system=LONG,
                                          messages=[{"role": "user", "content": "hi"}])
        assert (again.usage.input_tokens, again.usage.cache_read_input_tokens) == (1101 - 1024, 1024)


async def test_responses_door_reports_cached_and_reasoning_tokens() -> None:
    async with door() as (url, _, _):
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        await sdk.responses.create(model="gpt", instructions=LONG, input="hi")
        answer = await sdk.responses.create(model="gpt", instructions=LONG, input="hi")
        assert answer.usage is not None and answer.usage.input_tokens_details.cached_tokens == 1024
        stream = await sdk.responses.create(model="o4", input="hi", reasoning={"effort": "medium"}, stream=True)
        done = [event async for event in stream if event.type == "response.completed"]
        usage = done[0].response.usage
        assert usage is not None and usage.output_tokens_details.reasoning_tokens == REASONING_TOKENS["medium"]


# ---------------------------------------------------------------------------------------
# telemetry and the gRPC messages


def test_token_parts_metric_access_log_and_span_attributes() -> None:
    metrics = DoorMetrics()
    for parts, cached in (((1000, 0, 50, 0), False), ((24, 100, 0, 0), False), ((500, 0, 0, 0), True)):
        exchange = Exchange("http", "r1")
        exchange.route, exchange.tenant = "gpt", "acme"
        exchange.answered(1200, 300, 0.01, "e0", 1, cached, parts)
        metrics.record(exchange)
        exchange.close()
    families = {f.name: f for f in metrics.collect()}
    samples = {s.labels["part"]: s.value for s in families["switchgear_token_parts"].samples}
    assert samples == {"cache_read": 1024.0, "cache_write": 100.0, "reasoning": 50.0}  # the cache hit moved none
    tokens = {s.labels["direction"]: s.value for s in families["switchgear_tokens"].samples}
    assert tokens == {"input": 2400.0, "output": 600.0}  # the totals are unchanged by their parts

    line = orjson.loads(exchange.line())
    assert (line["cache_read_input_tokens"], line["cache_write_input_tokens"], line["reasoning_tokens"]) == (500, 0, 0)
    plain = Exchange("http", "r2")
    plain.answered(5, 1, 0.0, "e0", 1)
    assert "cache_read_input_tokens" not in orjson.loads(plain.line())
    plain.close()

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        usage_attributes(span, 1200, 300, (1000, 0, 50, 2))
    (finished,) = exporter.get_finished_spans()
    assert dict(finished.attributes or {}) == {
        "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 1000, "gen_ai.usage.reasoning.output_tokens": 50,
        "switchgear.usage.web_search_requests": 2}


def test_gateway_messages_carry_the_parts() -> None:
    usage = TokenUsage(1200, 300, cache_read_input_tokens=1000, cache_write_input_tokens=100, reasoning_tokens=50)
    unary = _response("r1", Result(b"{}", "gpt", "e0", 1, 0.1, usage, 0.5, "v1")).usage
    streamed = _stream_end("r1", StreamEnd("gpt", "e0", 1, 0.1, 0.01, usage, 0.5, False, "v1")).usage
    for message in (unary, streamed):
        assert (message.input_tokens, message.cache_read_input_tokens, message.cache_write_input_tokens,
                message.output_tokens, message.reasoning_tokens, message.cost_usd) == (1200, 1000, 100, 300, 50, 0.5)


def test_cache_prices_travel_in_snapshots_and_bad_ones_are_refused() -> None:
    prices = ControlPricing(input_cost_per_1k_tokens=1.0, cache_read_input_cost_per_1k_tokens=0.1,
                            cache_write_input_cost_per_1k_tokens=1.25)
    wire = _pricing_to_proto(prices)
    assert _pricing_from_proto(wire) == prices
    assert agent_pricing(wire) == Pricing(input_cost_per_1k_tokens=1.0, cache_read_input_cost_per_1k_tokens=0.1,
                                          cache_write_input_cost_per_1k_tokens=1.25)
    endpoint = common_pb2.Endpoint(id="e0", url="http://h", weight=1)
    endpoint.pricing.cache_write_input_cost_per_1k_tokens = -1.0
    with pytest.raises(SnapshotError, match="pricing"):
        check_endpoint(endpoint, "services[0].endpoints[0]")


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: ".encode() + orjson.dumps(e) + b"\n\n" for e in events)


@pytest.mark.parametrize(("delta_usage", "expected"), [
    # the older form: message_delta counts only output
    ({"output_tokens": 5}, TokenUsage(1210, 5, cache_read_input_tokens=1000, cache_write_input_tokens=200)),
    # the newer one repeats the cumulative input counts; they are not added twice
    ({"input_tokens": 10, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200, "output_tokens": 5},
     TokenUsage(1210, 5, cache_read_input_tokens=1000, cache_write_input_tokens=200)),
    # a delta's impossible part is ignored, the start's stands
    ({"input_tokens": 10, "cache_read_input_tokens": -4, "output_tokens": 5},
     TokenUsage(1210, 5, cache_read_input_tokens=1000, cache_write_input_tokens=200)),
])
async def test_anthropic_stream_usage_from_start_and_delta(delta_usage: dict[str, Any], expected: TokenUsage) -> None:
    body = _sse(
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                              "content": [], "usage": {"input_tokens": 10, "output_tokens": 1,
                                                                       "cache_read_input_tokens": 1000,
                                                                       "cache_creation_input_tokens": 200}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage},
        {"type": "message_stop"})

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        target = Target("http://h", model="m", options=anthropic_options({}))
        for method, payload in (("messages", {"model": "m", "max_tokens": 9, "messages": [{"role": "user",
                                                                                           "content": "x"}]}),
                                ("chat.completions", {"messages": [{"role": "user", "content": "x"}]})):
            assert await _streamed(AnthropicAdapter(), client, target, AdapterRequest(method, payload, 5)) == expected


async def test_openai_door_streams_an_anthropic_targets_cache_read_from_a_marked_part() -> None:
    messages: Any = [{"role": "system", "content": [{"type": "text", "text": LONG,
                                                     "cache_control": {"type": "ephemeral"}}]},
                     {"role": "user", "content": "hi"}]
    async with door() as (url, quotas, _):
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        first = await sdk.chat.completions.create(model="claude", messages=messages)
        assert first.usage is not None and first.usage.model_extra == {"cache_creation_input_tokens": 1100}
        _charged(quotas)
        stream = await sdk.chat.completions.create(model="claude", messages=messages, stream=True,
                                                   stream_options={"include_usage": True})
        usage = [chunk.usage async for chunk in stream if chunk.usage is not None][-1]
        assert usage.prompt_tokens == 1101 and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 1100
        expected = PRICES.charge(TokenUsage(1101, usage.completion_tokens, cache_read_input_tokens=1100))
        assert math.isclose(_charged(quotas), expected, rel_tol=1e-9)
