"""The task store cannot be filled by one tenant: finished tasks, their attempt rows and blobs
no unfinished task needs are purged after `resource_allocation.task_retention` (in bounded
bites; the store's queries on both backends: tests/test_tasks_store_pg.py), and a tenant's
unfinished tasks, blobs and blob bytes are held at its quotas (RESOURCE_EXHAUSTED naming the
limit) while other tenants are served."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from switchgear.controlplane.model import RegistryState, Tenant, TenantPolicy
from switchgear.controlplane.tasks import lifecycle
from switchgear.controlplane.tasks.model import AgentOffer, Resources, TaskState
from switchgear.controlplane.tasks.scheduler import SchedulerOptions, Submission, SubmitError, TaskScheduler
from switchgear.controlplane.tasks.service import TasksRuntime, UploadLimits
from switchgear.controlplane.tasks.store import Purged, TaskStore
from switchgear.v1 import governance_pb2, tasks_pb2, tasks_pb2_grpc
from tests.test_tasks_service import STATE, submit, until
from tests.test_tasks_store_pg import task
from tests.test_tasks_tenant_keys import ACME_KEY, GLOBEX_KEY, STATE_WITH_KEYS, TOKEN, Plane, bearer, serving

DAY = 86400.0


def limits(**fields: object) -> RegistryState:
    resources = replace(STATE_WITH_KEYS.settings.resource_allocation, **fields)  # type: ignore[arg-type]
    return replace(STATE_WITH_KEYS, settings=replace(STATE_WITH_KEYS.settings, resource_allocation=resources))


# -- the scheduler: retention and quotas


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def scheduler(tmp_path: Path, state: RegistryState, clock: Clock | None = None) -> TaskScheduler:
    return TaskScheduler(TaskStore(tmp_path / "t.db"), lambda: state, SchedulerOptions(), clock=clock or Clock())


def acme(**fields: object) -> Submission:
    base: dict[str, object] = {"service": "chat", "method": "chat.completions", "tenant": "acme", "limited": True}
    base.update(fields)
    return Submission(**base)  # type: ignore[arg-type]


def test_a_tenant_is_held_at_its_unfinished_tasks_and_others_are_not(tmp_path: Path) -> None:
    s = scheduler(tmp_path, limits(max_tasks_per_tenant=2))
    first, _ = s.submit(acme(idempotency_key="k1"))
    s.submit(acme())
    with pytest.raises(SubmitError) as refused:
        s.submit(acme())
    assert refused.value.code == "quota"
    assert "resource_allocation.max_tasks_per_tenant = 2" in str(refused.value) and "'acme' has 2" in str(refused.value)
    again, created = s.submit(acme(idempotency_key="k1"))  # a resubmission makes nothing: never refused
    assert (again.id, created) == (first.id, False)
    s.submit(acme(tenant="globex"))  # another tenant
    by_operator, _ = s.submit(acme(limited=False))  # an operator's submission for acme: not limited...
    s.cancel(first.id)  # a finished task frees its place
    with pytest.raises(SubmitError, match="'acme' has 2"):  # ...but it is acme's task, and counts
        s.submit(acme())
    s.cancel(by_operator.id)
    s.submit(acme())
    assert s._store.unfinished_of("acme") == 2


def test_a_deferred_call_without_a_tenant_counts_as_default(tmp_path: Path) -> None:
    s = scheduler(tmp_path, limits(max_tasks_per_tenant=1))
    s.submit(acme(tenant="", origin="defer"))
    with pytest.raises(SubmitError, match="'default' has 1"):
        s.submit(acme(tenant="", origin="defer"))


def test_zero_means_no_limit(tmp_path: Path) -> None:
    s = scheduler(tmp_path, limits(max_tasks_per_tenant=0, max_blobs_per_tenant=0, max_blob_bytes_per_tenant=0))
    for i in range(5):
        s.submit(acme())
        s.put_blob(b"%d" % i * 1000, "text/plain", "acme")


def test_blob_quotas_count_each_owner_and_never_twice(tmp_path: Path) -> None:
    s = scheduler(tmp_path, limits(max_blobs_per_tenant=2, max_blob_bytes_per_tenant=100))
    s.put_blob(b"a" * 60, "t", "acme")
    s.put_blob(b"a" * 60, "t", "acme")  # again: counts once
    with pytest.raises(SubmitError, match=r"may store 40 more bytes of blobs, not 41 \(resource_allocation."
                                          r"max_blob_bytes_per_tenant = 100\)"):
        s.put_blob(b"b" * 41, "t", "acme")
    s.put_blob(b"b" * 40, "t", "acme")
    with pytest.raises(SubmitError, match=r"holds 2 blobs, its limit \(resource_allocation.max_blobs_per_tenant"):
        s.put_blob(b"c", "t", "acme")
    s.put_blob(b"a" * 60, "t", "globex")  # acme's content, uploaded by globex: counts for globex too
    assert s._store.blob_usage("globex") == (1, 60)
    for i in range(3):  # an operator's uploads are not limited
        s.put_blob(b"op %d" % i, "t", "")


def test_a_tenants_own_policy_overrides_the_defaults_and_is_named(tmp_path: Path) -> None:
    state = limits(max_tasks_per_tenant=3, max_blobs_per_tenant=10, max_blob_bytes_per_tenant=100)
    tight = TenantPolicy(max_unfinished_tasks=1, max_blobs=1, max_blob_bytes=0)  # bytes: the default
    state = replace(state, tenants=(Tenant("acme", policy=tight), Tenant("globex")))
    s = scheduler(tmp_path, state)
    s.submit(acme())
    with pytest.raises(SubmitError, match=r"its limit \(the tenant policy's max_unfinished_tasks = 1\)"):
        s.submit(acme())
    for _ in range(3):
        s.submit(acme(tenant="globex"))
    with pytest.raises(SubmitError, match=r"resource_allocation.max_tasks_per_tenant = 3"):
        s.submit(acme(tenant="globex"))
    s.put_blob(b"a", "t", "acme")
    with pytest.raises(SubmitError, match=r"the tenant policy's max_blobs = 1"):
        s.put_blob(b"b", "t", "acme")
    with pytest.raises(SubmitError, match=r"resource_allocation.max_blob_bytes_per_tenant = 100"):
        s.put_blob(b"c" * 101, "t", "globex")


def test_the_task_store_quotas_travel_in_the_tenant_policy(capsys: pytest.CaptureFixture[str]) -> None:
    from switchgear.cli_governance import _policy, _policy_flags
    from switchgear.cli_output import tenants_rows
    from switchgear.controlplane.convert_governance import policy_from_proto, policy_to_proto
    from switchgear.controlplane.validate import validate_governance

    policy = TenantPolicy(max_unfinished_tasks=7, max_blobs=8, max_blob_bytes=9 * 1024**3)
    assert policy_from_proto(policy_to_proto(policy)) == policy
    problems = validate_governance([Tenant(id="t", policy=TenantPolicy(max_blobs=-1))], [])
    assert [p.path for p in problems] == ["tenants[t].policy.max_blobs"]
    parser = argparse.ArgumentParser()
    _policy_flags(parser)
    wire = _policy(parser.parse_args(["--max-tasks", "7", "--max-blobs", "8", "--max-blob-bytes", "9Gi"]))
    assert policy_from_proto(wire) == policy
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-blob-bytes", "lots"])
    assert "--max-blob-bytes" in capsys.readouterr().err
    rows = tenants_rows(governance_pb2.ListTenantsResponse(tenants=[governance_pb2.Tenant(id="t", policy=wire)]))
    column = rows[0].index("TASK_STORE")
    assert rows[1][column] == f"tasks=7,blobs=8,bytes={9 * 1024**3}"


def test_purge_reads_the_retention_and_never_takes_a_needed_blob(tmp_path: Path) -> None:
    clock = Clock()
    state = limits(task_retention_s=DAY)
    s = scheduler(tmp_path, state, clock)
    blob = s.put_blob(b'{"doc": 1}', "application/json", "acme")
    done, _ = s.submit(acme())
    clock.now += 1  # `done` is leased first
    waiting, _ = s.submit(acme(payload_blob_id=blob))
    (leased,) = s.lease_now(AgentOffer("a1", 1, Resources(), frozenset({"chat"}), 1))
    assert leased.id == done.id
    s.complete(done.id, lifecycle.Completion("succeeded", leased.lease_id))
    clock.now += DAY - 1
    assert s.purge() == Purged()
    clock.now += 2
    assert s.purge() == Purged(tasks=1, attempts=1)  # the blob stays: `waiting` names it
    s.cancel(waiting.id)
    clock.now += DAY + 1
    assert s.purge() == Purged(tasks=1, attempts=0, blobs=1, blob_bytes=len(b'{"doc": 1}'))
    assert s.list_tasks() == []


# -- the runtime: rounds of bites, on the leader's scheduler


async def test_a_purge_round_takes_a_backlog_in_bites_and_logs_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskStore(tmp_path / "cp.db")
    for i in range(7):
        tasks.insert(task(f"t{i}", state=TaskState.SUCCEEDED, finished_at=1.0))
    tasks.save([], attempts_started=[(task(f"t{i}"), 1.0) for i in range(7)])
    for i in range(4):
        tasks.put_blob(b"blob %d" % i, "text/plain", 1.0, tenant="acme")
    runtime = TasksRuntime(tasks, lambda: STATE, SchedulerOptions(), purge_batch=3)
    bites: list[Purged] = []
    purge = runtime.scheduler.purge

    def counted(limit: int = 500) -> Purged:
        bites.append(purge(limit))
        return bites[-1]

    runtime.scheduler.purge = counted  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO, logger="switchgear.controlplane.tasks"):
            done = await runtime.purge()
        assert done == Purged(tasks=7, attempts=7, blobs=4, blob_bytes=4 * len(b"blob 0"))
        assert [b.tasks for b in bites] == [3, 3, 1] and [b.blobs for b in bites] == [3, 1, 0]
        lines = [r.getMessage() for r in caplog.records if "task retention" in r.getMessage()]
        assert lines == ["task retention: deleted 7 finished task(s) (0 beyond their tenant's "
                         "max_finished_tasks_per_tenant) with 7 attempt row(s) and 4 blob(s) (24 bytes)"]
        assert runtime.tally.by_kind() == {"tasks": 7, "attempts": 7, "blobs": 4, "blob_bytes": 24}
        caplog.clear()
        assert await runtime.purge() == Purged() and not caplog.records  # nothing to do: silent
    finally:
        await runtime.close()


async def test_a_round_trims_each_tenant_to_its_newest_finished_tasks(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A tenant cancelling and resubmitting makes finished tasks faster than the retention
    deletes them: beyond max_finished_tasks_per_tenant its oldest go in the next round."""
    now = time.time()
    tasks = TaskStore(tmp_path / "cp.db")
    for i in range(8):
        tasks.insert(task(f"a{i}", tenant="acme", state=TaskState.CANCELLED, finished_at=now - 100 + i))
    tasks.insert(task("g0", tenant="globex", state=TaskState.CANCELLED, finished_at=now - 200))
    state = limits(max_finished_tasks_per_tenant=2)
    runtime = TasksRuntime(tasks, lambda: state, SchedulerOptions(), purge_batch=4)
    try:
        with caplog.at_level(logging.INFO, logger="switchgear.controlplane.tasks"):
            assert await runtime.purge() == Purged(tasks=6)
        assert {t.id for t in tasks.list([], "", "", 100)} == {"a6", "a7", "g0"}  # acme's newest two; globex's
        assert "deleted 6 finished task(s) (6 beyond their tenant's max_finished_tasks_per_tenant)" in caplog.text
    finally:
        await runtime.close()


