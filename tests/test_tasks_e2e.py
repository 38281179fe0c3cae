"""Tasks with real processes: control plane, two worker agents and the OpenAI emulator.

One cluster per module (starting processes is the slow part), four stories:
200 mixed tasks through two agents (priority order, utilisation within capacity); an agent
SIGKILLed while holding leases (re-leased, completed; idempotent resubmission adds no work);
the control plane SIGKILLed and restarted mid-run (nothing lost or duplicated); a document
request to a dead service deferred as a task that completes when the service comes back
(driven through DeferInvoke directly, the hook the request path's fallback calls).
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import orjson
import pytest

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, tasks_pb2, tasks_pb2_grpc

pytestmark = pytest.mark.timeout(120)

GIB = 1024**3
AGENT_POOL = {"cpu": 8.0, "memory_bytes": 16 * GIB}
AGENT_SLOTS = 6
CATEGORIES = {"chat": common_pb2.SERVICE_CATEGORY_LLM, "parse": common_pb2.SERVICE_CATEGORY_DOCUMENT,
              "graph": common_pb2.SERVICE_CATEGORY_KNOWLEDGE_GRAPH}
RESOURCES_YAML = """\
external_services:
  coordination:
    resource_allocation:  # per-task request of the categories without a row (graph here)
      default_cpu: 1
      default_memory: "2Gi"
      max_concurrent_tasks: 100
