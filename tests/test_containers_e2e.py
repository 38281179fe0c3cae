"""Issue 18's acceptance with real processes: a managed local model (the OpenAI emulator run as
a subprocess by the agent) is declared in config, started on an agent, becomes a target only
after readiness, serves calls; SIGKILLed it is restarted while its peer serves every call; under
load it scales out to a second replica and back in after the load stops, with no failed call
during the drain. Windows are short here (1-2 s); the defaults are 30 s and 120 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, gateway_pb2
from tests.test_end_to_end import Cluster, wait_until

pytestmark = pytest.mark.timeout(60)

#: Retries fail over fast between replicas; a format string, like what follows it.
HEAD = """\
external_services:
  communication:
    retry_policy: {{max_retries: 2, base_delay: 0.01, max_delay: 0.05}}
  services:
    llm_services:
      local_models:
"""
CONFIG = HEAD + """\
        - name: "llama-local"
          model: "gpt-4o-mini"
          timeout: 10
          managed:
            command: ["{python}", "-m", "switchgear", "emulate", "openai", "--instance", "r:{latency}:${{PORT}}"]
            env: {{PYTHONPATH: "{root}"}}
            readiness: {{timeout: 20s}}
            resources: {{cpu: 1, memory: 256Mi}}
            replicas: {{min: 1, max: 2}}
            concurrency: 2
            scaling: {{scale_up_window: 1s, scale_down_window: 2s}}
            restart: {{backoff: 0.1s, max_backoff: 0.5s}}
            stop_grace: 2s
            drain_timeout: 10s
        - name: "broken-local"
          managed:
            command: ["{python}", "-c", "print('loading /models/missing.gguf'); raise SystemExit(2)"]
            resources: {{cpu: 0.5}}
            restart: {{backoff: 0.05s, max_backoff: 0.1s, max_crashes: 2}}
