"""Applications' task calls with a tenant's client key: admitted without the admin token and
scoped to that tenant (submit for it only; others' tasks do not exist for it). Operators'
calls and agents' calls are unchanged."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from switchgear.controlplane.auth import AdminTokenInterceptor
from switchgear.controlplane.model import ApiKey, RegistryState, Tenant
from switchgear.controlplane.tasks.scheduler import SchedulerOptions
from switchgear.controlplane.tasks.service import TasksRuntime, WatchLimits, attach
from switchgear.v1 import tasks_pb2, tasks_pb2_grpc
from tests.test_tasks_service import STATE, submit, until

TOKEN = "operator-token"
ACME_KEY, GLOBEX_KEY, REVOKED_KEY = "sg-k1-acmesecret", "sg-k2-globexsecret", "sg-k3-oldsecret"


def key(key_id: str, tenant: str, secret: str, revoked_at: float = 0.0) -> ApiKey:
    return ApiKey(id=key_id, tenant=tenant, sha256=hashlib.sha256(secret.encode()).hexdigest(),
                  revoked_at=revoked_at)


STATE_WITH_KEYS = replace(
    STATE, tenants=(Tenant("acme"), Tenant("globex")),
    keys=(key("k1", "acme", ACME_KEY), key("k2", "globex", GLOBEX_KEY), key("k3", "acme", REVOKED_KEY, 5.0)))


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


@dataclass
class Plane:
    runtime: TasksRuntime
    stub: tasks_pb2_grpc.TasksServiceStub


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, state: RegistryState) -> AsyncIterator[Plane]:
    """The tasks service of a control plane whose registry is `state` (keys checked as served)."""
    server = grpc.aio.server(interceptors=[AdminTokenInterceptor(TOKEN, state=lambda: state)])
    runtime = attach(server, str(tmp_path / "cp.db"), lambda: state, SchedulerOptions(lease_ttl_s=1.0))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runtime.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Plane(runtime, tasks_pb2_grpc.TasksServiceStub(channel))
    finally:
        await channel.close()
        await server.stop(None)
        await runtime.close()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    async with serving(tmp_path, STATE_WITH_KEYS) as served:
        yield served


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code()


async def test_a_tenant_key_submits_and_sees_only_its_own_tasks(plane: Plane) -> None:
    stub = plane.stub
    mine = (await stub.SubmitTask(submit(), metadata=bearer(ACME_KEY), timeout=5)).task
    assert mine.tenant == "acme"  # the key decides the tenant
    theirs = (await stub.SubmitTask(submit(tenant="globex"), metadata=bearer(GLOBEX_KEY), timeout=5)).task
    by_operator = (await stub.SubmitTask(submit(tenant="initech"), metadata=bearer(TOKEN), timeout=5)).task
    assert (theirs.tenant, by_operator.tenant) == ("globex", "initech")

    assert (await stub.GetTask(tasks_pb2.GetTaskRequest(id=mine.id), metadata=bearer(ACME_KEY))).task.id == mine.id
    for other in (theirs.id, by_operator.id):  # not "forbidden": for acme these tasks do not exist
        assert await code_of(stub.GetTask(tasks_pb2.GetTaskRequest(id=other), metadata=bearer(ACME_KEY))) \
            == grpc.StatusCode.NOT_FOUND
        assert await code_of(stub.CancelTask(tasks_pb2.CancelTaskRequest(id=other), metadata=bearer(ACME_KEY))) \
            == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListTasks(tasks_pb2.ListTasksRequest(), metadata=bearer(ACME_KEY))
    assert [t.id for t in listed.tasks] == [mine.id]
    everything = await stub.ListTasks(tasks_pb2.ListTasksRequest(), metadata=bearer(TOKEN))
    assert {t.tenant for t in everything.tasks} == {"acme", "globex", "initech"}

    watch = stub.WatchTasks(tasks_pb2.WatchTasksRequest(ids=[theirs.id]), metadata=bearer(ACME_KEY), timeout=5)
    assert await code_of(watch.read()) == grpc.StatusCode.NOT_FOUND
    watch = stub.WatchTasks(tasks_pb2.WatchTasksRequest(), metadata=bearer(ACME_KEY), timeout=5)
    assert (await watch.read()).task.id == mine.id  # the current state first: acme's only
    watch.cancel()

    cancelled = await stub.CancelTask(tasks_pb2.CancelTaskRequest(id=mine.id), metadata=bearer(ACME_KEY))
    assert cancelled.task.state == tasks_pb2.TASK_STATE_CANCELLED
    assert (await stub.GetTask(tasks_pb2.GetTaskRequest(id=theirs.id), metadata=bearer(TOKEN))).task.state \
        != tasks_pb2.TASK_STATE_CANCELLED


async def test_a_key_holds_at_most_its_share_of_watches_and_others_still_watch(plane: Plane) -> None:
    """Each watch is woken by every task change: a key that opened them without end made every
    change cost that much. A key holds at most its share, the control plane at most its total."""
    servicer = plane.runtime.servicer
    servicer.watches = WatchLimits(max_watches=5, max_watches_per_caller=3)
    await plane.stub.SubmitTask(submit(), metadata=bearer(ACME_KEY), timeout=5)

    async def opened(secret: str) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
        watch = plane.stub.WatchTasks(tasks_pb2.WatchTasksRequest(), metadata=bearer(secret), timeout=10)
        await watch.read()  # its first answer (acme's task, or nothing yet for globex: a read waits)
        return watch

    acme = [await opened(ACME_KEY) for _ in range(3)]
    assert servicer.watching == {"acme": 3}
    too_many = plane.stub.WatchTasks(tasks_pb2.WatchTasksRequest(), metadata=bearer(ACME_KEY), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await too_many.read()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per key" in (refused.value.details() or "")
    globex = plane.stub.WatchTasks(tasks_pb2.WatchTasksRequest(), metadata=bearer(GLOBEX_KEY), timeout=10)
    operator = plane.stub.WatchTasks(tasks_pb2.WatchTasksRequest(), metadata=bearer(TOKEN), timeout=10)
    assert await until(lambda: servicer.watching == {"acme": 3, "globex": 1, "": 1})
    full = plane.stub.WatchTasks(tasks_pb2.WatchTasksRequest(), metadata=bearer(GLOBEX_KEY), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await full.read()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "5 watches" in (refused.value.details() or "")
    acme[0].cancel()  # a watch that ends gives its place back
    assert await until(lambda: servicer.watching == {"acme": 2, "globex": 1, "": 1})
    acme.append(await opened(ACME_KEY))
    for watch in (*acme, globex, operator):
        watch.cancel()
    assert await until(lambda: servicer.watching == {})


async def test_a_tenant_key_cannot_reach_beyond_its_tenant(plane: Plane) -> None:
    stub = plane.stub
    assert await code_of(stub.SubmitTask(submit(tenant="globex"), metadata=bearer(ACME_KEY))) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(stub.ListTasks(tasks_pb2.ListTasksRequest(tenant="globex"), metadata=bearer(ACME_KEY))) \
        == grpc.StatusCode.PERMISSION_DENIED
    # Operators' calls stay the operator's: stats need the admin token.
    assert await code_of(stub.GetTaskStats(tasks_pb2.GetTaskStatsRequest(), metadata=bearer(ACME_KEY))) \
        == grpc.StatusCode.UNAUTHENTICATED
    for refused in (REVOKED_KEY, "sg-k1-wrongsecret", "sg-nosuch-secret", "not-a-key"):
        assert await code_of(stub.SubmitTask(submit(), metadata=bearer(refused))) == grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(stub.SubmitTask(submit())) == grpc.StatusCode.UNAUTHENTICATED
    listed = await stub.ListTasks(tasks_pb2.ListTasksRequest(), metadata=bearer(TOKEN))
    assert list(listed.tasks) == []  # nothing refused was stored
