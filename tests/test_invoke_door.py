"""The front door's POST /v1/invoke (invoke_door.py): Gateway.Invoke in JSON for every category,
against live emulators (a Pinecone index, an OpenAI model) behind keys and tenants; every refusal
in the door's error shape, naming the field, reaching no upstream and counting against nothing."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchgear.dataplane import http as front_door
from switchgear.dataplane.convert import MAX_JSON_DEPTH, RequestError
from switchgear.dataplane.http_door import DoorLimits
from switchgear.dataplane.invoke_door import KEYS, call_from_body
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer
from switchgear.dataplane.snapshot import Pricing, SecretRef
from switchgear.emulators import pinecone as pinecone_emu
from switchgear.emulators.openai import Faults, InstanceSpec, reply_text, start_instances
from tests.test_anthropic_door import KEY, NARROW_KEY, governance
from tests.test_stream import Agent, make_agent, snapshot, view

PROMPT = "hello invoke door"
PC_KEY = "pc-invoke-door-key"
VECTORS = [{"id": "a", "values": [1, 0, 0], "metadata": {"genre": "news"}},
           {"id": "b", "values": [0, 1, 0], "metadata": {"genre": "drama"}}]


class Door:
    def __init__(self, url: str, agent: Agent, index: Any, llm: Any) -> None:
        self.url, self.agent, self.index, self.llm = url, agent, index, llm

    async def post(self, body: object, key: str | None = KEY, **headers: str) -> httpx.Response:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.post(f"{self.url}/v1/invoke", content=raw,
                                     headers={"Content-Type": "application/json", **headers})

    def upstream_calls(self) -> int:
        return sum(self.index.instance.by_path.values()) + int(self.llm.stats("a")["total"])


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Door]:
    async with (
        await pinecone_emu.start(api_key=PC_KEY, index="knowledge-base", dimension=3,
                                 environment="us-west1-gcp") as index,
        await start_instances([InstanceSpec("a")]) as llm,
    ):
        snap = snapshot(
            dataclasses.replace(view("vectors", "pinecone", [index.url], category="vector_db",
                                     options={"index_name": "knowledge-base", "environment": "us-west1-gcp",
                                              "namespace": "ns1"}),
                                api_key=SecretRef(env="PC_KEY")),
            view("gpt-mini", "openai", [llm.urls["a"]], model="gpt-4o-mini", pricing=Pricing(cost_per_1k_tokens=1.0)),
        )
        agent = make_agent(dataclasses.replace(snap, governance=governance()), env={"PC_KEY": PC_KEY})
        pipeline = Pipeline(agent.invoker.invoke, auth_required=True, quotas=QuotaEnforcer(LocalCounters()),
                            cache=None)
        limits = DoorLimits(max_body_bytes=64 * 1024, max_buffered_bytes=1024 * 1024, body_timeout_s=0.5)
        runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0",
                                                 pipeline, limits=limits)
        try:
            yield Door(f"http://{address}", agent, index, llm)
        finally:
            await runner.cleanup()
            await agent.pool.close()


@pytest.fixture
async def door() -> AsyncIterator[Door]:
    async with serving() as running:
        yield running


async def test_a_vector_database_over_http(door: Door) -> None:
    upserted = await door.post({"service": "vectors", "method": "upsert", "payload": {"vectors": VECTORS,
                                "namespace": "ns1"}}, **{"x-request-id": "req-upsert-1"})
    assert upserted.status_code == 200, upserted.text
    body = upserted.json()
    assert body["payload"] == {"upsertedCount": 2}
    assert body["request_id"] == "req-upsert-1" == upserted.headers["x-request-id"]
    assert (body["service"], body["endpoint"], body["attempts"], body["tenant"]) == ("vectors", "e0", 1, "acme")
    assert body["cached"] is False and body["fallback"] is False and body["target"]["protocol"] == "pinecone"
    assert upserted.headers["x-switchgear-endpoint"] == "e0"
    found = await door.post({"service": "vectors", "method": "query", "category": "vector_db", "priority": 9,
                             "timeout": 5, "max_retries": 0, "user_id": "u1", "session_id": "s1",
                             "payload": {"vector": [0.9, 0.1, 0], "topK": 1, "namespace": "ns1",
                                         "includeMetadata": True}})
    assert found.status_code == 200, found.text
    assert [m["id"] for m in found.json()["payload"]["matches"]] == ["a"]
    assert door.agent.recorder.started[-1].priority == 9


async def test_an_llm_call_is_metered_as_on_the_other_routes(door: Door) -> None:
    answer = await door.post({"service": "gpt-mini", "method": "chat.completions",
                              "payload": {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 20}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["payload"]["choices"][0]["message"]["content"] == reply_text("a", PROMPT)
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] > 0
    assert body["usage"]["cost_usd"] > 0 and float(answer.headers["x-switchgear-cost-usd"]) == pytest.approx(
        body["usage"]["cost_usd"], abs=1e-8)
    assert body["target"]["model"] == "gpt-4o-mini" and body["latency_s"] > 0


def _error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}  # OpenAI's shape, this door's
    return error  # type: ignore[no-any-return]


GOOD = {"service": "vectors", "method": "query", "payload": {"vector": [1, 0, 0], "topK": 1}}


@pytest.mark.parametrize(("body", "field"), [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    ({**GOOD, "request_id": "mine"}, "request_id"),
    ({**GOOD, "model": "vectors"}, "model"),
    ({"method": "query"}, "service"),
    ({**GOOD, "service": ""}, "service"),
    ({**GOOD, "service": 7}, "service"),
    ({**GOOD, "service": "v" * 300}, "service"),
    ({**GOOD, "method": None}, "method"),
    ({**GOOD, "payload": [1]}, "payload"),
    ({**GOOD, "payload": "text"}, "payload"),
    ({**GOOD, "priority": 11}, "priority"),
    ({**GOOD, "priority": True}, "priority"),
    ({**GOOD, "priority": 2.5}, "priority"),
    ({**GOOD, "timeout": -1}, "timeout"),
    ({**GOOD, "timeout": 1e12}, "timeout"),
    ({**GOOD, "timeout": "5"}, "timeout"),
    ({**GOOD, "max_retries": -1}, "max_retries"),
    ({**GOOD, "max_retries": 50}, "max_retries"),  # over the route's retry policy (2)
    ({**GOOD, "category": "vectors"}, "category"),
    ({**GOOD, "user_id": ["u"]}, "user_id"),
    ({**GOOD, "session_id": 3}, "session_id"),
    ({**GOOD, "stream": "yes"}, "stream"),
])
async def test_malformed_bodies_name_the_field_and_reach_no_upstream(door: Door, body: object, field: str) -> None:
    answer = await door.post(body)
    assert answer.status_code == 400, answer.text
    error = _error(answer)
    assert error["param"] == field and error["type"] == "invalid_request_error", error
    assert door.upstream_calls() == 0 and door.agent.recorder.started == []


async def test_deep_payloads_and_oversized_bodies_are_refused(door: Door) -> None:
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = {"x": deep}
    answer = await door.post({**GOOD, "payload": deep})
    assert answer.status_code == 400 and "deeper" in _error(answer)["message"]
    big = await door.post({**GOOD, "payload": {"vector": [0.5] * 40_000}})  # ~200 KB over the 64 KiB limit
    assert big.status_code == 413 and _error(big)["code"] == "request_too_large"
    assert door.upstream_calls() == 0


async def test_keys_and_tenants(door: Door) -> None:
    anonymous = await door.post(GOOD, key=None)
    assert anonymous.status_code == 401 and _error(anonymous)["code"] == "invalid_api_key"
    forged = await door.post(GOOD, key="sg-k1-not-the-secret")
    assert forged.status_code == 401
    narrow = await door.post(GOOD, key=NARROW_KEY)  # a tenant allowed gpt-mini only
    assert narrow.status_code == 403, narrow.text
    assert "vectors" in _error(narrow)["message"]
    allowed = await door.post({"service": "gpt-mini", "method": "chat.completions",
                               "payload": {"messages": [{"role": "user", "content": PROMPT}]}}, key=NARROW_KEY)
    assert allowed.status_code == 200 and allowed.json()["tenant"] == "narrow"
    assert sum(door.index.instance.by_path.values()) == 0  # only gpt-mini was reached


async def test_unknown_service_method_and_category_mismatch(door: Door) -> None:
    missing = await door.post({**GOOD, "service": "nope"})
    assert missing.status_code == 404 and _error(missing)["code"] == "model_not_found"
    wrong_category = await door.post({**GOOD, "category": "llm"})
    assert wrong_category.status_code == 400 and _error(wrong_category)["param"] == "category"
    assert door.upstream_calls() == 0


async def test_a_callers_mistakes_count_against_nothing_shared(door: Door) -> None:
    """An unknown method (the adapter's CLIENT refusal) again and again: answered 400 each time,
    and the endpoint still serves the next good call first try (no breaker opened, no ejection)."""
    for _ in range(12):
        bad = await door.post({**GOOD, "method": "drop_everything"})
        assert bad.status_code == 400, bad.text
        assert "drop_everything" in _error(bad)["message"]
    good = await door.post(GOOD)
    assert good.status_code == 200 and good.json()["attempts"] == 1 and good.json()["endpoint"] == "e0"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*KEYS, "request_id", "model", "stream"]),
                       st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                                    | st.floats(allow_nan=False) | st.text(max_size=8),
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)))
def test_any_body_is_a_call_or_a_refusal_naming_a_field(body: dict[str, Any]) -> None:
    try:
        call, stream = call_from_body(orjson.dumps(body), "r1", MAX_JSON_DEPTH)
    except RequestError as exc:
        assert exc.path in (*KEYS, "body", "request_id", "model", "stream") \
            or exc.path.startswith(("payload", "required_capabilities["))
        return
    assert call.service == body["service"] and call.method == body["method"] and 1 <= call.priority <= 10
    assert isinstance(call.payload, dict) and set(body) <= set(KEYS) and stream is (body.get("stream") is True)


def _events(raw: bytes) -> list[tuple[str, Any]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            kind, data = block.split("\n", 1)
            out.append((kind.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    return out


async def test_a_stream_is_invoke_streams_chunks_then_its_end(door: Door) -> None:
    answer = await door.post({"service": "gpt-mini", "method": "chat.completions", "stream": True,
                              "payload": {"messages": [{"role": "user", "content": PROMPT}], "stream": True,
                                          "stream_options": {"include_usage": True}}})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = _events(answer.content)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "end" and set(kinds[:-1]) == {"chunk"} and len(kinds) > 2
    text = "".join(c["choices"][0]["delta"].get("content") or "" for k, c in events[:-1] if c.get("choices"))
    assert text == reply_text("a", PROMPT)
    end = events[-1][1]
    assert end["error_kind"] == "" and end["endpoint"] == "e0" and end["usage"]["output_tokens"] > 0
    assert end["usage"]["cost_usd"] > 0 and end["target"]["model"] == "gpt-4o-mini" and end["ttft_s"] > 0


async def test_a_stream_cut_after_its_first_chunk_ends_naming_the_error(door: Door) -> None:
    door.llm.set_faults("a", Faults(stream_cut_after=2))
    answer = await door.post({"service": "gpt-mini", "method": "chat.completions", "stream": True,
                              "payload": {"messages": [{"role": "user", "content": PROMPT}], "stream": True}})
    assert answer.status_code == 200
    kind, end = _events(answer.content)[-1]
    assert kind == "end" and end["error_kind"] == "retryable" and end["error_message"]
    assert "127.0.0.1" not in end["error_message"]  # what callers see never names an upstream


async def test_a_method_that_does_not_stream_is_refused_before_any_event(door: Door) -> None:
    answer = await door.post({**GOOD, "stream": True})
    assert answer.status_code == 400 and _error(answer)["param"] == "method", answer.text
    assert "cannot stream" in _error(answer)["message"] and door.upstream_calls() == 0
