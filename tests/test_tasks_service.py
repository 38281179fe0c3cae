"""TasksService in process: submission errors and their codes, idempotency, blobs, Watch,
cancellation, the document fallback hook, and a real TaskWorker (fake invoker) end to end
over gRPC on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import orjson
import pytest

from switchgear.adapters.base import ErrorKind, TokenUsage, UpstreamError
from switchgear.controlplane import grpc_port
from switchgear.controlplane.grpc_port import GRPC_LIMITS, GRPC_SERVERS
from switchgear.controlplane.model import (
    Category,
    EndpointSpec,
    RegistryState,
    ResourceAllocationSettings,
    ServiceSpec,
    Settings,
)
from switchgear.controlplane.tasks.lifecycle import RetryPolicy
from switchgear.controlplane.tasks.scheduler import SchedulerOptions
from switchgear.controlplane.tasks.service import TasksRuntime, UploadLimits, attach
from switchgear.dataplane.attempts import Resilience, ResilienceSettings
from switchgear.dataplane.convert import Call
from switchgear.dataplane.governance import Governance, TenantView
from switchgear.dataplane.invoke import CallFailed, Invoker, Result
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer
from switchgear.dataplane.resilience.fallback import FallbackSettings
from switchgear.dataplane.snapshot import AgentSnapshot, EndpointView, Holder, ServiceView
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.dataplane.worker import TasksClient, TaskWorker, WorkerOptions, WorkerResources
from switchgear.v1 import tasks_pb2, tasks_pb2_grpc
from tests.test_fallback_presets import dead_chat, snapshot_with
from tests.test_stream import ADAPTERS, CHAT, FirstUntried

GIB = 1024**3


def spec(name: str, category: Category, **metadata: str) -> ServiceSpec:
    return ServiceSpec(name=name, category=category, protocol="openai",
                       endpoints=(EndpointSpec("e0", "http://127.0.0.1:9/v1"),),
                       metadata=tuple(sorted(metadata.items())))


STATE = RegistryState(
    services=(spec("chat", Category.LLM), spec("docs", Category.DOCUMENT),
              spec("huge", Category.LLM, **{"resources.cpu": "64"})),
    settings=Settings(resource_allocation=ResourceAllocationSettings(default_cpu=8.0, default_memory_bytes=16 * GIB)),
)


@dataclass
class Plane:
    runtime: TasksRuntime
    stub: tasks_pb2_grpc.TasksServiceStub
    address: str


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    server = grpc.aio.server()
    runtime = attach(server, str(tmp_path / "cp.db"), lambda: STATE,
                     SchedulerOptions(lease_ttl_s=1.0, retry=RetryPolicy(0.05, 0.2)))
    async with serving(server, runtime) as running:
        yield running


@contextlib.asynccontextmanager
async def serving(server: grpc.aio.Server, runtime: TasksRuntime) -> AsyncIterator[Plane]:
    """`runtime` on `server`, listening on loopback, and a client of it."""
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runtime.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Plane(runtime, tasks_pb2_grpc.TasksServiceStub(channel), f"127.0.0.1:{port}")
    finally:
        await channel.close()
        await server.stop(None)
        await runtime.close()


def submit(**fields: Any) -> tasks_pb2.SubmitTaskRequest:
    base: dict[str, Any] = {"service": "chat", "method": "chat.completions", "payload": b'{"messages": []}'}
    base.update(fields)
    return tasks_pb2.SubmitTaskRequest(**base)


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"service": ""}, grpc.StatusCode.INVALID_ARGUMENT, "service: required"),
        ({"method": ""}, grpc.StatusCode.INVALID_ARGUMENT, "method: required"),
        ({"service": "nope"}, grpc.StatusCode.NOT_FOUND, "service: no service named 'nope'"),
        ({"payload": b"{oops"}, grpc.StatusCode.INVALID_ARGUMENT, "payload: not valid JSON"),
        ({"payload": b"[1]"}, grpc.StatusCode.INVALID_ARGUMENT, "payload: must be a JSON object"),
        ({"priority": 11}, grpc.StatusCode.INVALID_ARGUMENT, "priority: must be within 1..10"),
        ({"max_attempts": 99}, grpc.StatusCode.INVALID_ARGUMENT, "max_attempts"),
        ({"payload_blob_id": "sha256:00"}, grpc.StatusCode.NOT_FOUND, "payload_blob_id"),
        ({"service": "huge"}, grpc.StatusCode.FAILED_PRECONDITION,
         "Resource allocation failed: a llm task needs cpu 64 > 8"),
    ],
)
async def test_bad_submissions_get_the_right_code(plane: Plane, fields: dict[str, Any], code: grpc.StatusCode,
                                                  needle: str) -> None:
    await declare_worker(plane)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await plane.stub.SubmitTask(submit(**fields))
    assert info.value.code() == code
    assert needle in (info.value.details() or "")


async def declare_worker(plane: Plane, cpu: float = 8.0) -> None:
    """A live worker with a declared pool: what a new task is judged against."""
    await plane.stub.LeaseTasks(tasks_pb2.LeaseTasksRequest(
        agent="judge", capacity=1, max_tasks=1, services=[], resources=tasks_pb2.Resources(cpu=cpu)))


async def test_with_no_live_worker_a_big_task_queues_for_one_to_come(plane: Plane) -> None:
    reply = await plane.stub.SubmitTask(submit(service="huge"))
    assert reply.task.state == tasks_pb2.TASK_STATE_QUEUED


async def test_unfit_task_is_recorded_failed_and_idempotency_dedupes(plane: Plane) -> None:
    await declare_worker(plane)
    with pytest.raises(grpc.aio.AioRpcError):
        await plane.stub.SubmitTask(submit(service="huge"))
    failed = (await plane.stub.ListTasks(tasks_pb2.ListTasksRequest(states=[tasks_pb2.TASK_STATE_FAILED]))).tasks
    assert len(failed) == 1 and failed[0].error.kind == "resource_allocation"

    first = await plane.stub.SubmitTask(submit(idempotency_key="k", tenant="acme", priority=7))
    again = await plane.stub.SubmitTask(submit(idempotency_key="k", tenant="acme", priority=7))
    other_tenant = await plane.stub.SubmitTask(submit(idempotency_key="k", tenant="zeta"))
    assert first.created and not again.created and again.task.id == first.task.id
    assert other_tenant.created and other_tenant.task.id != first.task.id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await plane.stub.SubmitTask(submit(idempotency_key="k", tenant="acme", payload=b'{"other": 1}'))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    task = first.task
    assert task.state == tasks_pb2.TASK_STATE_QUEUED and task.priority == 7 and task.max_attempts == 3
    assert task.requirements.cpu == 2 and task.requirements.gpu == 0.5 and task.requirements.memory_bytes == 4 * GIB
    listed = await plane.stub.ListTasks(tasks_pb2.ListTasksRequest(tenant="acme", service="chat"))
    assert [t.id for t in listed.tasks] == [task.id]
    cancelled = await plane.stub.CancelTask(tasks_pb2.CancelTaskRequest(id=task.id))
    assert cancelled.task.state == tasks_pb2.TASK_STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await plane.stub.CancelTask(tasks_pb2.CancelTaskRequest(id=task.id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await plane.stub.GetTask(tasks_pb2.GetTaskRequest(id="missing"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_blob_round_trip_and_submission_by_blob(plane: Plane) -> None:
    body = orjson.dumps({"messages": [{"role": "user", "content": "x" * 700_000}]})

    async def chunks() -> AsyncIterator[tasks_pb2.UploadBlobRequest]:
        for start in range(0, len(body), 100_000):
            yield tasks_pb2.UploadBlobRequest(chunk=body[start:start + 100_000])

    uploaded = await plane.stub.UploadBlob(chunks())
    assert uploaded.size == len(body) and uploaded.blob_id.startswith("sha256:")
    reply = await plane.stub.SubmitTask(submit(payload_blob_id=uploaded.blob_id))
    assert reply.task.payload_blob_id == uploaded.blob_id and reply.task.payload == b""
    blob = uploaded.blob_id

    async def download(**fields: str) -> bytes:
        request = tasks_pb2.DownloadBlobRequest(blob_id=blob, **fields)
        return b"".join([p.chunk async for p in plane.stub.DownloadBlob(request)])

    for fields, code in (({}, grpc.StatusCode.INVALID_ARGUMENT),  # task_id and lease_id are required
                         ({"task_id": reply.task.id, "lease_id": "guessed"}, grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await download(**fields)
        assert refused.value.code() == code
    leased = await plane.stub.LeaseTasks(tasks_pb2.LeaseTasksRequest(
        agent="a1", capacity=1, max_tasks=1, services=["chat"], resources=tasks_pb2.Resources(cpu=8)))
    (lease,) = leased.leases
    assert await download(task_id=lease.task.id, lease_id=lease.lease_id) == body
    # Only while the lease is held: once the task is done, the lease opens nothing.
    await plane.stub.CompleteTask(tasks_pb2.CompleteTaskRequest(
        task_id=lease.task.id, lease_id=lease.lease_id, agent="a1", outcome=tasks_pb2.TASK_OUTCOME_SUCCEEDED,
        result=b"{}"))
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await download(task_id=lease.task.id, lease_id=lease.lease_id)
    assert late.value.code() == grpc.StatusCode.NOT_FOUND


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return check()


@pytest.fixture(params=GRPC_SERVERS)
async def small_uploads(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Plane]:
    """A control plane (on each gRPC server it runs) whose uploads in progress may hold 300 kB
    and send nothing for 0.5 s."""
    server = grpc_port.server(request.param, GRPC_LIMITS, ())
    runtime = attach(server, str(tmp_path / "cp.db"), lambda: STATE)
    runtime.servicer.uploads = UploadLimits(max_blob_bytes=250_000, max_uploading_bytes=300_000, idle_timeout_s=0.5)
    async with serving(server, runtime) as running:
        yield running


async def test_stalled_and_concurrent_uploads_hold_at_most_the_control_planes_upload_budget(
        small_uploads: Plane) -> None:
    plane, servicer = small_uploads, small_uploads.runtime.servicer
    go_on = asyncio.Event()

    async def upload(size: int, stall: bool = False) -> tasks_pb2.UploadBlobResponse:
        async def chunks() -> AsyncIterator[tasks_pb2.UploadBlobRequest]:
            for start in range(0, size, 50_000):
                yield tasks_pb2.UploadBlobRequest(chunk=bytes([size % 251]) * min(50_000, size - start))
            if stall:  # a caller that never finishes its upload
                await go_on.wait()
        return await plane.stub.UploadBlob(chunks(), timeout=10)

    stalled = asyncio.ensure_future(upload(200_000, stall=True))
    assert await until(lambda: servicer.uploading == 200_000)
    with pytest.raises(grpc.aio.AioRpcError) as over:  # a second upload would take the whole past the budget
        await upload(200_000)
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "300000" in (over.value.details() or "")
    assert servicer.uploading == 200_000
    with pytest.raises(grpc.aio.AioRpcError) as idle:  # the stalled one is ended: it holds nothing any longer
        await stalled
    assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "chunk" in (idle.value.details() or "")
    assert await until(lambda: servicer.uploading == 0)
    done = await upload(200_000)
    assert done.size == 200_000 and servicer.uploading == 0
    with pytest.raises(grpc.aio.AioRpcError) as big:
        await upload(260_000)
    assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "250000" in (big.value.details() or "")
    assert servicer.uploading == 0
    go_on.set()


# -- a real worker over gRPC, with a fake invoker


def agent_snapshot() -> AgentSnapshot:
    views = {
        name: ServiceView(name=name, category=cat, protocol="openai",
                          endpoints=(EndpointView("e0", "http://127.0.0.1:9/v1"),))
        for name, cat in (("chat", "llm"), ("docs", "document"))
    }
    return AgentSnapshot(version="1.x", services=MappingProxyType(views))


class FakeInvoker:
    """Answers per payload: {"sleep": s} waits, {"fail": kind} fails, otherwise echoes."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.gate: Callable[[Call], bool] = lambda call: True

    async def invoke(self, call: Call, snapshot: AgentSnapshot) -> Result:
        self.calls.append(call)
        await asyncio.sleep(float(call.payload.get("sleep", 0.01)))
        if "fail" in call.payload or not self.gate(call):
            kind = ErrorKind(call.payload.get("fail", "connect"))
            raise CallFailed(UpstreamError(kind, f"{kind.value} failure"), 1)
        body = orjson.dumps({"echo": call.payload, "id": call.request_id})
        return Result(body, call.service, "e0", 1, 0.01, TokenUsage(3, 4), 0.0, snapshot.version)


