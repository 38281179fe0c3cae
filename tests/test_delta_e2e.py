"""Delta delivery with real processes: a control plane, an agent taking deltas (the default) and
one taking whole snapshots (--snapshot-delivery whole), both with the agent token. After a
series of changes both serve the same routes at the same version; the delta agent got deltas.
An anonymous caller asking for deltas is refused, as any anonymous agent call is."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, discovery_pb2, discovery_pb2_grpc

pytestmark = pytest.mark.timeout(90)


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def chat(name: str, model: str = "m", port: int = 9) -> common_pb2.Service:
    return common_pb2.Service(
        name=name, category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", model=model,
        endpoints=[common_pb2.Endpoint(id="e", url=f"http://127.0.0.1:{port}/v1", weight=1)])


class Plane:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.db = workdir / "registry.db"
        self.procs: list[Proc] = []
        self.address = ""
        self.http: dict[str, str] = {}

    def start(self) -> None:
        cp = Proc.switchgear("controlplane", ["controlplane", "--admin-auth", "none", "--db", str(self.db),
                                              "--listen", "127.0.0.1:0", "--no-probes"], self.workdir)
        self.procs.append(cp)
        self.address = cp.start()
        for node, delivery in (("delta-1", "delta"), ("whole-1", "whole")):
            agent = Proc.switchgear(node, [
                "agent", "--auth", "none", "--control-plane", self.address, "--listen", "127.0.0.1:0",
                "--http-listen", "127.0.0.1:0", "--node-id", node, "--snapshot-delivery", delivery,
                "--agent-token-file", f"{self.db}.agent-token"], self.workdir)
            self.procs.append(agent)
            agent.start()
            self.http[node] = "http://" + agent.wait_line("HTTP ", 20).removeprefix("HTTP ").strip()

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(self.address))

    def models(self, node: str) -> list[tuple[str, list[str]]]:
        with urllib.request.urlopen(self.http[node] + "/v1/models", timeout=5) as reply:
            data = json.loads(reply.read())["data"]
        return sorted((m["id"], m["switchgear_providers"]) for m in data)

    def all_acked(self, version: str) -> bool:
        agents = self.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
        return sorted(a.node.id for a in agents if a.acked_version == version and a.connected) == ["delta-1", "whole-1"]


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path)
    try:
        p.start()
        yield p
    finally:
        for proc in reversed(p.procs):
            proc.stop()


def test_a_delta_agent_ends_where_a_whole_snapshot_agent_does(plane: Plane) -> None:
    admin = plane.admin()
    for name in ("a", "b", "c"):
        admin.RegisterService(admin_pb2.RegisterServiceRequest(service=chat(name)), timeout=10)
    admin.RegisterService(admin_pb2.RegisterServiceRequest(service=chat("b", "other", 10)), timeout=10)
    admin.DeregisterService(admin_pb2.DeregisterServiceRequest(name="c"), timeout=10)
    version = admin.RegisterService(admin_pb2.RegisterServiceRequest(service=chat("d")), timeout=10).version
    wait_until(lambda: plane.all_acked(version), f"both agents to ACK {version}")
    agents = admin.ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
    assert {a.node.id: a.snapshot_delivery for a in agents} == {"delta-1": "delta", "whole-1": "whole"}
    assert plane.models("delta-1") == plane.models("whole-1")
    assert [m for m, _ in plane.models("delta-1")] == ["a", "b", "d", "llm"]  # llm: the category route
    delta_log = next(p for p in plane.procs if p.name == "delta-1").log_path.read_text(encoding="utf-8")
    whole_log = next(p for p in plane.procs if p.name == "whole-1").log_path.read_text(encoding="utf-8")
    assert f"applied snapshot {version} (delta onto " in delta_log
    assert "(delta onto" not in whole_log and f"applied snapshot {version} (whole)" in whole_log


def test_an_anonymous_caller_asking_for_deltas_is_refused(plane: Plane) -> None:
    with grpc.insecure_channel(plane.address) as channel:
        call = discovery_pb2_grpc.DiscoveryServiceStub(channel).StreamSnapshots(iter([
            discovery_pb2.StreamSnapshotsRequest(node=discovery_pb2.Node(id="intruder"),
                                                 delivery=discovery_pb2.SNAPSHOT_DELIVERY_DELTA)]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            next(call)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
