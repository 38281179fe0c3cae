"""Secrets are references: resolved on the agent at call time, never stored, sent or logged."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import orjson
import pytest

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.test_end_to_end import wait_until

pytestmark = pytest.mark.timeout(90)

KEY = "test-upstream-key-0f3c9a7e"  # what the emulator demands; only the agent's env holds it
KEY_VAR = "SWITCHGEAR_TEST_UPSTREAM_KEY"


def chat(address: str) -> gateway_pb2.InvokeResponse:
    payload = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
    with grpc.insecure_channel(address) as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(
            gateway_pb2.InvokeRequest(service="keyed", method="chat.completions", payload=payload), timeout=10
        )


def test_api_key_is_resolved_on_the_agent_and_leaks_nowhere(tmp_path: Path) -> None:
    procs: list[Proc] = []

    def start(proc: Proc, **kw: object) -> str:
        procs.append(proc)
        return proc.start(**kw)  # type: ignore[arg-type]

    try:
        ports = json.loads("{" + start(Proc.switchgear(
            "emulator", ["emulate", "openai", "--instance", "u:0", "--api-key", KEY], tmp_path), ready_prefix="{"))
        cp = start(Proc.switchgear("cp", ["controlplane", "--admin-auth", "none", "--db", str(tmp_path / "r.db"), "--listen", "127.0.0.1:0"], tmp_path))
        with_key = start(Proc.switchgear(
            "agent-with-key", ["agent", "--auth", "none", "--control-plane", cp, "--listen", "127.0.0.1:0", "--node-id", "with-key",
                               "--agent-token-file", str(tmp_path / "r.db.agent-token")],
            tmp_path, env={KEY_VAR: KEY}))
        without_key = start(Proc.switchgear(
            "agent-without-key", ["agent", "--auth", "none", "--control-plane", cp, "--listen", "127.0.0.1:0",
                                  "--node-id", "without-key", "--agent-token-file", str(tmp_path / "r.db.agent-token")],
            tmp_path, env={KEY_VAR: ""}))
        service = common_pb2.Service(
            name="keyed", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", model="gpt-4o-mini",
            endpoints=[common_pb2.Endpoint(id="u", url=f"http://127.0.0.1:{ports['u']}/v1", weight=1)],
            api_key=common_pb2.SecretRef(env=KEY_VAR),
        )
        admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cp))
        version = admin.RegisterService(admin_pb2.RegisterServiceRequest(service=service), timeout=5).version

        def both_acked() -> bool:
            agents = admin.ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
            return len(agents) == 2 and all(a.acked_version == version for a in agents)

        wait_until(both_acked, what="both agents to ACK")

        assert orjson.loads(chat(with_key).payload)["object"] == "chat.completion"  # the emulator took the key
        with pytest.raises(grpc.RpcError) as info:
            chat(without_key)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert f"env:{KEY_VAR} is not set on this agent" in info.value.details()  # type: ignore[attr-defined]

        snapshot = admin.GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5).snapshot
        assert snapshot.services[0].api_key.env == KEY_VAR
        evidence = snapshot.SerializeToString() + b"".join(p.read_bytes() for p in tmp_path.glob("r.db*"))
        for proc in procs:
            proc.stop()
        evidence += b"".join(p.read_bytes() for p in tmp_path.glob("*.log"))
        assert KEY_VAR.encode() in evidence  # the reference is everywhere ...
        assert KEY.encode() not in evidence  # ... the value nowhere
    finally:
        for proc in procs:
            proc.stop()
