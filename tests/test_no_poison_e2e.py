"""No change can poison the fleet, with real processes: a control plane, OpenAI emulators, one
current agent and one "older" agent (a build whose OpenAI adapter predates the `stream_usage`
option: the same agent with that option taken out of its schema, as version skew would have it).

One story (starting processes is the slow part):
1. `admin register --wait` of a good service: both agents ACK, exit 0;
2. a service using `stream_usage`, which the control plane accepts and the older agent cannot
   take: `--wait` shows that agent's rejection and exits 1; the current agent serves it;
3. a later, unrelated service works on the older agent too (before this change every later
   change was NACKed and the new service answered NOT_FOUND), and ListAgents / ListServices
   show which agent rejected what, also after a control-plane restart;
4. a service with an option no agent knows is refused with INVALID_ARGUMENT naming the option,
   and nothing is committed;
5. `admin apply --wait` of a config without the skewed service: every agent applies all, exit 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, gateway_pb2_grpc
from tests.test_end_to_end import Cluster, chat, wait_until

pytestmark = pytest.mark.timeout(120)

# The older agent: its OpenAI adapter does not know the newer `stream_usage` option.
OLD_AGENT = """\
import sys
from switchgear.adapters import openai
openai.KNOWN_OPTIONS = tuple(o for o in openai.KNOWN_OPTIONS if o != "stream_usage")
from switchgear.cli import main
sys.exit(main(sys.argv[1:]))
"""


class SkewedCluster(Cluster):
    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.agents: dict[str, str] = {}

    def start_agents(self) -> None:
        script = self.workdir / "old_agent.py"
        script.write_text(OLD_AGENT, encoding="utf-8")
        launchers = {"agent-new": [sys.executable, "-m", "switchgear"], "agent-old": [sys.executable, str(script)]}
        for node, argv in launchers.items():
            args = ["agent", "--auth", "none", "--control-plane", self.cp_address, "--listen", "127.0.0.1:0",
                    "--node-id", node, "--agent-token-file", f"{self.db}.agent-token"]
            self.agents[node] = self.start(Proc(node, [*argv, *args], self.workdir))

    def gateway_of(self, node: str) -> gateway_pb2_grpc.GatewayServiceStub:
        return gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(self.agents[node]))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "switchgear", "admin", "--control-plane", self.cp_address, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    def service_file(self, name: str, url: str, options: dict[str, object] | None = None) -> str:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps({
            "name": name, "category": "SERVICE_CATEGORY_LLM", "protocol": "openai", "model": "gpt-4o-mini",
            "endpoints": [{"id": "a", "url": url, "weight": 1}], "options_json": json.dumps(options or {}),
        }), encoding="utf-8")
        return str(path)

    def statuses(self) -> dict[str, admin_pb2.AgentStatus]:
        return {a.node.id: a for a in self.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SkewedCluster]:
    c = SkewedCluster(tmp_path_factory.mktemp("skew"))
    try:
        c.start_emulators()
        c.start_control_plane()
        c.start_agents()
        wait_until(lambda: all(a.connected for a in c.statuses().values()) and len(c.statuses()) == 2,
                   what="both agents to connect")
        yield c
    finally:
        c.stop()


def test_one_service_an_older_agent_cannot_take_does_not_block_later_changes(cluster: SkewedCluster) -> None:
    done = cluster.cli("register", cluster.service_file("chat", cluster.urls["a"]), "--wait", "--wait-timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    version = json.loads(done.stdout[: done.stdout.rindex("}") + 1])["version"]
    assert f"agent-new  ACK  {version}" in done.stdout and f"agent-old  ACK  {version}" in done.stdout
    assert "2 of 2 agent(s) answered" in done.stdout

    skewed = cluster.service_file("skewed", cluster.urls["b"], {"stream_usage": False})
    done = cluster.cli("register", skewed, "--wait", "--wait-timeout", "20")
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("did not apply service 'skewed': services[skewed].options_json.stream_usage: unknown option"
            in done.stdout)
    assert done.stdout.count("did not apply") == 1  # only the older agent
    assert chat(cluster.gateway_of("agent-new"), "skewed").endpoint == "a"
    with pytest.raises(grpc.RpcError) as info:
        chat(cluster.gateway_of("agent-old"), "skewed")  # it never had it: left out, not half-applied
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]

    # A later, unrelated change reaches the older agent (on the original main it was NACKed).
    later = cluster.register("later", ("b", cluster.urls["b"]))
    wait_until(lambda: all(s.acked_version == later for s in cluster.statuses().values()), what="both ACKs")
    reply = chat(cluster.gateway_of("agent-old"), "later")
    assert reply.snapshot_version == later and reply.endpoint == "b"
    assert chat(cluster.gateway_of("agent-old"), "chat").snapshot_version == later

    old = cluster.statuses()["agent-old"]
    assert [(r.service, r.error_detail.field_path) for r in old.rejected_services] == [
        ("skewed", "services[skewed].options_json.stream_usage")]
    assert not cluster.statuses()["agent-new"].rejected_services
    listed = cluster.admin().ListServices(admin_pb2.ListServicesRequest(), timeout=5)
    assert [(r.node_id, r.version, r.rejection.service) for r in listed.rejections] == [("agent-old", later, "skewed")]

    # A restarted control plane learns it from the reconnecting agent (nothing is resent).
    assert cluster.cp is not None
    cluster.cp.kill()
    cluster.start_control_plane(listen=cluster.cp_address)
    wait_until(lambda: {n: (s.connected, s.acked_version) for n, s in cluster.statuses().items()}
               == {"agent-new": (True, later), "agent-old": (True, later)}, 20, "agents to reconnect")
    again = cluster.statuses()["agent-old"]
    assert [r.service for r in again.rejected_services] == ["skewed"] and again.pending_version == ""


def test_an_option_no_agent_knows_is_refused_and_nothing_committed(cluster: SkewedCluster) -> None:
    before = cluster.admin().GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5).snapshot
    with pytest.raises(grpc.RpcError) as info:
        cluster.register("poison", ("a", cluster.urls["a"]), options_json='{"chat_pth": "/chat/completions"}')
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert info.value.details().startswith("service.options_json.chat_pth: unknown option")  # type: ignore[attr-defined]
    assert cluster.admin().GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5).snapshot == before
    refused = cluster.cli("register", cluster.service_file("poison", cluster.urls["a"], {"chat_pth": "/x"}), "--wait")
    assert refused.returncode == 1 and "INVALID_ARGUMENT: service.options_json.chat_pth" in refused.stderr


def test_apply_wait_is_clean_once_the_skewed_service_is_gone(cluster: SkewedCluster) -> None:
    config = cluster.workdir / "final.yaml"
    config.write_text(
        "external_services:\n  services:\n    llm_services:\n      local_models:\n"
        f"        - name: final\n          model: gpt-4o-mini\n          endpoint: {cluster.urls['a']}\n",
        encoding="utf-8")
    done = cluster.cli("apply", str(config), "--wait", "--wait-timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "did not apply" not in done.stdout and "2 of 2 agent(s) answered" in done.stdout
    assert all(not s.rejected_services for s in cluster.statuses().values())
    applied = cluster.statuses()["agent-old"].acked_version
    assert chat(cluster.gateway_of("agent-old"), "final").snapshot_version == applied