"""
FINAL = {tasks_pb2.TASK_STATE_SUCCEEDED, tasks_pb2.TASK_STATE_FAILED, tasks_pb2.TASK_STATE_CANCELLED,
         tasks_pb2.TASK_STATE_DEAD_LETTERED}


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.db = workdir / "cp.db"
        self.procs: list[Proc] = []
        self.cp: Proc | None = None
        self.cp_address = ""
        self.agents: dict[str, Proc] = {}
        self.emulator_url = ""

    def start(self, proc: Proc, **kwargs: object) -> str:
        self.procs.append(proc)
        return proc.start(**kwargs)  # type: ignore[arg-type]

    def start_emulator(self, name: str, spec: str) -> str:
        line = self.start(Proc.switchgear(name, ["emulate", "openai", "--instance", spec], self.workdir),
                          ready_prefix="{")
        (port,) = json.loads("{" + line).values()
        return f"http://127.0.0.1:{port}"

    def start_control_plane(self, listen: str = "127.0.0.1:0") -> None:
        config = self.workdir / "resources.yaml"  # per-agent pool: the agents' size (see allocator.py)
        config.write_text(RESOURCES_YAML, encoding="utf-8")
        self.cp = Proc.switchgear("controlplane", [
            "controlplane", "--admin-auth", "none", "--db", str(self.db), "--listen", listen, "--task-lease-ttl", "1.5", "--no-probes",
            "--config", str(config),
        ], self.workdir)
        self.cp_address = self.start(self.cp)

    def start_agent(self, node_id: str) -> None:
        self.agents[node_id] = Proc.switchgear(node_id, [
            "agent", "--auth", "none", "--control-plane", self.cp_address, "--listen", "127.0.0.1:0", "--node-id", node_id,
            "--task-capacity", str(AGENT_SLOTS), "--task-cpu", "8", "--task-memory", "16Gi",
            "--agent-token-file", f"{self.db}.agent-token",
        ], self.workdir)
        self.start(self.agents[node_id])

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(self.cp_address))

    def tasks(self) -> tasks_pb2_grpc.TasksServiceStub:
        return tasks_pb2_grpc.TasksServiceStub(grpc.insecure_channel(self.cp_address))

    def register(self, name: str, url: str) -> None:
        service = common_pb2.Service(name=name, category=CATEGORIES.get(name, common_pb2.SERVICE_CATEGORY_DOCUMENT),
                                     protocol="openai", model="gpt-4o-mini",
                                     endpoints=[common_pb2.Endpoint(id="e0", url=f"{url}/v1", weight=1)])
        self.admin().RegisterService(admin_pb2.RegisterServiceRequest(service=service), timeout=5)

    def get(self, task_id: str) -> tasks_pb2.Task:
        task: tasks_pb2.Task = self.tasks().GetTask(tasks_pb2.GetTaskRequest(id=task_id), timeout=5).task
        return task

    def start_agents(self, *node_ids: str) -> None:
        """Start agents side by side (start-up is the slow part), so they join the queue together."""
        threads = [threading.Thread(target=self.start_agent, args=(n,)) for n in node_ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(self.agents[n].running() for n in node_ids)

    def stop_agents(self) -> None:
        """No agent runs (the cluster is shared by the module's tests, in any order)."""
        for agent in self.agents.values():
            agent.stop()

    def ensure_agents(self) -> None:
        self.start_agents(*(n for n in ("agent-1", "agent-2") if n not in self.agents or not self.agents[n].running()))

    def diagnose(self) -> str:
        counts = self.tasks().GetTaskStats(tasks_pb2.GetTaskStatsRequest(), timeout=5).counts
        tails = "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in self.procs)
        return f"task counts {dict(counts)}\n{tails}"

    def wait_final(self, ids: list[str], timeout_s: float, what: str) -> None:
        try:
            wait_until(lambda: self.all_final(ids), timeout_s, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None

    def all_final(self, ids: list[str]) -> bool:
        listed = self.tasks().ListTasks(tasks_pb2.ListTasksRequest(limit=1000), timeout=5).tasks
        states = {t.id: t.state for t in listed}
        return all(states.get(i) in FINAL for i in ids)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def emulator_total(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=5) as reply:
        return int(json.load(reply)["total"])


def set_faults(url: str, faults: dict[str, object]) -> None:
    request = urllib.request.Request(f"{url}/_emulator/faults", data=orjson.dumps(faults), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()


def chat_payload(i: int) -> bytes:
    return orjson.dumps({"messages": [{"role": "user", "content": f"task {i}"}], "max_tokens": 8})


def submit(stub: tasks_pb2_grpc.TasksServiceStub, service: str, i: int, priority: int, key: str = "") -> tasks_pb2.Task:
    request = tasks_pb2.SubmitTaskRequest(service=service, method="chat.completions", payload=chat_payload(i),
                                          priority=priority, idempotency_key=key, tenant="e2e")
    task: tasks_pb2.Task = stub.SubmitTask(request, timeout=5).task
    return task


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("tasks-e2e"))
    try:
        c.emulator_url = c.start_emulator("emulator", "a:5")
        c.start_control_plane()
        for name in ("chat", "parse", "graph"):
            c.register(name, c.emulator_url)
        yield c
    finally:
        c.stop()


def attempts_table(db: Path) -> list[tuple[str, str, int, str, float, float, str, float, float, float, float, float]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(
            "SELECT a.task_id, a.agent, a.attempt, t.category, a.leased_at, a.ended_at, a.outcome, t.req_cpu, "
            "t.req_memory, t.priority, t.req_gpu, t.submitted_at FROM task_attempts a JOIN tasks t ON t.id = a.task_id"
        ).fetchall()


def test_200_mixed_tasks_through_two_agents_in_priority_order_within_capacity(cluster: Cluster) -> None:
    cluster.stop_agents()  # an earlier test's agents would lease each task as it is submitted
    stub = cluster.tasks()
    services = ["chat", "parse", "graph"]
    started = time.monotonic()
    ids = [submit(stub, services[i % 3], i, priority=1 + (i * 7) % 10).id for i in range(200)]
    set_faults(cluster.emulator_url, {"latency_ms": 100})  # long enough for both agents to take part
    try:
        cluster.start_agents("agent-1", "agent-2")  # the queue is full before any worker asks: order is visible
        cluster.wait_final(ids, 20, "all 200 tasks to be final")
    finally:
        set_faults(cluster.emulator_url, {"latency_ms": 5})
    elapsed = time.monotonic() - started
    assert elapsed < 20

    listed = {t.id: t for t in stub.ListTasks(tasks_pb2.ListTasksRequest(limit=1000), timeout=5).tasks}
    assert all(listed[i].state == tasks_pb2.TASK_STATE_SUCCEEDED for i in ids)
    assert {listed[i].agent for i in ids} == {"agent-1", "agent-2"}
    result = orjson.loads(cluster.get(ids[0]).result)
    assert result["object"] == "chat.completion"

    rows = [r for r in attempts_table(cluster.db) if r[0] in set(ids)]
    # Higher priority starts first: within a category (same requirements, so fit is never the
    # reason to pass one over) first attempts are leased in non-increasing priority.
    by_category: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for task_id, _agent, attempt, category, leased_at, *_rest in rows:
        if attempt == 1:
            by_category[category].append((leased_at, listed[task_id].priority))
    for category, leases in by_category.items():
        priorities = [p for _, p in sorted(leases, key=lambda lease: (lease[0], -lease[1]))]  # one call: one instant
        assert priorities == sorted(priorities, reverse=True), category

    # Utilisation never exceeds capacity: replay every attempt per agent, releases before leases.
    events: dict[str, list[tuple[float, int, float, float]]] = defaultdict(list)
    for _id, agent, _attempt, _category, leased_at, ended_at, _outcome, cpu, memory, *_ in rows:
        events[agent].append((leased_at, 1, cpu, memory))
        events[agent].append((ended_at, 0, -cpu, -memory))
    peaks = []
    for timeline in events.values():
        tasks = cpu_used = memory_used = peak_cpu = 0.0
        for _at, kind, cpu, memory in sorted(timeline):
            tasks += 1 if kind else -1
            cpu_used += cpu
            memory_used += memory
            peak_cpu = max(peak_cpu, cpu_used)
            assert tasks <= AGENT_SLOTS and cpu_used <= AGENT_POOL["cpu"] + 1e-9
            assert memory_used <= AGENT_POOL["memory_bytes"]
        peaks.append(peak_cpu)
    assert max(peaks) == AGENT_POOL["cpu"]  # resources were the bound, and the pool was used to the full
    stats = stub.GetTaskStats(tasks_pb2.GetTaskStatsRequest(), timeout=5)
    for agent in stats.agents:
        assert agent.usage.capacity.cpu == 8 and agent.usage.task_capacity == AGENT_SLOTS
        assert all(0.0 <= v <= 1.0 for v in agent.peak_utilisation.values())
    assert all(v <= 1.0 for v in stats.peak_utilisation.values())
    assert stats.counts["succeeded"] >= 200
    print(f"200 tasks in {elapsed:.2f} s; peak utilisation {dict(stats.peak_utilisation)}")


def test_killed_agent_tasks_are_released_and_resubmission_is_idempotent(cluster: Cluster) -> None:
    cluster.ensure_agents()
    stub = cluster.tasks()
    set_faults(cluster.emulator_url, {"latency_ms": 1500})
    try:
        ids = [submit(stub, "graph", i, priority=5, key=f"kill-{i}").id for i in range(16)]

        def held_by_agent_1() -> bool:
            return sum(1 for i in ids if cluster.get(i).agent == "agent-1"
                       and cluster.get(i).state == tasks_pb2.TASK_STATE_RUNNING) >= 3

        wait_until(held_by_agent_1, 15, "agent-1 to run some tasks")
        cluster.agents["agent-1"].kill()
        held = [i for i in ids if cluster.get(i).agent == "agent-1" and cluster.get(i).state in
                (tasks_pb2.TASK_STATE_LEASED, tasks_pb2.TASK_STATE_RUNNING)]
        assert held
    finally:
        set_faults(cluster.emulator_url, {"latency_ms": 5})
    cluster.wait_final(ids, 30, "the killed agent's tasks to be re-leased and finished")
    for task_id in ids:
        t = cluster.get(task_id)
        assert t.state == tasks_pb2.TASK_STATE_SUCCEEDED, (t.id, t.error)
    for task_id in held:
        t = cluster.get(task_id)
        assert t.agent == "agent-2" and t.attempts == 2 and t.error.kind == "lease_expired"
    outcomes = {(r[0], r[1], r[6]) for r in attempts_table(cluster.db) if r[0] in held}
    assert {(i, "agent-1", "expired") for i in held} <= outcomes

    before = emulator_total(cluster.emulator_url)
    again = [submit(stub, "graph", i, priority=5, key=f"kill-{i}") for i in range(16)]
    assert [t.id for t in again] == ids and all(t.state == tasks_pb2.TASK_STATE_SUCCEEDED for t in again)
    time.sleep(0.5)
    assert emulator_total(cluster.emulator_url) == before  # no work was done twice for the resubmission
    cluster.ensure_agents()


def test_control_plane_restart_mid_run_loses_and_duplicates_nothing(cluster: Cluster) -> None:
    cluster.ensure_agents()
    set_faults(cluster.emulator_url, {"latency_ms": 150})
    stub = cluster.tasks()
    keys = [f"restart-{i}" for i in range(60)]
    first = {k: submit(stub, "chat", i, priority=1 + i % 10, key=k).id for i, k in enumerate(keys[:40])}
    wait_until(lambda: sum(cluster.get(i).state == tasks_pb2.TASK_STATE_SUCCEEDED for i in first.values()) >= 5,
               15, "some tasks to finish")
    assert cluster.cp is not None
    cluster.cp.kill()  # mid-run: tasks queued, leased and running
    port = cluster.cp_address.rsplit(":", 1)[1]
    time.sleep(0.5)
    cluster.start_control_plane(listen=f"127.0.0.1:{port}")
    set_faults(cluster.emulator_url, {"latency_ms": 5})
    stub = cluster.tasks()
    # Clients retry every submission (with its key) after the restart: the first 40 are found, 20 are new.
    ids = {k: submit(stub, "chat", i, priority=1 + i % 10, key=k).id for i, k in enumerate(keys)}
    assert all(ids[k] == first[k] for k in first)
    cluster.wait_final(list(ids.values()), 30, "every task to finish after the restart")
    with sqlite3.connect(f"file:{cluster.db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT idempotency_key, state FROM tasks WHERE idempotency_key LIKE 'restart-%'").fetchall()
    assert sorted(k for k, _ in rows) == sorted(keys)  # one row per submission, none lost, none twice
    assert {s for _, s in rows} == {"succeeded"}


def test_document_request_to_dead_service_is_deferred_and_completes_when_it_returns(cluster: Cluster) -> None:
    cluster.ensure_agents()
    port = free_port()
    cluster.register("parse-dead", f"http://127.0.0.1:{port}")
    stub = cluster.tasks()
    request = tasks_pb2.DeferInvokeRequest(request_id="doc-7", service="parse-dead", method="chat.completions",
                                           payload=chat_payload(7), priority=6, tenant="e2e",
                                           reason="connect: all endpoints down")
    as_agent = (("authorization", f"Bearer {Path(f'{cluster.db}.agent-token').read_text().strip()}"),)
    deferred = stub.DeferInvoke(request, timeout=5, metadata=as_agent)  # an agent's call: the agent token
    assert deferred.queue_id == "queue_doc-7" and "queued for later processing" in deferred.message
    assert deferred.task.category == common_pb2.SERVICE_CATEGORY_DOCUMENT
    assert stub.DeferInvoke(request, timeout=5, metadata=as_agent).task.id == deferred.task.id  # idempotent

    def failed_once() -> bool:
        t = cluster.get(deferred.task.id)
        return t.attempts >= 1 and t.error.kind == "connect"

    wait_until(failed_once, 15, "a first attempt to fail against the dead service")
    cluster.start_emulator("emulator-doc", f"d:5:{port}")  # the service comes back
    seen = []
    for event in stub.WatchTasks(tasks_pb2.WatchTasksRequest(ids=[deferred.task.id]), timeout=30):
        seen.append(event.task.state)
    assert seen[-1] == tasks_pb2.TASK_STATE_SUCCEEDED
    final = cluster.get(deferred.task.id)
    assert final.origin == "defer" and final.attempts >= 2
    assert orjson.loads(final.result)["object"] == "chat.completion"


def run_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "switchgear", "tasks", "--control-plane", cluster.cp_address, *args],
                          capture_output=True, text=True, timeout=30)


def test_cli_submit_watch_get_list_cancel_stats(cluster: Cluster) -> None:
    cluster.ensure_agents()
    submitted = run_cli(cluster, "submit", "--service", "chat", "--priority", "8", "--tenant", "cli",
                        "--payload", chat_payload(1).decode(), "--watch")
    assert submitted.returncode == 0, submitted.stderr
    lines = submitted.stdout.splitlines()
    assert "succeeded" in lines[-1] and "100.0%" in lines[-1]  # the live display's last line
    found = re.search(r"^task (\w+) \(created\)$", submitted.stderr, re.MULTILINE)
    assert found, submitted.stderr
    task_id = found.group(1)
    got = run_cli(cluster, "get", task_id, "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["task"]["state"] == "TASK_STATE_SUCCEEDED"
    listed = run_cli(cluster, "list", "--tenant", "cli", "--state", "succeeded")
    assert listed.returncode == 0 and task_id in listed.stdout
    cancelled = run_cli(cluster, "cancel", task_id)
    assert cancelled.returncode == 1 and "FAILED_PRECONDITION" in cancelled.stderr
    bad = run_cli(cluster, "submit", "--service", "nope", "--payload", "{}")
    assert bad.returncode == 1 and "NOT_FOUND: service: no service named 'nope'" in bad.stderr
    stats = run_cli(cluster, "stats", "--json")
    assert stats.returncode == 0 and "peak_utilisation" in stats.stdout
