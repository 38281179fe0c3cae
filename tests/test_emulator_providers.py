"""The Anthropic, Pinecone, GraphRAG and Unstructured emulators: wire details, faults, CLI."""

from __future__ import annotations

import json
import sys

import httpx
import pytest

from switchgear.emulators import anthropic, graphrag, pinecone, unstructured
from switchgear.emulators.common import Faults
from switchgear.supervise import Proc

HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
BODY = {"model": "claude-3-sonnet", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


async def test_anthropic_requires_version_header_and_validates_body() -> None:
    async with await anthropic.start(api_key="k") as up, httpx.AsyncClient(base_url=up.url) as client:
        missing = await client.post("/v1/messages", json=BODY, headers={"x-api-key": "k"})
        assert missing.status_code == 400 and missing.json()["error"]["message"].startswith("anthropic-version")
        no_max = await client.post("/v1/messages", json={**BODY, "max_tokens": None}, headers=HEADERS)
        assert no_max.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
        }
        unauth = await client.post("/v1/messages", json=BODY, headers={**HEADERS, "x-api-key": "bad"})
        assert unauth.status_code == 401 and unauth.json()["error"]["type"] == "authentication_error"
        ok = await client.post("/v1/messages", json=BODY, headers=HEADERS)
        assert ok.status_code == 200 and ok.json()["type"] == "message" and "request-id" in ok.headers


async def test_anthropic_overloaded_and_rate_limited_bodies() -> None:
    async with await anthropic.start() as up, httpx.AsyncClient(base_url=up.url) as client:
        set_faults = await client.post("/_emulator/faults", json={"fail_next": 1, "error_status": 529})
        assert set_faults.json()["fail_next"] == 1
        overloaded = await client.post("/v1/messages", json=BODY, headers=HEADERS)
        assert overloaded.status_code == 529
        assert overloaded.json() == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        up.set_faults(Faults(rate_limit_rate=1.0, retry_after_s=5))
        limited = await client.post("/v1/messages", json=BODY, headers=HEADERS)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "5"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        stats = (await client.get("/_emulator/stats")).json()
        assert stats["by_outcome"] == {"error": 1, "rate_limited": 1}


async def test_anthropic_sse_framing() -> None:
    async with await anthropic.start() as up, httpx.AsyncClient(base_url=up.url) as client:
        response = await client.post("/v1/messages", json={**BODY, "stream": True, "max_tokens": 2}, headers=HEADERS)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block.split("\n") for block in response.text.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(
        lines[1].startswith("data: {") and json.loads(lines[1][6:])["type"] == name
        for lines, name in zip(events, names, strict=True)
    )


def test_pinecone_filters_and_scores() -> None:
    meta = {"genre": "news", "year": 2020}
    assert pinecone.matches({"genre": "news"}, meta) and pinecone.matches({"year": {"$gte": 2019}}, meta)
    assert not pinecone.matches({"$or": [{"genre": "drama"}, {"year": {"$lt": 2000}}]}, meta)
    assert pinecone.matches({"$and": [{"genre": {"$in": ["news", "x"]}}, {"year": {"$ne": 1}}]}, meta)
    assert pinecone.score("cosine", [1, 0], [1, 0]) == pytest.approx(1.0)
    assert pinecone.score("euclidean", [0, 0], [3, 4]) == pytest.approx(5.0)


async def test_pinecone_needs_api_key_and_describes_its_own_host() -> None:
    async with await pinecone.start(api_key="pk") as up, httpx.AsyncClient(base_url=up.url) as client:
        assert (await client.get("/indexes/knowledge-base")).status_code == 401
        described = (await client.get("/indexes/knowledge-base", headers={"Api-Key": "pk"})).json()
        assert described["host"] == f"127.0.0.1:{up.port}" and described["status"]["ready"] is True
        bad = await client.post("/query", json={"vector": [1], "topK": 1}, headers={"Api-Key": "pk"})
        assert bad.status_code == 400 and bad.json()["code"] == 3


def test_graphrag_extraction() -> None:
    entities, relations = graphrag.extract("Alice met Bob. Carol stayed home.")
    assert entities == {"Alice", "Bob", "Carol"} and relations == {("Alice", "Bob")}


def test_unstructured_partitioning_rules() -> None:
    assert unstructured.partition_text("# Heading\n\nA sentence here.\n\n1. one\n2. two") == [
        ("Title", "Heading"),
        ("NarrativeText", "A sentence here."),
        ("ListItem", "one"),
        ("ListItem", "two"),
    ]
    assert unstructured.partition("a.pdf", b"%PDF", "utf-8") is None


@pytest.mark.parametrize("kind", ["anthropic", "pinecone", "graphrag", "unstructured"])
def test_cli_prints_the_port_and_serves(kind: str, tmp_path: object) -> None:
    proc = Proc(kind, [sys.executable, "-m", "switchgear", "emulate", kind, "--port", "0"], tmp_path)  # type: ignore[arg-type]
    try:
        port = json.loads("{" + proc.start(ready_prefix="{"))["port"]
        assert httpx.get(f"http://127.0.0.1:{port}/_emulator/faults", timeout=5).json()["latency_ms"] == 0.0
    finally:
        proc.stop()