"""
LATENCY_MS = 60


class ManagedCluster(Cluster):
    def start_control_plane_fast(self) -> None:
        args = ["controlplane", "--admin-auth", "none", "--db", str(self.db), "--listen", "127.0.0.1:0",
                "--report-interval", "0.2", "--no-probes"]
        self.cp = Proc.switchgear("controlplane", args, self.workdir)
        self.cp_address = self.start(self.cp)

    def start_node_agent(self, cpu: float, *extra: str) -> None:
        agent = Proc.switchgear("agent", [
            "agent", "--auth", "none", "--control-plane", self.cp_address, "--listen", "127.0.0.1:0",
            "--node-id", "agent-1", "--agent-token-file", f"{self.db}.agent-token",
            "--managed-cpu", str(cpu), "--managed-memory", "1Gi", "--managed-log-dir", str(self.workdir / "replicas"),
            *extra,
        ], self.workdir)
        self.agent_address = self.start(agent)

    def replicas(self) -> list[admin_pb2.ManagedReplica]:
        return list(self.admin().ListReplicas(admin_pb2.ListReplicasRequest(), timeout=5).replicas)

    def replicas_of(self, service: str = "llama-local") -> list[admin_pb2.ManagedReplica]:
        return [r for r in self.replicas() if r.service == service]

    def serving(self) -> list[admin_pb2.ManagedReplica]:
        return [r for r in self.replicas_of() if r.serving and r.state == "ready"]

    def snapshot_endpoints(self) -> list[str]:
        snap = self.admin().GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5).snapshot
        return [e.id for s in snap.services if s.name == "llama-local" for e in s.endpoints]


def invoke(cluster: Cluster, service: str = "llama-local") -> gateway_pb2.InvokeResponse:
    payload = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
    reply: gateway_pb2.InvokeResponse = cluster.gateway().Invoke(
        gateway_pb2.InvokeRequest(service=service, method="chat.completions", payload=payload), timeout=10)
    return reply


class Load:
    """`threads` callers in a loop until stopped; every failure is kept."""

    def __init__(self, cluster: Cluster, threads: int) -> None:
        self.cluster = cluster
        self.stop = threading.Event()
        self.ok = 0
        self.endpoints: set[str] = set()
        self.failures: list[str] = []
        self.workers = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(15)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                reply = invoke(self.cluster)
                self.ok += 1
                self.endpoints.add(reply.endpoint)
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ManagedCluster]:
    c = ManagedCluster(tmp_path)
    try:
        c.start_control_plane_fast()
        c.start_node_agent(cpu=2.5)
        yield c
    finally:
        c.stop()


def alive(pid: int) -> bool:
    assert pid > 0, pid  # os.kill(0, 0) would ask about our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_managed_model_is_started_gated_on_readiness_restarted_scaled_out_and_drained_in(
        cluster: ManagedCluster) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    yaml = CONFIG.format(python=sys.executable, latency=LATENCY_MS, root=root)
    cluster.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=yaml, source="managed.yaml"), timeout=5)

    # Placed on the agent; not a target until its health call answers.
    wait_until(lambda: len(cluster.replicas_of()) == 1, 10, "a replica to be placed")
    first = cluster.replicas_of()[0]
    assert first.node == "agent-1" and first.id.startswith("replica-")
    if first.state != "ready":
        assert first.id not in cluster.snapshot_endpoints()
    wait_until(lambda: len(cluster.serving()) == 1, 25, "the replica to be ready and serving")
    wait_until(lambda: cluster.snapshot_endpoints() == [first.id], 10, "the snapshot to name the replica")
    wait_until(lambda: cluster.agent_status() is not None
               and cluster.agent_status().acked_version == cluster.admin().GetSnapshot(  # type: ignore[union-attr]
                   admin_pb2.GetSnapshotRequest(), timeout=5).snapshot.version, 10, "the agent to apply it")
    reply = invoke(cluster)
    assert reply.endpoint == first.id and orjson.loads(reply.payload)["choices"]

    with Load(cluster, threads=4) as load:
        # 4 callers on concurrency 2: utilisation above 0.8 for the 1 s window -> a second replica.
        wait_until(lambda: len(cluster.serving()) == 2, 30, "a second replica under load")
        wait_until(lambda: len(load.endpoints) == 2, 10, "calls on both replicas")
        # SIGKILL one: its agent restarts it; the other serves every call meanwhile.
        victim = cluster.serving()[0]
        assert victim.pid and alive(victim.pid)
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: any(r.id == victim.id and r.restarts > victim.restarts and r.pid not in (0, victim.pid)
                               and r.state == "ready" and r.serving for r in cluster.replicas_of()), 20,
                   "the killed replica to be restarted and serve")
        assert not load.failures, load.failures[:5]
    assert load.ok > 0

    # Load stopped: below 0.6 for 2 s -> one replica drained and stopped, while calls keep coming.
    decisions = cluster.admin().ListReplicas(admin_pb2.ListReplicasRequest(), timeout=5).decisions
    assert any("scale_out" in d for d in decisions), decisions
    before = {r.id: r.pid for r in cluster.replicas_of()}
    with Load(cluster, threads=1) as light:
        wait_until(lambda: len(cluster.replicas_of()) == 1, 25, "a replica to be drained and stopped")
        survivor = cluster.replicas_of()[0]
        time.sleep(0.3)  # calls go on after the drain
    assert not light.failures, light.failures[:5]
    assert light.ok > 0 and light.endpoints <= set(before)
    gone = next(pid for rid, pid in before.items() if rid != survivor.id)
    wait_until(lambda: not alive(gone), 5, "the drained replica's process to be gone")
    decisions = cluster.admin().ListReplicas(admin_pb2.ListReplicasRequest(), timeout=5).decisions
    assert any("scale_in" in d for d in decisions), decisions
    assert cluster.snapshot_endpoints() == [survivor.id]
    # The operator's view: `switchgear admin replicas` (the scaling decisions under the table).
    shown = subprocess.run([sys.executable, "-m", "switchgear", "admin", "--control-plane", cluster.cp_address,
                            "replicas"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert survivor.id in shown and "agent-1" in shown and "ready" in shown and "scaling:" in shown, shown
    # A server that keeps crashing is failed, not restarted forever; its last lines are shown.
    broken = next(r for r in cluster.replicas_of("broken-local"))
    assert broken.state == "failed" and not broken.serving and "2 crashes" in broken.message
    assert "loading /models/missing.gguf" in shown and "failed" in shown
