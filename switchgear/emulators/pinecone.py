"""A protocol-faithful Pinecone emulator (control API and one index's data plane) with faults.

Control API (as api.pinecone.io): `GET /indexes`, `GET /indexes/{name}` → `{"name",
"dimension", "metric", "host", "spec": {"serverless": {...}}, "status": {"ready": true,
"state": "Ready"}, "deletion_protection", "vector_type"}`. The `host` has no scheme, as
Pinecone's does: this same server, which also serves the index's data plane:
`POST /vectors/upsert`, `POST /query`, `GET /vectors/fetch?ids=..&namespace=..`,
`POST /vectors/delete`, `POST /describe_index_stats`.

Every request needs `Api-Key` (401 otherwise). Control errors: `{"error": {"code":
"NOT_FOUND", "message"}, "status": 404}`; data-plane errors: `{"code": 3, "message",
"details": []}` (gRPC codes: 3 invalid argument, 5 not found). Injected faults answer 429
`RESOURCE_EXHAUSTED` / 5xx `UNAVAILABLE` in the control shape. Vectors live in memory;
scores are cosine (or dotproduct / euclidean per `metric`). Filters: `{"k": v}`,
`{"k": {"$eq"|"$ne"|"$in"|"$nin"|"$gt"|"$gte"|"$lt"|"$lte": v}}`, `$and`, `$or`.
CLI: `switchgear emulate pinecone --port P --api-key K [--index NAME:DIM]`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from switchgear.emulators import common

_INDEX = web.AppKey("index", dict)
_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
    529: "UNAVAILABLE",
}


def render(status: int, message: str, kind: str) -> web.Response:
    if kind == "auth":
        message = "Invalid API Key"
    return common.json_response(
        {"error": {"code": _CODES.get(status, "UNKNOWN"), "message": message}, "status": status}, status
    )


def data_error(status: int, grpc_code: int, message: str) -> web.Response:
    return common.json_response({"code": grpc_code, "message": message, "details": []}, status)


def _auth_ok(request: web.Request) -> bool:
    expected = request.app[common.INSTANCE].spec.api_key
    return expected is None or request.headers.get("Api-Key") == expected


# ---------------------------------------------------------------------------------------
# pure parts


def score(metric: str, a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    if metric == "dotproduct":
        return dot
    if metric == "euclidean":
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def matches(flt: Any, metadata: Mapping[str, Any]) -> bool:
    """Pinecone's metadata filter language (the common operators)."""
    if not flt:
        return True
    for key, cond in flt.items():
        if key == "$and":
            if not all(matches(c, metadata) for c in cond):
                return False
        elif key == "$or":
            if not any(matches(c, metadata) for c in cond):
                return False
        elif not _match_field(metadata.get(key), cond):
            return False
    return True


def _match_field(value: Any, cond: Any) -> bool:
    if not isinstance(cond, dict):
        cond = {"$eq": cond}
    ops: dict[str, Callable[[Any, Any], bool]] = {
        "$eq": lambda v, c: v == c,
        "$ne": lambda v, c: v != c,
        "$in": lambda v, c: v in c,
        "$nin": lambda v, c: v not in c,
        "$gt": lambda v, c: v is not None and v > c,
        "$gte": lambda v, c: v is not None and v >= c,
        "$lt": lambda v, c: v is not None and v < c,
        "$lte": lambda v, c: v is not None and v <= c,
    }
    return all(op in ops and ops[op](value, c) for op, c in cond.items())


# ---------------------------------------------------------------------------------------
# handlers


def _index(request: web.Request) -> dict[str, Any]:
    return request.app[_INDEX]


def _description(request: web.Request) -> dict[str, Any]:
    index = _index(request)
    host = request.host  # "127.0.0.1:PORT": Pinecone's hosts carry no scheme
    return {
        "name": index["name"],
        "dimension": index["dimension"],
        "metric": index["metric"],
        "host": host,
        "spec": _spec(index["environment"]),
        "status": {"ready": True, "state": "Ready"},
        "deletion_protection": "disabled",
        "vector_type": "dense",
        "tags": None,
    }


def _spec(environment: str) -> dict[str, Any]:
    """A serverless index on aws us-east-1, or a pod index in `environment` when one is given."""
    if environment:
        return {"pod": {"environment": environment, "pod_type": "p1.x1", "pods": 1, "replicas": 1, "shards": 1}}
    return {"serverless": {"cloud": "aws", "region": "us-east-1"}}


async def list_indexes(request: web.Request) -> web.StreamResponse:
    return common.json_response({"indexes": [_description(request)]})


