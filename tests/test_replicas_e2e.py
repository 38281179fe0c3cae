"""Control-plane replicas on a real PostgreSQL, agents and emulators as real processes.

- Three replicas and three agents under a bounded client load: SIGKILL the leader. Another
  replica leads within 5 s, the agents of the dead one reconnect to live ones, no client
  request fails, and an admin change made right after reaches every agent. Tasks submitted
  through a follower before the kill all finish exactly once; the audit log holds each change
  once, with versions unique and monotonic.
- Two replicas started at the same moment on an empty database both come up, on one schema,
  with the start-up config applied once.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import psycopg
import pytest

from switchgear.controlplane.snapshot import version_seq
from switchgear.supervise import Proc
from switchgear.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from tests.test_tasks_e2e import FINAL, RESOURCES_YAML, chat_payload, set_faults, wait_until

pytestmark = pytest.mark.timeout(180)

TOKEN = "replica-test-token"
AGENT_TOKEN = "replica-test-agent-token"
TASKS = 60
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CONFIG = RESOURCES_YAML + """\
  services:
    llm_services:
      local_models:
        - name: "chat"
          model: "gpt-4o-mini"
          endpoints:
            - id: "a"
              url: "{url}/v1"
"""


class Replicas:
    def __init__(self, workdir: Path, dsn: str) -> None:
        self.workdir = workdir
        self.dsn = dsn
        self.procs: list[Proc] = []
        self.cps: dict[str, Proc] = {}
        self.agents: dict[str, Proc] = {}
        self.token_file = workdir / "admin-token"
        self.agent_token_file = workdir / "agent-token"
        self.token_file.write_text(TOKEN + "\n", encoding="utf-8")
        self.token_file.chmod(0o600)
        self.agent_token_file.write_text(AGENT_TOKEN + "\n", encoding="utf-8")  # every replica takes the same one
        self.agent_token_file.chmod(0o600)
        self.emulator_url = ""
        self.config = workdir / "config.yaml"

    def start_emulator(self) -> None:
        proc = Proc.switchgear("emulator", ["emulate", "openai", "--instance", "a:5"], self.workdir)
        self.procs.append(proc)
        line = proc.start(ready_prefix="{")
        (port,) = orjson.loads("{" + line).values()
        self.emulator_url = f"http://127.0.0.1:{port}"
        self.config.write_text(CONFIG.format(url=self.emulator_url), encoding="utf-8")

    def control_plane(self, name: str) -> Proc:
        proc = Proc.switchgear(name, [
            "controlplane", "--store", self.dsn, "--listen", "127.0.0.1:0", "--replica-id", name,
            "--admin-token-file", str(self.token_file), "--agent-token-file", str(self.agent_token_file),
            "--config", str(self.config), "--no-probes",
            "--report-interval", "0.5", "--task-lease-ttl", "1.5",
        ], self.workdir)
        self.procs.append(proc)
        self.cps[name] = proc
        return proc

    def start_control_planes(self, *names: str) -> None:
        """Side by side, all at the same moment (they race for the migration and the lead)."""
        procs = [self.control_plane(n) for n in names]
        threads = [threading.Thread(target=p.start) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(p.running() and p.address for p in procs), [p.tail() for p in procs]

    def start_agent(self, name: str, addresses: list[str]) -> None:
        proc = Proc.switchgear(name, [
            "agent", "--auth", "none", "--control-plane", ",".join(addresses), "--listen", "127.0.0.1:0",
            "--node-id", name, "--task-capacity", "4", "--task-cpu", "8", "--task-memory", "16Gi",
            "--agent-token-file", str(self.agent_token_file),
        ], self.workdir)
        self.procs.append(proc)
        self.agents[name] = proc
        proc.start()

    def live(self) -> list[Proc]:
        return [p for p in self.cps.values() if p.running()]

    def admin(self, cp: Proc) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cp.address))

    def tasks(self, cp: Proc) -> tasks_pb2_grpc.TasksServiceStub:
        return tasks_pb2_grpc.TasksServiceStub(grpc.insecure_channel(cp.address))

    def leader(self) -> tuple[str, str, int]:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT replica, address, epoch FROM leader WHERE id = 1").fetchone()
        return ("", "", 0) if row is None else (str(row[0]), str(row[1]), int(row[2]))

    def agent_versions(self) -> dict[str, str]:
        """Acked version of every agent connected to a live replica."""
        seen: dict[str, str] = {}
        for cp in self.live():
            for a in self.admin(cp).ListAgents(admin_pb2.ListAgentsRequest(), metadata=AUTH, timeout=5).agents:
                if a.connected:
                    seen[a.node.id] = a.acked_version
        return seen

    def served_versions(self) -> set[str]:
        return {self.admin(cp).ListAgents(admin_pb2.ListAgentsRequest(), metadata=AUTH, timeout=5).current_version
                for cp in self.live()}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(20)}" for p in self.procs)


class Load:
    """A bounded client load: a few threads invoking `chat` round-robin over the agents."""

    def __init__(self, addresses: list[str], threads: int = 3, cap: int = 5000) -> None:
        self._stubs = [gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(a)) for a in addresses]
        self._stop = threading.Event()
        self._cap = cap
        self._lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        payload = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
        for n in itertools.count(index):
            if self._stop.is_set() or self.ok + len(self.failures) >= self._cap:
                return
            stub = self._stubs[n % len(self._stubs)]
            try:
                stub.Invoke(gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=payload),
                            timeout=10)
                with self._lock:
                    self.ok += 1
            except grpc.RpcError as exc:
                with self._lock:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


@pytest.fixture
def replicas(tmp_path: Path, pg_dsn: str) -> Iterator[Replicas]:
    r = Replicas(tmp_path, pg_dsn)
    try:
        r.start_emulator()
        yield r
    finally:
        r.stop()


def test_leader_killed_under_load(replicas: Replicas) -> None:
    r = replicas
    r.start_control_planes("cp-1", "cp-2", "cp-3")
    addresses = [p.address for p in r.cps.values()]
    for i in range(3):  # each agent starts on a different replica and knows all three
        r.start_agent(f"agent-{i + 1}", addresses[i:] + addresses[:i])
    wait_until(lambda: len(r.agent_versions()) == 3
               and len(set(r.agent_versions().values()) | r.served_versions()) == 1, 20, "three agents on one version")
    wait_until(lambda: r.leader()[2] > 0, 10, "a leader")
    leader_name, leader_address, epoch = r.leader()

    set_faults(r.emulator_url, {"latency_ms": 200})
    with Load([p.address for p in r.agents.values()]) as load:
        wait_until(lambda: load.ok >= 30, 20, "load to flow")
        # Tasks submitted through a follower (forwarded to the leader), many open at the kill.
        follower = next(p for n, p in r.cps.items() if n != leader_name)
        stub = r.tasks(follower)
        ids = [stub.SubmitTask(tasks_pb2.SubmitTaskRequest(
            service="chat", method="chat.completions", payload=chat_payload(i), idempotency_key=f"k{i}",
            tenant="t"), metadata=AUTH, timeout=5).task.id for i in range(TASKS)]

        def done() -> int:
            listed = stub.ListTasks(tasks_pb2.ListTasksRequest(limit=1000), metadata=AUTH, timeout=5).tasks
            return sum(t.state == tasks_pb2.TASK_STATE_SUCCEEDED for t in listed)

        wait_until(lambda: done() >= 5, 20, "some tasks to finish")
        open_at_kill = TASKS - done()
        killed_at = time.monotonic()
        r.cps[leader_name].kill()
        wait_until(lambda: r.leader()[2] > epoch and r.leader()[0] != leader_name, 5, "a new leader within 5 s")
        took = time.monotonic() - killed_at
        new_leader = r.leader()
        assert new_leader[1] != leader_address
        # Agents of the dead replica reconnect to live ones: all three seen by the two left.
        wait_until(lambda: len(r.agent_versions()) == 3, 15, "every agent on a live replica")

        # An admin change right after, through a live replica, reaches every agent.
        live = r.live()[0]
        service = common_pb2.Service(
            name="chat-2", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", model="gpt-4o-mini",
            endpoints=[common_pb2.Endpoint(id="a", url=f"{r.emulator_url}/v1", weight=1)])
        version = r.admin(live).RegisterService(admin_pb2.RegisterServiceRequest(service=service), metadata=AUTH,
                                                timeout=5).version
        wait_until(lambda: set(r.agent_versions().values()) == {version}, 10, f"every agent on {version}")

        def fleet_seen_everywhere() -> bool:  # ListAgents on any replica lists the whole fleet
            for cp in r.live():
                listed = r.admin(cp).ListAgents(admin_pb2.ListAgentsRequest(), metadata=AUTH, timeout=5).agents
                if {(a.node.id, a.connected, a.acked_version) for a in listed} != \
                        {(name, True, version) for name in r.agents}:
                    return False
            return True

        wait_until(fleet_seen_everywhere, 10, "every replica to list all three agents")
        for agent in r.agents.values():
            gw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(agent.address))
            gw.Invoke(gateway_pb2.InvokeRequest(service="chat-2", method="chat.completions",
                                                payload=chat_payload(0)), timeout=10)
        served_after = load.ok
        wait_until(lambda: load.ok >= served_after + 30, 20, "load to keep flowing")

        # The fleet's figures are the leader's: a follower forwards GetStats to it, and the new
        # leader's windows hold the load every replica relayed since it took over.
        follower = next(p for n, p in r.cps.items() if p.running() and n != new_leader[0])

        def chat_requests() -> int:
            stats = r.admin(follower).GetStats(admin_pb2.GetStatsRequest(service="chat"), metadata=AUTH, timeout=5)
            return sum(row.request_count for row in stats.stats if row.endpoint == "") if stats.reporting_agents == 3 \
                else 0

        wait_until(lambda: chat_requests() > 0, 10, "fleet figures through a follower")
    assert load.failures == [], load.failures[:5]
    print(f"leader {leader_name} killed with {open_at_kill} tasks open; {new_leader[0]} led after {took:.2f} s; "
          f"{load.ok} requests, 0 failed")
    assert open_at_kill >= 10

    # Every task finished exactly once, through whichever replica the agents reached.
    set_faults(r.emulator_url, {"latency_ms": 5})
    stub = r.tasks(r.live()[0])

    def states() -> dict[str, int]:
        return {t.id: t.state for t in stub.ListTasks(tasks_pb2.ListTasksRequest(limit=1000), metadata=AUTH,
                                                       timeout=5).tasks}

    try:
        wait_until(lambda: all(states().get(i) in FINAL for i in ids), 30, "every task final")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {states()}\n{r.tails()}") from None
    assert all(states()[i] == tasks_pb2.TASK_STATE_SUCCEEDED for i in ids)
    with psycopg.connect(r.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (TASKS,)
        succeeded = conn.execute("SELECT task_id, count(*) FROM task_attempts WHERE outcome = 'succeeded' "
                                 "GROUP BY task_id").fetchall()
        assert sorted(t for t, _ in succeeded) == sorted(ids) and all(n == 1 for _, n in succeeded)
        audit = conn.execute("SELECT id, action, target, version FROM audit ORDER BY id").fetchall()
    registered = [row for row in audit if row[1] == "register_service" and row[2] == "chat-2"]
    assert len(registered) == 1 and registered[0][3] == version
    assert sum(1 for row in audit if row[1] == "apply_config") == 1  # three replicas, one config, applied once
    seqs = [version_seq(row[3]) for row in audit]
    assert seqs == sorted(seqs)  # monotonic in commit order
    by_seq: dict[int, set[str]] = {}
    for row in audit:
        by_seq.setdefault(version_seq(row[3]), set()).add(row[3])
    assert all(len(v) == 1 for v in by_seq.values())  # one version string per seq: unique


def test_two_replicas_started_together_on_an_empty_database(replicas: Replicas) -> None:
    r = replicas
    r.start_control_planes("cp-a", "cp-b")
    wait_until(lambda: len(r.served_versions()) == 1, 10, "both replicas on one version")
    with psycopg.connect(r.dsn) as conn:
        applied = conn.execute("SELECT count(*) FROM audit WHERE action = 'apply_config'").fetchone()
        tables = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'services'"
                              ).fetchone()
    assert applied == (1,) and tables == (1,)
    (version,) = r.served_versions()
    names = {s.name for cp in r.live() for s in r.admin(cp).ListServices(
        admin_pb2.ListServicesRequest(), metadata=AUTH, timeout=5).services}
    assert names == {"chat"} and version_seq(version) >= 1
    wait_until(lambda: r.leader()[0] in ("cp-a", "cp-b"), 10, "one of them to lead")


def test_only_the_leader_purges_finished_tasks(replicas: Replicas) -> None:
    """Two replicas on a store holding a backlog of finished tasks older than the retention:
    the leader deletes them in bites (one log line for the round), the follower never purges,
    and the unfinished task and the blob it names stay."""
    from switchgear.controlplane import pg
    from switchgear.controlplane.tasks.model import Resources, Task, TaskState
    from switchgear.controlplane.tasks.store_pg import PgTaskStore

    r = replicas
    backlog = 1100  # three bites of 500
    with pg.connect(r.dsn) as conn:
        pg.migrate(conn)
        store = PgTaskStore(conn)
        blob = store.put_blob(b'{"doc": 1}', "application/json", 1.0, tenant="acme")
        for i in range(backlog):
            store.insert(Task(id=f"old-{i}", tenant="acme", service="chat", category="llm", method="m", priority=5,
                              requirements=Resources(), submitted_at=1.0, state=TaskState.SUCCEEDED, finished_at=2.0))
        store.insert(Task(id="waiting", tenant="acme", service="chat", category="llm", method="m", priority=5,
                          requirements=Resources(), submitted_at=1.0, payload_blob_id=blob))
    r.start_control_planes("cp-a", "cp-b")

    def finished_left() -> int:
        with psycopg.connect(r.dsn) as c:
            row = c.execute("SELECT count(*) FROM tasks WHERE id LIKE 'old-%'").fetchone()
        return int(row[0]) if row else -1

    wait_until(lambda: finished_left() == 0, 20, "the leader to purge the backlog")
    leader = r.leader()[0]
    follower = ({"cp-a", "cp-b"} - {leader}).pop()
    wait_until(lambda: "task retention" in r.cps[leader].log_path.read_text(encoding="utf-8"), 10, "its log line")
    lines = [x for x in r.cps[leader].log_path.read_text(encoding="utf-8").splitlines() if "task retention" in x]
    assert len(lines) == 1 and f"deleted {backlog} finished task(s)" in lines[0], lines
    assert "task retention" not in r.cps[follower].log_path.read_text(encoding="utf-8")
    with psycopg.connect(r.dsn) as c:
        kept = c.execute("SELECT count(*) FROM tasks WHERE id = 'waiting'").fetchone()
        blobs = c.execute("SELECT count(*) FROM task_blobs").fetchone()
    assert (kept, blobs) == ((1,), (1,))
