"""The OpenAI emulator served on port 0, driven by OpenAIAdapter and by raw httpx."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from switchgear.adapters.base import AdapterRequest, AdapterResponse, ErrorKind, Target, UpstreamError
from switchgear.adapters.openai import OpenAIAdapter
from switchgear.emulators.openai import (
    EmulatorGroup,
    Faults,
    InstanceSpec,
    count_tokens,
    go_duration,
    parse_chat,
    parse_instance,
    reply_text,
    start_instances,
    token_pieces,
)

KEY = "sk-emulator-key-0123456789"
PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPT}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}


@asynccontextmanager
async def emulator(*specs: InstanceSpec) -> AsyncIterator[EmulatorGroup]:
    group = await start_instances(specs or (InstanceSpec("alpha"),))
    try:
        yield group
    finally:
        await group.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


async def call(
    client: httpx.AsyncClient, url: str, *, api_key: str | None = None, timeout_s: float = 2.0, payload: Any = None
) -> AdapterResponse:
    target = Target(url, model="gpt-4o-mini", api_key=api_key)
    request = AdapterRequest("chat.completions", payload or {"messages": MESSAGES}, timeout_s, "req-1")
    return await OpenAIAdapter().invoke(client, target, request)


async def call_error(client: httpx.AsyncClient, url: str, **kwargs: Any) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await call(client, url, **kwargs)
    return caught.value


def admin(group: EmulatorGroup, name: str = "alpha") -> str:
    return group.urls[name].removesuffix("/v1") + "/_emulator"


# ---------------------------------------------------------------------------------------
# success paths


async def test_chat_success_with_deterministic_content_and_usage(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha"), InstanceSpec("beta")) as group:
        first = await call(client, group.urls["alpha"])
        again = await call(client, group.urls["alpha"])
        other = await call(client, group.urls["beta"])
    body = orjson.loads(first.body)
    content = body["choices"][0]["message"]["content"]
    assert content == reply_text("alpha", PROMPT) == orjson.loads(again.body)["choices"][0]["message"]["content"]
    assert "alpha" in content and content != orjson.loads(other.body)["choices"][0]["message"]["content"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt_tokens = count_tokens("Answer briefly.") + count_tokens(PROMPT)
    assert body["usage"] == {**body["usage"], "prompt_tokens": prompt_tokens, "completion_tokens": count_tokens(content), "total_tokens": prompt_tokens + count_tokens(content)}
    assert (first.usage.input_tokens, first.usage.output_tokens, first.usage.estimated) == (prompt_tokens, count_tokens(content), False)


async def test_openai_response_headers(client: httpx.AsyncClient) -> None:
    async with emulator() as group:
        response = await client.post(group.urls["alpha"] + "/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")
    assert int(response.headers["openai-processing-ms"]) >= 0
    for name in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"):
        assert response.headers[name]


async def test_max_tokens_cuts_with_finish_reason_length(client: httpx.AsyncClient) -> None:
    async with emulator() as group:
        response = await call(client, group.urls["alpha"], payload={"messages": MESSAGES, "max_tokens": 3})
    body = orjson.loads(response.body)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "Hello from alpha"
    assert response.usage.output_tokens == 3


def parse_sse(raw: str) -> list[str]:
    """The data of each event, per the SSE spec: `data:` lines joined by \\n, dispatched on a blank line."""
    events: list[str] = []
    data: list[str] = []
    for line in raw.split("\n"):
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    assert data == [], "stream ended mid-event"
    return events


async def test_streaming_frames(client: httpx.AsyncClient) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with emulator() as group:
        url = group.urls["alpha"] + "/chat/completions"
        async with client.stream("POST", url, json=body) as response:
            raw = "".join([text async for text in response.aiter_text()])
        plain = orjson.loads((await call(client, group.urls["alpha"])).body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith("data: [DONE]\n\n") and raw.count("\n\n") == raw.count("data: ")
    events = parse_sse(raw)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    *choice_chunks, usage_chunk = chunks
    assert choice_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in choice_chunks] == [None] * (len(choice_chunks) - 1) + ["stop"]
    assert all(c["usage"] is None for c in choice_chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in choice_chunks)
    assert content == plain["choices"][0]["message"]["content"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]


async def test_stream_without_include_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    async with emulator() as group:
        response = await client.post(group.urls["alpha"] + "/chat/completions", json={**CHAT, "stream": True, "max_tokens": 2})
    chunks = [orjson.loads(e) for e in parse_sse(response.text)[:-1]]
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == ["Hello", " from"]


async def test_models_and_embeddings(client: httpx.AsyncClient) -> None:
    spec = InstanceSpec("alpha", model_ids=("gpt-4o-mini", "text-embedding-3-small"))
    async with emulator(spec, InstanceSpec("beta")) as group:
        base = group.urls["alpha"]
        models = (await client.get(base + "/models")).json()
        one = await client.get(base + "/models/gpt-4o-mini")
        absent = await client.get(base + "/models/gpt-9")
        body = {"model": "text-embedding-3-small", "input": ["hello world", "bye"], "dimensions": 8}
        emb = (await client.post(base + "/embeddings", json=body)).json()
        emb_beta = (await client.post(group.urls["beta"] + "/embeddings", json=body)).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == list(spec.model_ids)
    assert one.json() == models["data"][0] and one.json()["object"] == "model"
    assert absent.status_code == 404 and absent.json()["error"]["code"] == "model_not_found"
    vectors = [d["embedding"] for d in emb["data"]]
    assert [len(v) for v in vectors] == [8, 8] and vectors[0] != vectors[1]
    assert all(math.isclose(sum(x * x for x in v), 1.0) for v in vectors)
    assert emb_beta["data"] == emb["data"]  # same model + input → same vector on every instance
    assert emb["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


# ---------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"messages": MESSAGES}, 400, "model", "missing_required_parameter"),
        ({"model": "gpt-4o-mini"}, 400, "messages", "missing_required_parameter"),
        ({"model": "gpt-4o-mini", "messages": "hi"}, 400, "messages", "invalid_type"),
        ({"model": "gpt-4o-mini", "messages": []}, 400, "messages", "empty_array"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
        ({"model": "gpt-4o-mini", "messages": [MESSAGES[0], {"content": "x"}]}, 400, "messages[1].role", "missing_required_parameter"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
        ({**CHAT, "max_tokens": "10"}, 400, "max_tokens", "invalid_type"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens", "integer_below_min_value"),
        ({**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
        ({"model": "gpt-9", "messages": MESSAGES}, 404, None, "model_not_found"),
    ],
)
async def test_validation_errors_name_the_param(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    async with emulator() as group:
        response = await client.post(group.urls["alpha"] + "/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


async def test_bad_role_through_adapter_is_client_with_body(client: httpx.AsyncClient) -> None:
    async with emulator() as group:
        error = await call_error(client, group.urls["alpha"], payload={"messages": [{"role": "robot", "content": "x"}]})
    assert (error.kind, error.status) == (ErrorKind.CLIENT, 400)
    assert orjson.loads(error.body)["error"]["param"] == "messages[0].role"


async def test_context_window_gives_context_length(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha", context_window=5)) as group:
        error = await call_error(client, group.urls["alpha"])
    assert (error.kind, error.status) == (ErrorKind.CONTEXT_LENGTH, 400)
    assert "maximum context length is 5 tokens" in error.message


async def test_api_key_checked(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha", api_key=KEY)) as group:
        url = group.urls["alpha"]
        ok = await call(client, url, api_key=KEY)
        wrong = await call_error(client, url, api_key="sk-wrong-key-000000000")
        absent = await call_error(client, url)
    assert ok.status == 200
    assert (wrong.kind, wrong.status, orjson.loads(wrong.body)["error"]["code"]) == (ErrorKind.AUTH, 401, "invalid_api_key")
    assert "sk-wrong-key-000000000" not in wrong.message and "sk-***0000" in wrong.message
    assert (absent.kind, absent.status) == (ErrorKind.AUTH, 401)


async def test_rate_limit_rate_gives_retry_after(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha", faults=Faults(rate_limit_rate=1.0, retry_after_s=3.0))) as group:
        error = await call_error(client, group.urls["alpha"])
    assert (error.kind, error.status, error.retry_after_s) == (ErrorKind.RATE_LIMITED, 429, 3.0)
    assert orjson.loads(error.body)["error"]["code"] == "rate_limit_exceeded"


async def test_token_bucket_admits_burst_then_limits(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha", faults=Faults(rate_limit_rps=1.0, rate_limit_burst=2.0))) as group:
        url = group.urls["alpha"]
        await call(client, url)
        await call(client, url)
        error = await call_error(client, url)
        raw = await client.post(url + "/chat/completions", json=CHAT)
    assert (error.kind, error.retry_after_s) == (ErrorKind.RATE_LIMITED, 1.0)  # < 1 s to the next token, rounded up
    assert raw.status_code == 429 and raw.headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
async def test_injected_server_errors_are_retryable(client: httpx.AsyncClient, status: int) -> None:
    async with emulator(InstanceSpec("alpha", faults=Faults(error_rate=1.0, error_status=status))) as group:
        error = await call_error(client, group.urls["alpha"])
    assert (error.kind, error.status) == (ErrorKind.RETRYABLE, status)
    assert "error" in orjson.loads(error.body)


async def test_hang_times_out_within_adapter_timeout(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha", faults=Faults(hang=True))) as group:
        started = time.monotonic()
        error = await call_error(client, group.urls["alpha"], timeout_s=0.2)
        elapsed = time.monotonic() - started
        stats = group.stats("alpha")
    assert error.kind is ErrorKind.TIMEOUT
    assert 0.2 <= elapsed < 0.6
    assert stats["by_outcome"] == {"hang": 1}


async def test_drop_is_retryable(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha", faults=Faults(drop=True))) as group:
        error = await call_error(client, group.urls["alpha"])
    assert (error.kind, error.status) == (ErrorKind.RETRYABLE, None)


async def test_latency_delays_the_answer(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha", latency_ms=150)) as group:
        started = time.monotonic()
        await call(client, group.urls["alpha"])
        elapsed = time.monotonic() - started
        with pytest.raises(UpstreamError) as caught:
            await call(client, group.urls["alpha"], timeout_s=0.05)
    assert elapsed >= 0.15
    assert caught.value.kind is ErrorKind.TIMEOUT


async def test_fail_next_fails_exactly_n_and_counts_down(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha", faults=Faults(fail_next=2, error_status=502))) as group:
        url = group.urls["alpha"]
        kinds = []
        for _ in range(3):
            try:
                await call(client, url)
                kinds.append("ok")
            except UpstreamError as error:
                kinds.append(f"{error.kind.value}:{error.status}")
            kinds.append(str((await client.get(admin(group) + "/faults")).json()["fail_next"]))
    assert kinds == ["retryable:502", "1", "retryable:502", "0", "ok", "0"]


async def test_seeded_error_rate_is_reproducible(client: httpx.AsyncClient) -> None:
    faults = Faults(error_rate=0.5, seed=7)
    async with emulator(InstanceSpec("alpha", faults=faults), InstanceSpec("beta", faults=faults)) as group:
        runs = []
        for name in ("alpha", "beta"):
            statuses = [(await client.get(group.urls[name] + "/models")).status_code for _ in range(12)]
            runs.append(statuses)
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 503}


async def test_runtime_fault_change(client: httpx.AsyncClient) -> None:
    async with emulator() as group:
        url, faults_url = group.urls["alpha"], admin(group) + "/faults"
        assert (await call(client, url)).status == 200
        changed = await client.post(faults_url, json={"error_rate": 1.0, "error_status": 529})
        failed = await call_error(client, url)
        bad = await client.post(faults_url, json={"error_rate": 2})
        unknown = await client.post(faults_url, json={"explode": True})
        reset = await client.post(faults_url, json={"reset": True})
        recovered = await call(client, url)
    assert changed.json()["error_rate"] == 1.0 and changed.json()["error_status"] == 529
    assert (failed.kind, failed.status) == (ErrorKind.RETRYABLE, 529)
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "error_rate")
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (400, "explode")
    assert reset.json() == Faults().to_json()
    assert recovered.status == 200


async def test_stats_count_paths_and_outcomes(client: httpx.AsyncClient) -> None:
    async with emulator(InstanceSpec("alpha", api_key=KEY)) as group:
        url = group.urls["alpha"]
        headers = {"Authorization": f"Bearer {KEY}"}
        await client.post(url + "/chat/completions", json=CHAT, headers=headers)
        await client.post(url + "/chat/completions", json={"model": "gpt-4o-mini"}, headers=headers)
        await client.post(url + "/chat/completions", json=CHAT)
        await client.get(url + "/models/gpt-4o", headers=headers)
        await client.get(url + "/models/gpt-4o-mini", headers=headers)
        await client.post(admin(group) + "/faults", json={"fail_next": 1})
        await client.get(url + "/models", headers=headers)
        stats = (await client.get(admin(group) + "/stats")).json()
        cleared = (await client.delete(admin(group) + "/stats")).json()
    assert stats == {
        "total": 6,
        "by_path": {"/v1/chat/completions": 3, "/v1/models/{model}": 2, "/v1/models": 1},
        "by_outcome": {"ok": 3, "invalid_request": 1, "unauthorized": 1, "error": 1},
        "disconnects": 0,
        "streamed": 0,
        "notes": {},
    }
    assert cleared == {"total": 0, "by_path": {}, "by_outcome": {}, "disconnects": 0, "streamed": 0, "notes": {}}


async def test_close_cuts_off_hanging_requests_quickly(client: httpx.AsyncClient) -> None:
    group = await start_instances([InstanceSpec("alpha", faults=Faults(hang=True))])
    pending = asyncio.create_task(client.get(group.urls["alpha"] + "/models", timeout=5.0))
    while group.stats("alpha")["by_outcome"].get("hang") != 1:
        await asyncio.sleep(0.005)
    started = time.monotonic()
    await group.close()
    with pytest.raises(httpx.TransportError):
        await pending
    assert time.monotonic() - started < 0.5


async def test_duplicate_names_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        await start_instances([InstanceSpec("a"), InstanceSpec("a")])


# ---------------------------------------------------------------------------------------
# pure helpers and the CLI


@pytest.mark.parametrize(
    ("text", "tokens"), [("", 0), ("Hello, world!", 4), ("a-b c", 4), ("  spaced   out  ", 2), ("naïve café", 2)]
)
def test_count_tokens_and_pieces(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens == len(token_pieces(text))
    assert "".join(token_pieces(text)) == (text if tokens else "")


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1.0, "1s"), (1.5, "1.5s"), (360.0, "6m0s"), (61.25, "1m1.25s")])
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a:0", ("a", 0.0, 0)), ("b:12.5:8081", ("b", 12.5, 8081)), ("c", None), (":5", None), ("d:x", None), ("e:1:99999", None)],
)
def test_parse_instance(text: str, expected: tuple[str, float, int] | None) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            parse_instance(text)
    else:
        spec = parse_instance(text)
        assert (spec.name, spec.latency_ms, spec.port) == expected


def test_cli_prints_ports_serves_and_exits_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "switchgear.emulators.openai", "--instance", "a:0", "--instance", "b:1",
               "--api-key", KEY, "--ready-file", str(ready)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()  # blocks until the instances listen
            ports = orjson.loads(line)
            assert set(ports) == {"a", "b"} and ready.read_bytes() == line
            headers = {"Authorization": f"Bearer {KEY}"}
            assert httpx.get(f"http://127.0.0.1:{ports['b']}/v1/models", headers=headers).status_code == 200
            assert httpx.get(f"http://127.0.0.1:{ports['a']}/v1/models").status_code == 401
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=5)
    assert code == 0


def test_tool_results_as_the_latest_turn_are_answered_with_text_unless_a_call_is_forced() -> None:
    """An agent loop ends: the question that named the tool is answered once with a call, then
    with text once the tool's result is the latest turn ("required" and a named tool still call)."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    assert parse_chat({"model": "m", "messages": ask, "tools": tools}, ["m"]).tools == ("weather",)
    turn = [*ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert parse_chat({"model": "m", "messages": turn, "tools": tools}, ["m"]).tools == ()
    assert parse_chat({"model": "m", "messages": turn, "tools": tools, "tool_choice": "required"},
                      ["m"]).tools == ("weather",)
    named = {"type": "function", "function": {"name": "weather"}}
    assert parse_chat({"model": "m", "messages": turn, "tools": tools, "tool_choice": named},
                      ["m"]).tools == ("weather",)
