"""The health feedback loop with real processes: emulators, a control plane and two agents.

One endpoint of three starts failing half its requests (the emulator's fault injection); within
the reporting interval plus the debounce its weight drops in a new snapshot version that both
agents ACK; when it recovers, its weight comes back. Alerts fire through the real control
plane (action in the snapshot and the audit log), /metrics of both processes parse with
prometheus_client's own parser, and `switchgear stats` / `switchgear alerts` print tables.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchgear.controlplane.collector import SEED_METRICS
from switchgear.controlplane.snapshot import version_seq
from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.timeout(120)

FAST = [
    "--report-interval", "0.2", "--health-window", "3", "--alert-window", "3", "--health-debounce", "0.3",
    "--health-blackout", "0", "--health-min-requests", "5",
]


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition",
    explain: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{explain()}"
        time.sleep(0.05)


class Fleet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.urls: dict[str, str] = {}
        self.cp = ""
        self.cp_metrics = ""
        self.agents: list[str] = []
        self.agent_metrics: list[str] = []
        self.stop_traffic = threading.Event()
        self.sent = 0

    def start(self) -> None:
        emulators = Proc.switchgear("emulators", ["emulate", "openai", *[
            a for n in "abc" for a in ("--instance", f"{n}:15")]], self.workdir)
        self.procs.append(emulators)
        line = emulators.start(ready_prefix="{")
        self.urls = {n: f"http://127.0.0.1:{p}/v1" for n, p in json.loads("{" + line).items()}
        cp = Proc.switchgear("controlplane", ["controlplane", "--admin-auth", "none", "--db", str(self.workdir / "r.db"), "--listen",
                                              "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *FAST], self.workdir)
        self.procs.append(cp)
        self.cp = cp.start()
        self.cp_metrics = cp.wait_line("METRICS ", 10).split()[1]
        for i in (1, 2):
            agent = Proc.switchgear(f"agent-{i}", ["agent", "--auth", "none", "--control-plane", self.cp, "--listen", "127.0.0.1:0",
                                                   "--node-id", f"agent-{i}", "--metrics-listen", "127.0.0.1:0",
                                                   "--agent-token-file", str(self.workdir / "r.db.agent-token")],
                                    self.workdir)
            self.procs.append(agent)
            self.agents.append(agent.start())
            self.agent_metrics.append(agent.wait_line("METRICS ", 10).split()[1])

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(self.cp))

    def snapshot(self) -> admin_pb2.GetSnapshotResponse:
        return self.admin().GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5).snapshot

    def weights(self, service: str = "chat") -> dict[str, int]:
        for s in self.snapshot().services:
            if s.name == service:
                return {e.id: e.weight for e in s.endpoints}
        return {}

    def stats_text(self) -> str:
        reply = self.admin().GetStats(admin_pb2.GetStatsRequest(), timeout=5)
        rows = [f"{s.endpoint or '(total)'}: n={s.request_count} err={s.error_rate:.2f} "
                f"avg={s.avg_response_time_ms:.1f}ms w={s.weight} h={s.health}" for s in reply.stats]
        return f"sent={self.sent} weights={self.weights()}\n" + "\n".join(rows)

    def all_acked(self, version: str) -> bool:
        agents = self.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
        return len(agents) == 2 and all(a.connected and a.acked_version == version for a in agents)

    def faults(self, name: str, faults: dict[str, object]) -> None:
        base = self.urls[name].removesuffix("/v1")
        request = urllib.request.Request(f"{base}/_emulator/faults", data=json.dumps(faults).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=5).read()

    def traffic(self) -> list[threading.Thread]:
        stubs = [gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(a)) for a in self.agents]
        payload = orjson.dumps({"messages": [{"role": "user", "content": "hello"}]})

        def loop() -> None:
            while not self.stop_traffic.is_set():
                for stub in stubs:
                    with contextlib.suppress(grpc.RpcError):
                        stub.Invoke(gateway_pb2.InvokeRequest(service="chat", method="chat.completions",
                                                              payload=payload), timeout=5)
                    self.sent += 1
                time.sleep(0.005)

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(3)]
        for thread in threads:
            thread.start()
        return threads

    def stop(self) -> None:
        self.stop_traffic.set()
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("health"))
    try:
        f.start()
        service = common_pb2.Service(
            name="chat", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", model="gpt-4o-mini",
            endpoints=[common_pb2.Endpoint(id=n, url=f.urls[n], weight=1) for n in "abc"],
            strategy="weighted",  # the agents route by the weights the control plane sends
        )
        version = f.admin().RegisterService(admin_pb2.RegisterServiceRequest(service=service), timeout=5).version
        wait_until(lambda: f.all_acked(version), what="both agents to ACK the registration")
        yield f
    finally:
        f.stop()


def scrape(address: str) -> dict[str, object]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def burst(fleet: Fleet) -> Fleet:
    """The fleet after c's error burst and recovery (`error_burst`), run once for the module by
    whichever test asks first: the metrics, stats and alerts tests read what it left behind."""
    error_burst(fleet)
    return fleet


def error_burst(fleet: Fleet) -> None:
    """Traffic on chat; c fails half its requests until its weight drops everywhere, then recovers."""
    traffic = fleet.traffic()
    try:
        wait_until(lambda: fleet.sent > 50, what="some traffic")
        time.sleep(1.0)
        assert set(fleet.weights().values()) == {1} or len(set(fleet.weights().values())) == 1  # all equal

        fleet.faults("c", {"error_rate": 0.5, "error_status": 503, "seed": 1})
        started = time.monotonic()
        def dropped() -> bool:
            w = fleet.weights()
            return w["c"] <= 0.75 * min(w["a"], w["b"])

        wait_until(dropped, 30, "c's weight to drop", lambda: fleet.stats_text())
        degraded_after = time.monotonic() - started
        version = fleet.snapshot().version
        wait_until(lambda: fleet.all_acked(fleet.snapshot().version), 10, "both agents to ACK the new weights")
        weights = fleet.weights()
        print(f"c degraded after {degraded_after:.2f} s in {version}: {weights}")
        health = {e.id: e.health for s in fleet.snapshot().services if s.name == "chat" for e in s.endpoints}
        assert health["c"] == common_pb2.HEALTH_STATE_DEGRADED
        # the seed's high_error_rate rule fired: its action (a tighter breaker) is in the snapshot
        wait_until(lambda: fleet.snapshot().settings.circuit_breaker.failure_threshold == 2, 10,
                   "enable_circuit_breaker to reach the snapshot", lambda: fleet.stats_text())

        # no write storm: every report (5 a second per agent) changes the raw figures, but only a
        # bucket move makes a version, and health versions are debounced (0.3 s here): at most 10
        # in 3 s whatever happens; in practice a few, from sampling noise on a 3 s window
        steady_from = version_seq(fleet.snapshot().version)
        time.sleep(3.0)
        steady_versions = version_seq(fleet.snapshot().version) - steady_from
        print(f"versions in 3 s of steady 50 % errors: {steady_versions}")
        assert steady_versions <= 11

        fleet.faults("c", {"error_rate": 0})
        started = time.monotonic()

        def recovered() -> bool:
            w = fleet.weights()
            return w["c"] == w["a"] == w["b"]

        wait_until(recovered, 30, "c's weight to come back", lambda: fleet.stats_text())
        print(f"c recovered after {time.monotonic() - started:.2f} s: {fleet.weights()}")
        wait_until(lambda: fleet.all_acked(fleet.snapshot().version), 10, "both agents to ACK the recovery")
    finally:
        fleet.stop_traffic.set()
        for thread in traffic:
            thread.join(timeout=10)


def test_a_failing_endpoint_loses_weight_everywhere_and_regains_it(burst: Fleet) -> None:
    # (the weights' fall and return are asserted along the way, in error_burst)
    # the error burst fired the seed's high_error_rate rule through the real control plane
    audit_actions = _audit_actions(burst)
    assert any(a.startswith("alert_fired:high_error_rate") for a in audit_actions), audit_actions
    assert "health_update" in audit_actions


def _audit_actions(fleet: Fleet) -> list[str]:
    import sqlite3

    db = sqlite3.connect(str(fleet.workdir / "r.db"))
    try:
        return [row[0] for row in db.execute("SELECT action FROM audit ORDER BY id")]
    finally:
        db.close()


def test_metrics_of_both_processes_carry_every_seed_metric(burst: Fleet) -> None:
    fleet = burst
    for address in (fleet.cp_metrics, *fleet.agent_metrics):
        families = scrape(address)
        for metric in SEED_METRICS:
            assert f"switchgear_{metric}" in families, (address, metric)
        requests = families["switchgear_request_count"]
        samples = [s for s in requests.samples if s.labels.get("service") == "chat"]  # type: ignore[attr-defined]
        assert samples and sum(s.value for s in samples) > 0
        assert {s.labels["category"] for s in samples} == {"llm"}
    agent = scrape(fleet.agent_metrics[0])
    assert "switchgear_gateway_overhead_seconds" in agent
    cp = scrape(fleet.cp_metrics)
    weights = {s.labels["endpoint"]: s.value for s in cp["switchgear_endpoint_weight"].samples}  # type: ignore[attr-defined]
    assert set(weights) == {"a", "b", "c"}


def test_stats_and_alerts_commands_print_tables(burst: Fleet) -> None:
    fleet = burst
    stats = subprocess.run([sys.executable, "-m", "switchgear", "stats", "--control-plane", fleet.cp],
                           capture_output=True, text=True, timeout=30)
    assert stats.returncode == 0, stats.stderr
    assert "SERVICE" in stats.stdout and "chat" in stats.stdout and "(total)" in stats.stdout
    reply = fleet.admin().GetStats(admin_pb2.GetStatsRequest(service="chat"), timeout=5)
    assert {s.endpoint for s in reply.stats} == {"a", "b", "c", ""}
    alerts = subprocess.run([sys.executable, "-m", "switchgear", "alerts", "--control-plane", fleet.cp],
                            capture_output=True, text=True, timeout=30)
    assert alerts.returncode == 0, alerts.stderr
    listed = fleet.admin().ListAlerts(admin_pb2.ListAlertsRequest(recovered_limit=10), timeout=5)
    names = {a.rule for a in [*listed.firing, *listed.recovered]}
    assert "high_error_rate" in names
    assert "high_error_rate" in alerts.stdout


def test_grpc_health_reports_every_service_of_both_planes(fleet: Fleet) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(fleet.cp) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "switchgear.v1.DiscoveryService", "switchgear.v1.AdminService",
                     "switchgear.v1.LoadReportingService"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == serving, name
    for address in fleet.agents:  # agents holding a snapshot
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="switchgear.v1.GatewayService"), timeout=5)
            assert reply.status == serving