@pytest.fixture
async def worker(plane: Plane) -> AsyncIterator[FakeInvoker]:
    holder = Holder()
    holder.current = agent_snapshot()
    invoker = FakeInvoker()
    client = TasksClient([plane.address])
    w = TaskWorker(client, "w1", holder, invoker,  # type: ignore[arg-type]
                   WorkerOptions(capacity=4, resources=WorkerResources(cpu=8, memory_bytes=16 * GIB), poll_wait_s=0.5))
    stop = asyncio.Event()
    running = asyncio.ensure_future(w.run(stop))
    try:
        yield invoker
    finally:
        stop.set()
        await running
        await client.close()


async def watch_until_final(plane: Plane, task_id: str, timeout_s: float = 10.0) -> list[tasks_pb2.Task]:
    seen: list[tasks_pb2.Task] = []

    async def collect() -> None:
        async for event in plane.stub.WatchTasks(tasks_pb2.WatchTasksRequest(ids=[task_id])):
            seen.append(event.task)

    await asyncio.wait_for(collect(), timeout_s)
    return seen


async def test_worker_runs_task_and_watch_shows_progress_to_success(plane: Plane, worker: FakeInvoker) -> None:
    reply = await plane.stub.SubmitTask(submit(payload=b'{"sleep": 0.8}', priority=9))
    events = await watch_until_final(plane, reply.task.id)
    states = [e.state for e in events]
    assert states[-1] == tasks_pb2.TASK_STATE_SUCCEEDED
    assert tasks_pb2.TASK_STATE_RUNNING in states
    assert any(0 < e.progress < 1 and "attempt 1" in e.progress_message for e in events)  # heartbeat progress
    final = events[-1]
    assert orjson.loads(final.result)["echo"] == {"sleep": 0.8} and final.agent == "w1"
    assert final.usage.output_tokens == 4 and final.attempts == 1
    assert worker.calls[0].priority == 9 and worker.calls[0].request_id == f"sgtask:{reply.task.id}-1"
    assert worker.calls[0].from_task