# -- over gRPC: tenants' keys flooding, another tenant served


QUOTA_STATE = limits(max_tasks_per_tenant=5, max_blobs_per_tenant=3, max_blob_bytes_per_tenant=300_000)


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    async with serving(tmp_path, QUOTA_STATE) as served:
        yield served


async def outcome(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_tenant_flooding_submissions_is_held_at_its_quota_while_another_is_served(plane: Plane) -> None:
    stub = plane.stub
    flood = await asyncio.gather(*(outcome(stub.SubmitTask(submit(), metadata=bearer(ACME_KEY), timeout=10))
                                   for _ in range(40)))
    assert flood.count(grpc.StatusCode.OK) == 5
    assert flood.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 35
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SubmitTask(submit(), metadata=bearer(ACME_KEY), timeout=5)
    assert "max_tasks_per_tenant" in (refused.value.details() or "")
    # Deferred calls of the same tenant (an agent's DeferInvoke) are held too, once only per request.
    defer = tasks_pb2.DeferInvokeRequest(request_id="r-1", service="chat", method="chat.completions",
                                         payload=b"{}", tenant="acme")
    assert await outcome(stub.DeferInvoke(defer, metadata=bearer(TOKEN), timeout=5)) \
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    served = await asyncio.gather(*(stub.SubmitTask(submit(), metadata=bearer(GLOBEX_KEY), timeout=10)
                                    for _ in range(5)))
    assert {r.task.tenant for r in served} == {"globex"}
    assert (await stub.SubmitTask(submit(tenant="acme"), metadata=bearer(TOKEN), timeout=5)).created  # operator
    counts = {t.tenant for t in (await stub.ListTasks(tasks_pb2.ListTasksRequest(), metadata=bearer(TOKEN))).tasks}
    assert counts == {"acme", "globex"}
    assert await plane.runtime.scheduler.call(plane.runtime.store.unfinished_of, "acme") == 6


async def upload(stub: tasks_pb2_grpc.TasksServiceStub, secret: str, data: bytes, chunk: int = 64 * 1024
                 ) -> tasks_pb2.UploadBlobResponse:
    async def parts() -> AsyncIterator[tasks_pb2.UploadBlobRequest]:
        for start in range(0, len(data), chunk):
            yield tasks_pb2.UploadBlobRequest(chunk=data[start:start + chunk], content_type="text/plain")

    reply: tasks_pb2.UploadBlobResponse = await stub.UploadBlob(parts(), metadata=bearer(secret), timeout=10)
    return reply


async def test_a_tenant_flooding_uploads_is_held_at_its_blob_quotas_while_another_uploads(plane: Plane) -> None:
    stub = plane.stub
    # Bytes: an upload past the tenant's room is refused as it arrives, not once held whole.
    big = b"x" * 400_000
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await upload(stub, ACME_KEY, big)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_blob_bytes_per_tenant = 300000" in (refused.value.details() or "")
    assert plane.runtime.servicer.uploading == 0
    flood = await asyncio.gather(*(outcome(upload(stub, ACME_KEY, b"%d" % i * 1000)) for i in range(10)),
                                 return_exceptions=True)
    assert flood.count(grpc.StatusCode.OK) == 3 and flood.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 7
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await upload(stub, ACME_KEY, b"one more")
    assert "max_blobs_per_tenant = 3" in (full.value.details() or "")
    mine = await upload(stub, GLOBEX_KEY, b"y" * 200_000)  # another tenant is served
    assert mine.blob_id == "sha256:" + hashlib.sha256(b"y" * 200_000).hexdigest()
    operator = await upload(stub, TOKEN, b"z" * 350_000)  # an operator is not limited
    assert operator.size == 350_000
    assert await plane.runtime.scheduler.call(plane.runtime.store.blob_usage, "acme") == (3, 3 * 1000 * 1)


async def test_one_keys_stalled_uploads_leave_room_for_another_keys(plane: Plane) -> None:
    """Uploads in progress are bounded in all (256 MiB) and per key (128 MiB): a key holding
    its share with stalled uploads is refused more, and another key still uploads."""
    servicer, stub = plane.runtime.servicer, plane.stub
    servicer.uploads = UploadLimits(max_blob_bytes=250_000, max_uploading_bytes=300_000,
                                    max_uploading_bytes_per_caller=200_000, idle_timeout_s=10.0)
    go_on = asyncio.Event()

    async def stalled() -> None:
        async def parts() -> AsyncIterator[tasks_pb2.UploadBlobRequest]:
            yield tasks_pb2.UploadBlobRequest(chunk=b"s" * 150_000)
            await go_on.wait()  # never finishes while the test looks

        await stub.UploadBlob(parts(), metadata=bearer(ACME_KEY), timeout=10)

    held = asyncio.ensure_future(stalled())
    try:
        assert await until(lambda: servicer.uploading_by == {"acme": 150_000})
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await upload(stub, ACME_KEY, b"a" * 100_000, chunk=50_000)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit per key is 200000" in (refused.value.details() or "")
        assert (await upload(stub, GLOBEX_KEY, b"g" * 100_000, chunk=50_000)).size == 100_000
        assert servicer.uploading_by == {"acme": 150_000}
    finally:
        go_on.set()
        await held
    assert servicer.uploading == 0 and servicer.uploading_by == {}
