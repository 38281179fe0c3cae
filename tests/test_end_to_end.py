"""Both planes as real processes: control plane, agent and OpenAI emulators on loopback.

One story per test module (starting processes is the slow part): register -> ACK -> Invoke
-> control plane killed -> still served -> restarted on the same SQLite file -> reconverges;
a change the agent would not accept -> refused before it is committed, old one kept; a bad config
-> clear error, no change; unknown service and malformed requests -> the right codes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchgear.controlplane.snapshot import version_seq
from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.db = workdir / "registry.db"
        self.procs: list[Proc] = []
        self.cp: Proc | None = None
        self.cp_address = ""
        self.agent_address = ""
        self.urls: dict[str, str] = {}

    def start(self, proc: Proc, **kwargs: object) -> str:
        self.procs.append(proc)
        return proc.start(**kwargs)  # type: ignore[arg-type]

    def start_emulators(self) -> None:
        line = self.start(
            Proc.switchgear("emulators", ["emulate", "openai", "--instance", "a:0", "--instance", "b:0"], self.workdir),
            ready_prefix="{",
        )
        self.urls = {n: f"http://127.0.0.1:{p}/v1" for n, p in json.loads("{" + line).items()}

    def start_control_plane(self, listen: str = "127.0.0.1:0", config: Path | None = None) -> None:
        args = ["controlplane", "--admin-auth", "none", "--db", str(self.db), "--listen", listen]
        if config is not None:
            args += ["--config", str(config)]
        self.cp = Proc.switchgear("controlplane", args, self.workdir)
        self.cp_address = self.start(self.cp)

    def start_agent(self) -> None:
        agent = Proc.switchgear(
            "agent", ["agent", "--auth", "none", "--control-plane", self.cp_address, "--listen", "127.0.0.1:0",
                      "--node-id", "agent-1", "--agent-token-file", f"{self.db}.agent-token"],
            self.workdir,
        )
        self.agent_address = self.start(agent)

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(self.cp_address))

    def gateway(self) -> gateway_pb2_grpc.GatewayServiceStub:
        return gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(self.agent_address))

    def agent_status(self) -> admin_pb2.AgentStatus | None:
        agents = self.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
        return next((a for a in agents if a.node.id == "agent-1"), None)

    def acked(self, version: str) -> bool:
        status = self.agent_status()
        return status is not None and status.connected and status.acked_version == version

    def apply_config(self, yaml: str, source: str) -> str:
        """ApplyConfig, then wait for the agent to ACK its version (returned)."""
        reply = self.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=yaml, source=source), timeout=5)
        version = str(reply.version)
        wait_until(lambda: self.acked(version), what=f"the agent to ACK {source}")
        return version

    def register(self, name: str, *endpoints: tuple[str, str], options_json: str = "") -> str:
        service = common_pb2.Service(
            name=name, category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", model="gpt-4o-mini",
            endpoints=[common_pb2.Endpoint(id=i, url=u, weight=1) for i, u in endpoints],
            options_json=options_json,
        )
        reply = self.admin().RegisterService(admin_pb2.RegisterServiceRequest(service=service), timeout=5)
        return str(reply.version)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def chat(stub: gateway_pb2_grpc.GatewayServiceStub, service: str, text: str = "hello") -> gateway_pb2.InvokeResponse:
    payload = orjson.dumps({"messages": [{"role": "user", "content": text}]})
    return stub.Invoke(
        gateway_pb2.InvokeRequest(service=service, method="chat.completions", payload=payload), timeout=10
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("e2e"))
    try:
        c.start_emulators()
        c.start_control_plane()
        c.start_agent()
        yield c
    finally:
        c.stop()


def test_agent_is_not_ready_until_it_holds_a_snapshot(tmp_path: Path) -> None:
    lonely = Proc.switchgear(
        "lonely-agent", ["agent", "--auth", "none", "--control-plane", "127.0.0.1:9", "--listen", "127.0.0.1:0"], tmp_path
    )
    try:
        address = lonely.start()
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                chat(gateway_pb2_grpc.GatewayServiceStub(channel), "anything")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        assert lonely.stop() == 0


def test_register_ack_invoke_survive_control_plane_loss_and_reconverge(cluster: Cluster) -> None:
    version = cluster.register("chat", ("a", cluster.urls["a"]), ("b", cluster.urls["b"]))
    wait_until(lambda: cluster.acked(version), what="agent to ACK the registration")

    stub = cluster.gateway()
    replies = [chat(stub, "chat", f"q{i}") for i in range(4)]
    assert sorted(r.endpoint for r in replies) == ["a", "a", "b", "b"]  # round robin
    for reply in replies:
        body = orjson.loads(reply.payload)
        assert body["object"] == "chat.completion"
        assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
        assert reply.snapshot_version == version and reply.attempts == 1

    assert cluster.cp is not None
    cluster.cp.kill()
    for i in range(4):  # static stability: the agent serves on its last snapshot
        assert chat(stub, "chat", f"offline {i}").snapshot_version == version

    port = cluster.cp_address.rsplit(":", 1)[1]
    cluster.start_control_plane(listen=f"127.0.0.1:{port}")
    wait_until(lambda: cluster.acked(version), 20, "agent to reconnect holding the same version")
    status = cluster.agent_status()
    assert status is not None and status.pending_version == ""  # nothing was resent

    newer = cluster.register("chat-2", ("b", cluster.urls["b"]))
    assert version_seq(newer) > version_seq(version)
    wait_until(lambda: cluster.acked(newer), what="agent to ACK the change made after the restart")
    assert chat(stub, "chat-2").endpoint == "b"
    assert chat(stub, "chat").snapshot_version == newer


def test_a_change_the_agent_would_reject_is_refused_and_the_old_one_kept(cluster: Cluster) -> None:
    good = cluster.register("chat", ("a", cluster.urls["a"]))
    wait_until(lambda: cluster.acked(good), what="ACK of the good version")
    with pytest.raises(grpc.RpcError) as info:  # the agent's own checks, run before the commit
        cluster.register("chat", ("a", cluster.urls["a"]), options_json='{"chat_pth": "/chat/completions"}')
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "service.options_json.chat_pth: unknown option" in info.value.details()  # type: ignore[attr-defined]
    status = cluster.agent_status()
    assert status is not None and status.acked_version == good and not status.nacked_version
    assert chat(cluster.gateway(), "chat").snapshot_version == good  # still serving the old one

    fixed = cluster.register("chat", ("b", cluster.urls["b"]))
    wait_until(lambda: cluster.acked(fixed), what="ACK of the fixed version")
    assert chat(cluster.gateway(), "chat").endpoint == "b"


def test_bad_config_is_rejected_naming_key_and_line_and_nothing_changes(cluster: Cluster) -> None:
    before = cluster.admin().GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5).snapshot
    bad_yaml = (
        "external_services:\n"
        "  services:\n"
        "    llm_services:\n"
        "      local_models:\n"
        "        - name: broken\n"
        "          endpoint: \"not a url\"\n"
    )
    with pytest.raises(grpc.RpcError) as info:
        cluster.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=bad_yaml, source="bad.yaml"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    details = info.value.details()  # type: ignore[attr-defined]
    assert "local_models[0].endpoint" in details and "6" in details
    after = cluster.admin().GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5).snapshot
    assert after == before


@pytest.mark.parametrize(
    ("request_fields", "code", "needle"),
    [
        ({"service": "no-such-service", "payload": b"{}"}, grpc.StatusCode.NOT_FOUND, "no-such-service"),
        ({"service": "chat", "payload": b"{oops"}, grpc.StatusCode.INVALID_ARGUMENT, "payload"),
        ({"service": "chat", "payload": b"{}", "method": ""}, grpc.StatusCode.INVALID_ARGUMENT, "method"),
        ({"service": "chat", "payload": b"{}", "method": "teleport"}, grpc.StatusCode.INVALID_ARGUMENT, "method"),
        ({"service": "chat", "payload": b"{}", "priority": 42}, grpc.StatusCode.INVALID_ARGUMENT, "priority"),
        ({"service": "chat", "payload": b"{}", "category": common_pb2.SERVICE_CATEGORY_DOCUMENT},
         grpc.StatusCode.INVALID_ARGUMENT, "category"),
        ({"service": "chat", "payload": b'{"messages": "hi"}'}, grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    ],
)
def test_bad_requests_get_the_right_code(
    cluster: Cluster, request_fields: dict[str, object], code: grpc.StatusCode, needle: str
) -> None:
    version = cluster.register("chat", ("a", cluster.urls["a"]))
    wait_until(lambda: cluster.acked(version), what="ACK of the chat service")
    fields: dict[str, object] = {"method": "chat.completions"}
    fields.update(request_fields)
    with pytest.raises(grpc.RpcError) as info:
        cluster.gateway().Invoke(gateway_pb2.InvokeRequest(**fields), timeout=10)  # type: ignore[arg-type]
    assert info.value.code() == code  # type: ignore[attr-defined]
    assert needle in info.value.details()  # type: ignore[attr-defined]