async def describe_index(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name != _index(request)["name"]:
        return render(404, f"Resource {name} not found", "not_found")
    return common.json_response(_description(request))


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return data_error(400, 3, "Invalid request body: expected JSON")
    return body if isinstance(body, dict) else data_error(400, 3, "Invalid request body: expected an object")


def _space(index: dict[str, Any], namespace: Any) -> dict[str, dict[str, Any]]:
    spaces: dict[str, dict[str, dict[str, Any]]] = index["namespaces"]
    return spaces.setdefault(str(namespace or ""), {})


async def upsert(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    index = _index(request)
    vectors = body.get("vectors")
    if not isinstance(vectors, list) or not vectors:
        return data_error(400, 3, "Invalid request: vectors must be a non-empty array")
    for i, v in enumerate(vectors):
        if not isinstance(v, dict) or not isinstance(v.get("id"), str) or not isinstance(v.get("values"), list):
            return data_error(400, 3, f"Invalid request: vectors[{i}] needs an id and values")
        if len(v["values"]) != index["dimension"]:
            return data_error(
                400,
                3,
                f"Vector dimension {len(v['values'])} does not match the dimension of the index {index['dimension']}",
            )
    space = _space(index, body.get("namespace"))
    for v in vectors:
        space[v["id"]] = {"id": v["id"], "values": [float(x) for x in v["values"]], "metadata": v.get("metadata") or {}}
    return common.json_response({"upsertedCount": len(vectors)})


async def query(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    index = _index(request)
    top_k = body.get("topK")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 10_000:
        return data_error(400, 3, "Invalid request: topK must be an integer within 1..10000")
    space = _space(index, body.get("namespace"))
    vector = body.get("vector")
    if vector is None and isinstance(body.get("id"), str):
        found = space.get(body["id"])
        vector = found["values"] if found else None
    if not isinstance(vector, list) or len(vector) != index["dimension"]:
        return data_error(
            400, 3, f"Query vector dimension does not match the dimension of the index {index['dimension']}"
        )
    scored = [
        (score(index["metric"], vector, v["values"]), v)
        for v in space.values()
        if matches(body.get("filter"), v["metadata"])
    ]
    scored.sort(key=lambda p: p[0], reverse=index["metric"] != "euclidean")
    result = []
    for s, v in scored[:top_k]:
        match: dict[str, Any] = {"id": v["id"], "score": s, "values": v["values"] if body.get("includeValues") else []}
        if body.get("includeMetadata"):
            match["metadata"] = v["metadata"]
        result.append(match)
    return common.json_response(
        {"results": [], "matches": result, "namespace": str(body.get("namespace") or ""), "usage": {"readUnits": 5}}
    )


async def fetch(request: web.Request) -> web.StreamResponse:
    ids = request.query.getall("ids", [])
    if not ids:
        return data_error(400, 3, "Invalid request: ids is required")
    space = _space(_index(request), request.query.get("namespace"))
    vectors = {i: space[i] for i in ids if i in space}
    return common.json_response(
        {"vectors": vectors, "namespace": request.query.get("namespace", ""), "usage": {"readUnits": 1}}
    )


async def delete(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    space = _space(_index(request), body.get("namespace"))
    if body.get("deleteAll") is True:
        space.clear()
    elif isinstance(body.get("ids"), list):
        for i in body["ids"]:
            space.pop(str(i), None)
    elif isinstance(body.get("filter"), dict):
        for key in [k for k, v in space.items() if matches(body["filter"], v["metadata"])]:
            del space[key]
    else:
        return data_error(400, 3, "Invalid request: one of ids, deleteAll or filter is required")
    return common.json_response({})


async def stats(request: web.Request) -> web.StreamResponse:
    index = _index(request)
    namespaces = {name: {"vectorCount": len(space)} for name, space in index["namespaces"].items()}
    return common.json_response(
        {
            "namespaces": namespaces,
            "dimension": index["dimension"],
            "indexFullness": 0.0,
            "totalVectorCount": sum(len(s) for s in index["namespaces"].values()),
            "metric": index["metric"],
            "vectorType": "dense",
        }
    )


def build_app(
    api_key: str | None,
    index: str = "knowledge-base",
    dimension: int = 4,
    metric: str = "cosine",
    latency_ms: float = 0.0,
    faults: common.Faults | None = None,
    environment: str = "",
) -> web.Application:
    spec = common.InstanceSpec(
        name="pinecone", api_key=api_key, latency_ms=latency_ms, faults=faults or common.Faults()
    )
    app = common.new_app(spec, [common.gated(render, _auth_ok)])
    app[_INDEX] = {"name": index, "dimension": dimension, "metric": metric, "namespaces": {},
                   "environment": environment}
    app.router.add_get("/indexes", list_indexes)
    app.router.add_get("/indexes/{name}", describe_index)
    app.router.add_post("/vectors/upsert", upsert)
    app.router.add_post("/query", query)
    app.router.add_get("/vectors/fetch", fetch)
    app.router.add_post("/vectors/delete", delete)
    app.router.add_post("/describe_index_stats", stats)
    return app


async def start(api_key: str | None = "pc-key", **kwargs: Any) -> common.Running:
    return await common.run_app(build_app(api_key, **kwargs))


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", default="knowledge-base:4", metavar="NAME:DIM")
    parser.add_argument("--environment", default="", metavar="ENV",
                        help="answer a pod index in ENV (e.g. us-west1-gcp); default: serverless, aws us-east-1")


def _build(args: argparse.Namespace) -> web.Application:
    name, _, dim = args.index.partition(":")
    return build_app(args.api_key, name, int(dim or 4), latency_ms=args.latency_ms, environment=args.environment)


main = common.cli("pinecone", _build, _extra)
