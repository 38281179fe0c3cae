"""An emulator of the GraphRAG HTTP API that `switchgear.adapters.graphrag` defines.

`POST /v1/index` queues a job (202) that "indexes" the documents in the background (entities
= capitalised words, relationships = entities that share a sentence); `GET /v1/index/{id}`
reports queued → running → succeeded; `POST /v1/query` answers from the indexed documents
(local: documents naming the query's entities; global: community summaries; drift/basic:
keyword match) with `context` and LLM-like `usage`. `GET /health`.

Errors `{"error": {"type", "message"}}`: 400 invalid_request, 401 authentication (Bearer
key), 404 not_found, 413 too_many_documents (over `max_documents`), and the injected 429 /
5xx of `emulators.common`. CLI: `switchgear emulate graphrag --port P [--api-key K]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
from typing import Any

import orjson
from aiohttp import web

from switchgear.emulators import common
from switchgear.emulators import openai as oa

_STATE = web.AppKey("graphrag", dict)
_ENTITY = re.compile(r"\b[A-Z][a-zA-Z]+\b")
_TYPES = {
    400: "invalid_request",
    401: "authentication",
    404: "not_found",
    413: "too_many_documents",
    429: "rate_limited",
}


def render(status: int, message: str, kind: str) -> web.Response:
    return common.json_response({"error": {"type": _TYPES.get(status, "server_error"), "message": message}}, status)


def _auth_ok(request: web.Request) -> bool:
    expected = request.app[common.INSTANCE].spec.api_key
    return expected is None or request.headers.get("Authorization") == f"Bearer {expected}"


def extract(text: str) -> tuple[set[str], set[tuple[str, str]]]:
    """Entities (capitalised words) and relationships (entity pairs sharing a sentence)."""
    entities: set[str] = set()
    relations: set[tuple[str, str]] = set()
    for sentence in re.split(r"[.!?]\s*", text):
        found = sorted(set(_ENTITY.findall(sentence)))
        entities.update(found)
        relations.update((a, b) for i, a in enumerate(found) for b in found[i + 1 :])
    return entities, relations


async def _json(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None


async def index(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    body = await _json(request)
    docs = body.get("documents") if isinstance(body, dict) else None
    if not isinstance(docs, list) or not docs:
        return render(400, "documents: required non-empty list", "invalid")
    for i, d in enumerate(docs):
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not isinstance(d.get("text"), str):
            return render(400, f"documents[{i}]: needs string id and text", "invalid")
    if len(docs) + (len(state["documents"]) if body.get("update") else 0) > state["max_documents"]:
        return render(413, f"at most {state['max_documents']} documents per index", "too_large")
    job_id = "job_" + hashlib.sha256(f"{len(state['jobs'])}:{docs[0]['id']}".encode()).hexdigest()[:16]
    state["jobs"][job_id] = {"job_id": job_id, "status": "queued", "progress": 0.0}
    task = asyncio.ensure_future(_run_job(state, job_id, docs, bool(body.get("update"))))
    state["tasks"].add(task)
    task.add_done_callback(state["tasks"].discard)
    return common.json_response({"job_id": job_id, "status": "queued", "documents": len(docs)}, 202)


async def _run_job(state: dict[str, Any], job_id: str, docs: list[dict[str, Any]], update: bool) -> None:
    job = state["jobs"][job_id]
    await asyncio.sleep(state["job_delay_s"])
    job.update(status="running", progress=0.5)
    await asyncio.sleep(state["job_delay_s"])
    if not update:
        state["documents"].clear()
    for d in docs:
        state["documents"][d["id"]] = d["text"]
    job.update(status="succeeded", progress=1.0)


async def job_status(request: web.Request) -> web.StreamResponse:
    job = request.app[_STATE]["jobs"].get(request.match_info["job_id"])
    if job is None:
        return render(404, f"no index job {request.match_info['job_id']!r}", "not_found")
    return common.json_response(job)


async def query(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    body = await _json(request)
    if not isinstance(body, dict) or not isinstance(body.get("query"), str) or not body["query"]:
        return render(400, "query: required non-empty string", "invalid")
    method = body.get("method", "local")
    if method not in ("local", "global", "drift", "basic"):
        return render(400, "method: must be local, global, drift or basic", "invalid")
    words = {w.lower() for w in re.findall(r"\w+", body["query"])}
    hits = [
        (doc_id, text)
        for doc_id, text in sorted(state["documents"].items())
        if words & {w.lower() for w in re.findall(r"\w+", text)}
    ]
    entities: set[str] = set()
    relations: set[tuple[str, str]] = set()
    for _, text in hits:
        e, r = extract(text)
        entities |= e
        relations |= r
    response = (
        f"[{method}] {len(hits)} document(s) relate to the question. Entities: "
        f"{', '.join(sorted(entities)[:10]) or 'none'}."
    )
    context = {
        "entities": sorted(entities),
        "relationships": [list(r) for r in sorted(relations)],
        "sources": [doc_id for doc_id, _ in hits],
    }
    prompt_tokens = oa.count_tokens(body["query"]) + sum(oa.count_tokens(t) for _, t in hits)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": oa.count_tokens(response),
        "llm_calls": 1 if method != "global" else 2,
    }
    return common.json_response({"response": response, "method": method, "context": context, "usage": usage})


async def health(request: web.Request) -> web.StreamResponse:
    return common.json_response({"status": "ok"})


def build_app(
    api_key: str | None = None,
    *,
    max_documents: int = 1000,
    job_delay_s: float = 0.02,
    latency_ms: float = 0.0,
    faults: common.Faults | None = None,
) -> web.Application:
    spec = common.InstanceSpec(
        name="graphrag", api_key=api_key, latency_ms=latency_ms, faults=faults or common.Faults()
    )
    app = common.new_app(spec, [common.gated(render, _auth_ok)])
    app[_STATE] = {
        "documents": {},
        "jobs": {},
        "tasks": set(),
        "max_documents": max_documents,
        "job_delay_s": job_delay_s,
    }
    app.router.add_post("/v1/index", index)
    app.router.add_get("/v1/index/{job_id}", job_status)
    app.router.add_post("/v1/query", query)
    app.router.add_get("/health", health)
    return app


async def start(api_key: str | None = None, **kwargs: Any) -> common.Running:
    return await common.run_app(build_app(api_key, **kwargs))


def _build(args: argparse.Namespace) -> web.Application:
    return build_app(args.api_key, latency_ms=args.latency_ms)


main = common.cli("graphrag", _build)