async def test_worker_downloads_a_blob_payload_under_its_lease(plane: Plane, worker: FakeInvoker) -> None:
    uploaded = await plane.stub.UploadBlob(iter([tasks_pb2.UploadBlobRequest(chunk=b'{"from": "blob"}')]))
    reply = await plane.stub.SubmitTask(submit(payload=b"", payload_blob_id=uploaded.blob_id))
    final = (await watch_until_final(plane, reply.task.id))[-1]
    assert final.state == tasks_pb2.TASK_STATE_SUCCEEDED, final.error
    assert orjson.loads(final.result)["echo"] == {"from": "blob"}


async def test_retryable_failures_back_off_then_dead_letter_and_client_errors_fail(
    plane: Plane, worker: FakeInvoker
) -> None:
    retried = await plane.stub.SubmitTask(submit(payload=b'{"fail": "retryable"}', max_attempts=3))
    rejected = await plane.stub.SubmitTask(submit(payload=b'{"fail": "client"}'))
    dead = (await watch_until_final(plane, retried.task.id))[-1]
    assert dead.state == tasks_pb2.TASK_STATE_DEAD_LETTERED and dead.attempts == 3
    assert dead.error.kind == "retryable" and "retryable failure" in dead.error.message
    failed = (await watch_until_final(plane, rejected.task.id))[-1]
    assert failed.state == tasks_pb2.TASK_STATE_FAILED and failed.attempts == 1


