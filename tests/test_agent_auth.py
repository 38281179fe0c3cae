"""Agents authenticate to the control plane, by default (agent_auth.py).

Against a real control plane started with default settings: every agent call is refused
(UNAUTHENTICATED) anonymously, with the admin token and with a tenant's key, and does nothing;
the agent token opens no operator call; load reports are taken only for the node whose snapshot
stream the report token came from; a tenant cannot name another tenant's blob; a listener off
loopback refuses to start without agent authentication; TLS without a client CA still needs the
token, and with one a client certificate is the credential. An agent without a credential says
so in one line, without a traceback.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from switchgear.adapters import builtin_adapters
from switchgear.cli import main
from switchgear.controlplane.server import Options, StartupError, _check_agent_auth
from switchgear.dataplane.client import Applier, Backoff, SnapshotClient
from switchgear.dataplane.server import agent_token
from switchgear.dataplane.snapshot import Holder
from switchgear.supervise import Proc, ProcessFailed
from switchgear.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    discovery_pb2,
    discovery_pb2_grpc,
    governance_pb2,
    governance_pb2_grpc,
    loadreport_pb2,
    loadreport_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from tests.certs import make_certs
from tests.test_replicas_e2e import CONFIG

pytestmark = pytest.mark.timeout(90)

CHAT = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Plane:
    proc: Proc
    address: str
    admin_token: str
    agent_token: str
    keys: dict[str, str]  # tenant -> client key
    channel: grpc.Channel

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    def tasks(self) -> tasks_pb2_grpc.TasksServiceStub:
        return tasks_pb2_grpc.TasksServiceStub(self.channel)

    def governance(self) -> governance_pb2_grpc.GovernanceServiceStub:
        return governance_pb2_grpc.GovernanceServiceStub(self.channel)

    def submit(self, tenant: str, key: str = "") -> tasks_pb2.Task:
        reply = self.tasks().SubmitTask(tasks_pb2.SubmitTaskRequest(
            service="chat", method="chat.completions", payload=CHAT, tenant=tenant),
            timeout=5, metadata=bearer(key or self.admin_token))
        return reply.task


def start_control_plane(workdir: Path, *extra: str) -> Proc:
    config = workdir / "config.yaml"
    config.write_text(CONFIG.format(url="http://127.0.0.1:9"), encoding="utf-8")  # one service, "chat"
    proc = Proc.switchgear("cp", ["controlplane", "--db", str(workdir / "r.db"), "--listen", "127.0.0.1:0",
                                  "--config", str(config), "--no-probes", *extra], workdir)
    proc.start()
    return proc


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    workdir = tmp_path_factory.mktemp("agent-auth")
    proc = start_control_plane(workdir)  # default settings: nothing about auth given
    try:
        db = workdir / "r.db"
        agent_file = Path(f"{db}.agent-token")
        assert agent_file.stat().st_mode & 0o777 == 0o600
        channel = grpc.insecure_channel(proc.address)
        p = Plane(proc, proc.address, Path(f"{db}.admin-token").read_text().strip(),
                  agent_file.read_text().strip(), {}, channel)
        assert p.agent_token != p.admin_token
        gov = p.governance()
        for tenant in ("acme", "globex"):
            gov.CreateTenant(governance_pb2.CreateTenantRequest(tenant=governance_pb2.Tenant(id=tenant)),
                             timeout=5, metadata=bearer(p.admin_token))
            p.keys[tenant] = gov.IssueKey(governance_pb2.IssueKeyRequest(tenant=tenant), timeout=5,
                                          metadata=bearer(p.admin_token)).secret
        yield p
        channel.close()
    finally:
        proc.stop()


# -- every agent call, as each caller that is not an agent ---------------------------------


def agent_calls(plane: Plane, task: tasks_pb2.Task) -> dict[str, Callable[[Metadata], Any]]:
    """One call of each agent method, made with the given metadata; each returns when refused."""
    snapshots = discovery_pb2_grpc.DiscoveryServiceStub(plane.channel)
    reports = loadreport_pb2_grpc.LoadReportingServiceStub(plane.channel)
    tasks = plane.tasks()
    node = discovery_pb2.Node(id="intruder")
    forged = loadreport_pb2.StreamLoadStatsRequest(
        node=discovery_pb2.Node(id="intruder"), tenant_loads=[loadreport_pb2.TenantLoad(tenant="acme", cost_usd=5000)])
    return {
        "StreamSnapshots": lambda md: list(snapshots.StreamSnapshots(
            iter([discovery_pb2.StreamSnapshotsRequest(node=node)]), timeout=5, metadata=md)),
        "StreamLoadStats": lambda md: list(reports.StreamLoadStats(iter([forged]), timeout=5, metadata=md)),
        "LeaseTasks": lambda md: tasks.LeaseTasks(tasks_pb2.LeaseTasksRequest(
            agent="intruder", capacity=10, max_tasks=10, services=["chat"],
            resources=tasks_pb2.Resources(cpu=8, memory_bytes=16 * 1024**3)), timeout=5, metadata=md),
        "HeartbeatTask": lambda md: tasks.HeartbeatTask(tasks_pb2.HeartbeatTaskRequest(
            task_id=task.id, lease_id="x", agent="intruder"), timeout=5, metadata=md),
        "CompleteTask": lambda md: tasks.CompleteTask(tasks_pb2.CompleteTaskRequest(
            task_id=task.id, lease_id="x", agent="intruder", outcome=tasks_pb2.TASK_OUTCOME_SUCCEEDED,
            result=b'{"forged": true}'), timeout=5, metadata=md),
        "DownloadBlob": lambda md: list(tasks.DownloadBlob(tasks_pb2.DownloadBlobRequest(
            blob_id="sha256:00", task_id=task.id, lease_id="x"), timeout=5, metadata=md)),
        "DeferInvoke": lambda md: tasks.DeferInvoke(tasks_pb2.DeferInvokeRequest(
            request_id="forged-1", service="chat", method="chat.completions", payload=CHAT, tenant="acme"),
            timeout=5, metadata=md),
    }


@pytest.mark.parametrize("caller", ["anonymous", "admin token", "tenant key", "wrong token"])
def test_every_agent_call_is_refused_without_the_agent_credential(plane: Plane, caller: str) -> None:
    task, cost_before = plane.submit("acme"), acme_cost(plane)  # other tests' real reports count too
    metadata = {"anonymous": (), "admin token": bearer(plane.admin_token),
                "tenant key": bearer(plane.keys["acme"]), "wrong token": bearer(plane.agent_token + "x")}[caller]
    calls = agent_calls(plane, task)
    assert len(calls) == 7
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call(metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name  # type: ignore[attr-defined]
        assert "agent token" in refused.value.details(), name  # type: ignore[attr-defined]
    # ...and none of them did anything: the task is still queued, no agent or forged task appeared.
    assert plane.tasks().GetTask(tasks_pb2.GetTaskRequest(id=task.id), timeout=5,
                                 metadata=bearer(plane.admin_token)).task.state == tasks_pb2.TASK_STATE_QUEUED
    listed = plane.tasks().ListTasks(tasks_pb2.ListTasksRequest(), timeout=5, metadata=bearer(plane.admin_token))
    assert all(t.origin != "defer" for t in listed.tasks)
    agents = plane.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=5, metadata=bearer(plane.admin_token))
    assert "intruder" not in {a.node.id for a in agents.agents}
    assert acme_cost(plane) == cost_before  # the forged $5,000 report did not count


def test_the_agent_token_opens_no_operator_or_application_call(plane: Plane) -> None:
    as_agent = bearer(plane.agent_token)
    calls = {
        "ListServices": lambda: plane.admin().ListServices(admin_pb2.ListServicesRequest(), timeout=5,
                                                           metadata=as_agent),
        "ListTenants": lambda: plane.governance().ListTenants(governance_pb2.ListTenantsRequest(), timeout=5,
                                                              metadata=as_agent),
        "SubmitTask": lambda: plane.submit("acme", key=plane.agent_token),
        "ListTasks": lambda: plane.tasks().ListTasks(tasks_pb2.ListTasksRequest(), timeout=5, metadata=as_agent),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name  # type: ignore[attr-defined]


# -- the happy path, and load reports bound to the node's snapshot stream ------------------


class SnapshotStream:
    """A snapshot stream held open (as an agent would) on a thread; `report_token` is the one
    the control plane issued it."""

    def __init__(self, plane: Plane, node_id: str) -> None:
        self._requests: queue.Queue[discovery_pb2.StreamSnapshotsRequest | None] = queue.Queue()
        self._requests.put(discovery_pb2.StreamSnapshotsRequest(node=discovery_pb2.Node(id=node_id)))
        stub = discovery_pb2_grpc.DiscoveryServiceStub(plane.channel)
        self.call = stub.StreamSnapshots(iter(self._requests.get, None), metadata=bearer(plane.agent_token))
        self.report_token = dict(self.call.initial_metadata())["switchgear-report-token"]  # type: ignore[attr-defined]
        self.first = next(self.call)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()  # type: ignore[attr-defined]


def report(plane: Plane, node_id: str, report_token: str, cost_usd: float) -> None:
    """One load report for `node_id` carrying `cost_usd` for acme, then the stream is closed."""
    metadata = (*bearer(plane.agent_token), *((("switchgear-report-token", report_token),) if report_token else ()))
    request = loadreport_pb2.StreamLoadStatsRequest(
        node=discovery_pb2.Node(id=node_id), tenant_loads=[loadreport_pb2.TenantLoad(tenant="acme", cost_usd=cost_usd)])
    stub = loadreport_pb2_grpc.LoadReportingServiceStub(plane.channel)
    responses = stub.StreamLoadStats(iter([request]), timeout=5, metadata=metadata)
    assert next(responses).load_reporting_interval.ToNanoseconds() > 0
    for _ in responses:
        pass


def acme_cost(plane: Plane) -> float:
    usage = plane.governance().GetUsage(governance_pb2.GetUsageRequest(tenant="acme"), timeout=5,
                                        metadata=bearer(plane.admin_token)).usage
    return sum(u.cost_total_usd for u in usage)


def test_an_agent_with_the_token_subscribes_reports_and_runs_tasks(plane: Plane) -> None:
    stream = SnapshotStream(plane, "agent-ok")
    try:
        assert stream.first.snapshot.services and stream.report_token
        before = acme_cost(plane)
        report(plane, "agent-ok", stream.report_token, 0.25)
        assert acme_cost(plane) == pytest.approx(before + 0.25)
        task = plane.submit("acme")
        tasks = plane.tasks()
        leased = tasks.LeaseTasks(tasks_pb2.LeaseTasksRequest(
            agent="agent-ok", capacity=50, max_tasks=50, services=["chat"],  # room for every queued task
            resources=tasks_pb2.Resources(cpu=1000, memory_bytes=1000 * 1024**3)), timeout=5,
            metadata=bearer(plane.agent_token))
        assert task.id in {lease.task.id for lease in leased.leases}
        for lease in leased.leases:
            done = tasks.CompleteTask(tasks_pb2.CompleteTaskRequest(
                task_id=lease.task.id, lease_id=lease.lease_id, agent="agent-ok",
                outcome=tasks_pb2.TASK_OUTCOME_RELEASED), timeout=5, metadata=bearer(plane.agent_token))
            assert done.accepted
    finally:
        stream.close()


def test_load_reports_are_taken_only_for_the_node_holding_the_snapshot_stream(plane: Plane) -> None:
    victim, other = SnapshotStream(plane, "victim"), SnapshotStream(plane, "other")
    try:
        before = acme_cost(plane)
        forgeries = {"no report token": ("victim", ""), "another node's token": ("victim", other.report_token),
                     "a made-up token": ("victim", "guess"), "a node that is not connected": ("ghost", "")}
        for why, (node, token) in forgeries.items():
            with pytest.raises(grpc.RpcError) as refused:
                report(plane, node, token, 5000.0)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, why  # type: ignore[attr-defined]
        assert acme_cost(plane) == before  # not one of the $5,000 reports counted
        report(plane, "victim", victim.report_token, 1.0)  # the node itself still reports
        assert acme_cost(plane) == pytest.approx(before + 1.0)
        token = victim.report_token
        victim.close()

        def closed() -> bool:
            agents = plane.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=5,
                                              metadata=bearer(plane.admin_token)).agents
            return not any(a.node.id == "victim" and a.connected for a in agents)

        deadline = time.monotonic() + 10
        while not closed():
            assert time.monotonic() < deadline, "the victim's snapshot stream did not end"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as stale:  # its token died with its stream
            report(plane, "victim", token, 1.0)
        assert stale.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    finally:
        victim.close()
        other.close()


# -- blobs belong to the uploading tenant ---------------------------------------------------


def test_a_tenant_cannot_submit_a_task_naming_another_tenants_blob(plane: Plane) -> None:
    tasks = plane.tasks()
    body = orjson.dumps({"messages": [{"role": "user", "content": "acme's secret document"}]})
    uploaded = tasks.UploadBlob(iter([tasks_pb2.UploadBlobRequest(chunk=body)]), timeout=5,
                                metadata=bearer(plane.keys["acme"]))

    def submit(key: str, blob_id: str) -> tasks_pb2.SubmitTaskResponse:
        return tasks.SubmitTask(tasks_pb2.SubmitTaskRequest(service="chat", method="chat.completions",
                                                            payload_blob_id=blob_id), timeout=5, metadata=bearer(key))

    refusals = []
    for blob_id in (uploaded.blob_id, "sha256:" + "0" * 64):  # another tenant's blob, and no blob at all
        with pytest.raises(grpc.RpcError) as refused:
            submit(plane.keys["globex"], blob_id)
        refusals.append((refused.value.code(), refused.value.details().replace(blob_id, "ID")))  # type: ignore[attr-defined]
    assert refusals[0] == refusals[1]  # the answer does not confirm that the blob exists
    assert refusals[0][0] == grpc.StatusCode.NOT_FOUND and "payload_blob_id" in refusals[0][1]
    own = submit(plane.keys["acme"], uploaded.blob_id).task
    assert own.tenant == "acme" and own.payload_blob_id == uploaded.blob_id


# -- start-up rules --------------------------------------------------------------------------


def refused_at_start(proc: Proc) -> int | None:
    """The exit code of a process that must exit instead of printing READY."""
    with pytest.raises(ProcessFailed, match="exited"):
        proc.start(timeout_s=20)
    deadline = time.monotonic() + 10
    while proc.returncode() is None and time.monotonic() < deadline:  # stdout closes a moment before the exit
        time.sleep(0.02)
    return proc.returncode()


def test_a_listener_off_loopback_needs_agent_authentication_or_the_insecure_flag(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    with pytest.raises(StartupError, match=r"--agent-auth none on 0\.0\.0\.0:50051, which is not a loopback"):
        _check_agent_auth(Options(db_path=db, listen="0.0.0.0:50051", agent_auth=False))
    with pytest.raises(StartupError, match="--insecure-agents goes with --agent-auth none"):
        _check_agent_auth(Options(db_path=db, listen="0.0.0.0:50051", insecure_agents=True))
    for listen in ("127.0.0.1:0", "[::1]:0", "localhost:0"):  # loopback development
        _check_agent_auth(Options(db_path=db, listen=listen, agent_auth=False))
    _check_agent_auth(Options(db_path=db, listen="0.0.0.0:50051", agent_auth=False, insecure_agents=True))
    # The command exits with the one-line reason before it binds anything.
    proc = Proc.switchgear("cp-open", ["controlplane", "--db", db, "--listen", "0.0.0.0:0", "--agent-auth", "none"],
                           tmp_path)
    assert refused_at_start(proc) == 2
    log = proc.log_path.read_text()
    assert "not a loopback address" in log and "--insecure-agents" in log and "Traceback" not in log


def test_the_admin_token_cannot_double_as_the_agent_token(tmp_path: Path) -> None:
    shared = tmp_path / "same-token"
    shared.write_text("one-token-for-both\n")
    shared.chmod(0o600)
    proc = Proc.switchgear("cp-same", ["controlplane", "--db", str(tmp_path / "r.db"), "--listen", "127.0.0.1:0",
                                       "--admin-token-file", str(shared), "--agent-token-file", str(shared)], tmp_path)
    assert refused_at_start(proc) == 2
    assert "is the admin token" in proc.log_path.read_text()


def test_agent_auth_none_on_loopback_really_turns_it_off(tmp_path: Path) -> None:
    proc = start_control_plane(tmp_path, "--agent-auth", "none")
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = discovery_pb2_grpc.DiscoveryServiceStub(channel)
            responses = stub.StreamSnapshots(iter([discovery_pb2.StreamSnapshotsRequest(
                node=discovery_pb2.Node(id="dev"))]), timeout=5)
            assert next(responses).snapshot.services  # anonymous, as asked for
        assert "AGENT AUTH IS OFF" in proc.log_path.read_text()
    finally:
        proc.stop()


# -- TLS: without a client CA the token is still needed; with one, a certificate is the credential


def lease_with(address: str, credentials: grpc.ChannelCredentials, metadata: Metadata) -> grpc.StatusCode:
    with grpc.secure_channel(address, credentials) as channel:
        try:
            tasks_pb2_grpc.TasksServiceStub(channel).LeaseTasks(tasks_pb2.LeaseTasksRequest(
                agent="tls-agent", capacity=1, max_tasks=1, services=["chat"],
                resources=tasks_pb2.Resources(cpu=8, memory_bytes=16 * 1024**3)), timeout=5, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_tls_without_a_client_ca_still_needs_the_agent_token(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    proc = start_control_plane(tmp_path, "--tls-cert", certs.server_cert, "--tls-key", certs.server_key)
    try:
        token = Path(f"{tmp_path / 'r.db'}.agent-token").read_text().strip()
        server_only = grpc.ssl_channel_credentials(Path(certs.ca).read_bytes())
        assert lease_with(proc.address, server_only, ()) == grpc.StatusCode.UNAUTHENTICATED
        assert lease_with(proc.address, server_only, bearer(token)) == grpc.StatusCode.OK
    finally:
        proc.stop()


def test_with_a_client_ca_a_certificate_is_the_agent_credential(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    proc = start_control_plane(tmp_path, "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                               "--tls-client-ca", certs.ca)
    try:
        ca = Path(certs.ca).read_bytes()
        with_cert = grpc.ssl_channel_credentials(ca, Path(certs.client_key).read_bytes(),
                                                 Path(certs.client_cert).read_bytes())
        assert lease_with(proc.address, with_cert, ()) == grpc.StatusCode.OK  # no token needed
        # Without a certificate the handshake fails, token or not.
        token = Path(f"{tmp_path / 'r.db'}.agent-token").read_text().strip()
        assert lease_with(proc.address, grpc.ssl_channel_credentials(ca), bearer(token)) == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.stop()


# -- an agent without a credential says so, once per attempt, without a traceback ----------


def test_an_agent_without_the_token_logs_one_clear_line_per_attempt(plane: Plane, tmp_path: Path) -> None:
    agent = Proc.switchgear("no-token", ["agent", "--auth", "none", "--control-plane", plane.address,
                                         "--listen", "127.0.0.1:0", "--node-id", "no-token"], tmp_path,
                            env={"SWITCHGEAR_AGENT_TOKEN": ""})
    agent.start()
    try:
        def refusals() -> list[str]:
            return [line for line in agent.log_path.read_text().splitlines()
                    if "refused this agent's credential" in line]

        deadline = time.monotonic() + 20
        while len(refusals()) < 3:  # it keeps trying (with backoff): the token may be fixed meanwhile
            assert time.monotonic() < deadline, agent.tail()
            time.sleep(0.05)
        log = agent.log_path.read_text()
        assert "Traceback" not in log
        assert all("ERROR" in line and "--agent-token-file" in line for line in refusals())
        assert "no agent credential" in log  # said once at start, before the first refusal
        assert agent.running()
    finally:
        agent.stop()


def test_an_agent_takes_its_token_from_the_flag_or_the_environment_and_refuses_a_bad_file(tmp_path: Path) -> None:
    good, empty = tmp_path / "good", tmp_path / "empty"
    good.write_text(" from-file \n")
    empty.write_text("\n")
    assert agent_token(str(good), {"SWITCHGEAR_AGENT_TOKEN": "from-env"}) == "from-file"  # the flag wins
    assert agent_token(None, {"SWITCHGEAR_AGENT_TOKEN": " from-env\n"}) == "from-env"
    assert agent_token(None, {}) is None
    for path, why in ((tmp_path / "missing", "missing: No such file"), (empty, "empty is empty")):
        with pytest.raises(SystemExit, match=why):  # before anything starts, naming the file
            main(["agent", "--control-plane", "127.0.0.1:9", "--listen", "127.0.0.1:0",
                  "--agent-token-file", str(path)])


async def test_agents_with_the_token_resubscribe_to_a_restarted_control_plane(tmp_path: Path) -> None:
    """The token rides on each call: three agents reconnecting at once to a control plane killed
    and restarted on the same port all come back (with a channel interceptor carrying the token,
    grpc.aio left some of them hanging)."""
    cp = start_control_plane(tmp_path)
    port = cp.address.rsplit(":", 1)[1]
    token = Path(f"{tmp_path / 'r.db'}.agent-token").read_text().strip()
    adapters = builtin_adapters()
    holders = [Holder() for _ in range(3)]
    clients = [SnapshotClient([cp.address], discovery_pb2.Node(id=f"a{i}", protocols=sorted(adapters)), holder,
                              Applier(holder, adapters), backoff=Backoff(0.05, 1.0), token=token)
               for i, holder in enumerate(holders)]
    stop = asyncio.Event()
    running = [asyncio.ensure_future(c.run(stop)) for c in clients]

    async def all_hold(version: str) -> None:
        while not all(h.current is not None and h.version == version for h in holders):
            await asyncio.sleep(0.02)

    try:
        with grpc.insecure_channel(cp.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            first = admin.GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5, metadata=bearer(cp_admin(tmp_path)))
        await asyncio.wait_for(all_hold(first.snapshot.version), 10)
        cp.kill()
        await asyncio.sleep(0.2)  # agents retry against the dead port meanwhile (where the hang was)
        cp = Proc.switchgear("cp-again", ["controlplane", "--db", str(tmp_path / "r.db"), "--listen",
                                          f"127.0.0.1:{port}", "--no-probes"], tmp_path)
        cp.start()
        with grpc.insecure_channel(cp.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            changed = admin.DeregisterService(admin_pb2.DeregisterServiceRequest(name="chat"), timeout=5,
                                              metadata=bearer(cp_admin(tmp_path)))
        await asyncio.wait_for(all_hold(changed.version), 15)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*running), 10)
        finally:
            cp.stop()  # even when an agent hangs: the control plane must not outlive the test


def cp_admin(workdir: Path) -> str:
    return Path(f"{workdir / 'r.db'}.admin-token").read_text().strip()