async def test_cancelling_a_running_task_stops_the_worker(plane: Plane, worker: FakeInvoker) -> None:
    reply = await plane.stub.SubmitTask(submit(payload=b'{"sleep": 30}'))
    for _ in range(100):
        task = (await plane.stub.GetTask(tasks_pb2.GetTaskRequest(id=reply.task.id))).task
        if task.state == tasks_pb2.TASK_STATE_RUNNING:
            break
        await asyncio.sleep(0.05)
    await plane.stub.CancelTask(tasks_pb2.CancelTaskRequest(id=reply.task.id))
    for _ in range(100):  # the worker hears it on its next heartbeat and frees the slot
        stats = await plane.stub.GetTaskStats(tasks_pb2.GetTaskStatsRequest())
        if stats.cluster.tasks == 0:
            break
        await asyncio.sleep(0.05)
    assert stats.cluster.tasks == 0
    final = (await plane.stub.GetTask(tasks_pb2.GetTaskRequest(id=reply.task.id))).task
    assert final.state == tasks_pb2.TASK_STATE_CANCELLED


async def test_defer_hook_makes_one_task_that_completes_once_the_service_recovers(
    plane: Plane, worker: FakeInvoker
) -> None:
    recovered = asyncio.Event()
    worker.gate = lambda call: call.service != "docs" or recovered.is_set()  # "docs" is down until recovered
    client = TasksClient([plane.address])
    call = Call(request_id="req-42", category="document", service="docs", method="chat.completions",
                payload={"messages": []}, priority=6, timeout_s=0, user_id="u-1", session_id="", tenant="acme")
    deferred = await client.defer(call, "connect: upstream down")
    again = await client.defer(call, "connect: upstream down")  # the fallback fired twice: still one task
    with pytest.raises(grpc.aio.AioRpcError) as info:  # a task's own call is never deferred again
        await client.defer(dataclasses.replace(call, request_id="sgtask:abc-1"), "down")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await client.close()
    assert deferred.task_id == again.task_id and deferred.queue_id == "queue_req-42"
    body = deferred.fallback_body()
    assert body["processed"] is False and body["fallback"] is True and "queued for later processing" in body["message"]
    await asyncio.sleep(0.5)  # a few failing attempts while the service is down
    recovered.set()
    events = await watch_until_final(plane, deferred.task_id)
    final = events[-1]
    assert final.state == tasks_pb2.TASK_STATE_SUCCEEDED and final.origin == "defer" and final.tenant == "acme"
    assert final.attempts >= 2 and final.max_attempts == 10
    stats = await plane.stub.GetTaskStats(tasks_pb2.GetTaskStatsRequest())
    (agent,) = stats.agents
    assert agent.agent == "w1" and agent.usage.capacity.cpu == 8 and math.isclose(agent.peak_utilisation["cpu"], 0.5)


async def test_a_deferred_call_belongs_to_the_key_s_tenant_not_to_the_user_the_caller_names(plane: Plane) -> None:
    """The task a call falls back to is the authenticated tenant's: the request's `user` (any
    string the caller chooses) neither files it under another tenant, where that tenant's key
    would read it, nor hides it from its own tenant's key; nor does another tenant's request
    with the same request id land on the first one's task."""
    client = TasksClient([plane.address])
    invoker = Invoker(ADAPTERS, ClientPool(), SecretResolver({}), FirstUntried(),
                      resilience=Resilience(ResilienceSettings(fallback=FallbackSettings(
                          queue_for_later=frozenset({"llm"})))), defer=client.defer)  # type: ignore[arg-type]
    keys = {"acme": "sg-k1-acme-secret", "globex": "sg-k2-globex-secret"}
    snap = dataclasses.replace(snapshot_with({}, dead_chat()), governance=Governance(
        tenants=MappingProxyType({t: TenantView(t) for t in keys}),
        keys=MappingProxyType({f"k{i}": (t, hashlib.sha256(k.encode()).digest())
                               for i, (t, k) in enumerate(keys.items(), 1)})))
    pipeline = Pipeline(invoker.invoke, auth_required=True, quotas=QuotaEnforcer(LocalCounters()), cache=None)
    tasks = []
    for secret in keys.values():  # both name user "globex"; the second is globex's own key
        principal = pipeline.identify(f"Bearer {secret}", snap)
        call = Call(request_id="same-id", category="", service="chat", method="chat.completions", payload=CHAT,
                    priority=5, timeout_s=5.0, user_id="globex", session_id="")
        served = await pipeline.invoke(call, snap, principal)
        assert served.result.fallback and served.result.fallback_source == "task_queue"
        task_id = orjson.loads(served.result.body)["task_id"]
        tasks.append((await plane.stub.GetTask(tasks_pb2.GetTaskRequest(id=task_id))).task)
    await client.close()
    assert [t.tenant for t in tasks] == ["acme", "globex"]
    assert tasks[0].id != tasks[1].id


async def test_worker_shutdown_gives_unfinished_tasks_back_without_using_an_attempt(plane: Plane) -> None:
    holder = Holder()
    holder.current = agent_snapshot()
    client = TasksClient([plane.address])
    w = TaskWorker(client, "w2", holder, FakeInvoker(),  # type: ignore[arg-type]
                   WorkerOptions(capacity=2, resources=WorkerResources(cpu=8, memory_bytes=16 * GIB), poll_wait_s=0.5,
                                 drain_s=0.1))
    stop = asyncio.Event()
    running = asyncio.ensure_future(w.run(stop))
    ids = [(await plane.stub.SubmitTask(submit(payload=b'{"sleep": 30}'))).task.id for _ in range(2)]
    for _ in range(100):
        states = [(await plane.stub.GetTask(tasks_pb2.GetTaskRequest(id=i))).task.state for i in ids]
        if all(s == tasks_pb2.TASK_STATE_RUNNING for s in states):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(running, 5)
    await client.close()
    for task_id in ids:
        task = (await plane.stub.GetTask(tasks_pb2.GetTaskRequest(id=task_id))).task
        assert task.state == tasks_pb2.TASK_STATE_QUEUED and task.attempts == 0
