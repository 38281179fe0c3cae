"""The TasksService servicer and its wiring into the control plane's gRPC server.

Thin: convert, call the scheduler, map failures to gRPC codes (malformed -> INVALID_ARGUMENT
naming the field; unknown service/task/blob -> NOT_FOUND; idempotency key reused for another
request -> ALREADY_EXISTS; requirements that can never fit -> FAILED_PRECONDITION with
"Resource allocation failed: ..."; a tenant past one of its task or blob quotas ->
RESOURCE_EXHAUSTED naming the limit; cancelling a final task -> FAILED_PRECONDITION). Every
scheduler call that reads or writes the task store is awaited on the store's thread
(`TaskScheduler.call`), never run on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import NoReturn

import grpc

from switchgear.controlplane.auth import CALLER
from switchgear.controlplane.convert import duration, timestamp
from switchgear.controlplane.model import RegistryState
from switchgear.controlplane.tasks import convert
from switchgear.controlplane.tasks.lifecycle import Completion, TransitionError
from switchgear.controlplane.tasks.model import Task
from switchgear.controlplane.tasks.scheduler import (
    PURGE_BATCH,
    SchedulerOptions,
    Submission,
    SubmitError,
    TaskNotFound,
    TaskScheduler,
)
from switchgear.controlplane.tasks.store import Purged, TaskStore, TaskStoreLike
from switchgear.v1 import tasks_pb2, tasks_pb2_grpc

log = logging.getLogger("switchgear.controlplane.tasks")

SERVICE_NAME = tasks_pb2.DESCRIPTOR.services_by_name["TasksService"].full_name
MAX_BLOB_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
#: Request ids of calls made by task workers (dataplane/worker.py, same value: the wire contract).
TASK_REQUEST_PREFIX = "sgtask:"
DEFER_MESSAGE = "Document processing service unavailable, queued for later processing"
_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "conflict": grpc.StatusCode.ALREADY_EXISTS,
    "resources": grpc.StatusCode.FAILED_PRECONDITION,
    "quota": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    """What blob uploads (UploadBlob) may hold: one blob's size; the bytes all uploads still
    arriving hold at once (a caller's key opens any number of streams: each held up to a whole
    blob in memory, stalled or not, with no end), and of those the uploads of one caller (a
    tenant's key, or the admin token), so one key's stalled uploads leave room for the others';
    and how long an upload may send nothing."""

    max_blob_bytes: int = MAX_BLOB_BYTES
    max_uploading_bytes: int = 4 * MAX_BLOB_BYTES
    max_uploading_bytes_per_caller: int = 2 * MAX_BLOB_BYTES
    idle_timeout_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class WatchLimits:
    """WatchTasks streams open at once: in all, and per caller (a tenant's key, or the admin
    token). Each is woken by every task change of every tenant and starts with up to 1,000
    tasks, so a key opening streams without end made every change cost that many times over."""

    max_watches: int = 1024
    max_watches_per_caller: int = 64


class TasksServicer(tasks_pb2_grpc.TasksServiceServicer):
    def __init__(self, scheduler: TaskScheduler, uploads: UploadLimits | None = None,
                 watches: WatchLimits | None = None) -> None:
        self._s = scheduler
        self.uploads = uploads or UploadLimits()
        self.uploading = 0  # bytes held by uploads still arriving (under uploads.max_uploading_bytes)
        self.uploading_by: dict[str, int] = {}  # caller ("" = the admin token) -> its share of `uploading`
        self.watches = watches or WatchLimits()
        self.watching: dict[str, int] = {}  # caller ("" = the admin token) -> its WatchTasks streams open

    def _proto(self, task: Task, with_payload: bool = True) -> tasks_pb2.Task:
        return convert.task_to_proto(task, self._s.effective_priority(task), with_payload=with_payload)

    async def _submit(self, sub: Submission, context: grpc.aio.ServicerContext) -> tuple[Task, bool]:
        try:
            return await self._s.call(self._s.submit, sub)
        except SubmitError as exc:
            await _abort(context, _CODES[exc.code], str(exc))

    async def SubmitTask(  # noqa: N802
        self, request: tasks_pb2.SubmitTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.SubmitTaskResponse:
        sub = convert.submission_from_proto(request)
        caller = CALLER.get()
        if caller is not None:  # a tenant's key submits for that tenant only
            if sub.tenant not in ("", caller):
                await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                             f"tenant: a key of tenant {caller!r} cannot submit for {sub.tenant!r}")
            sub = dataclasses.replace(sub, tenant=caller, limited=True)
            if sub.payload_blob_id and not await self._s.call(self._s.blob_owned, sub.payload_blob_id, caller):
                # Another tenant's blob reads as missing: the answer must not confirm it exists.
                await _abort(context, grpc.StatusCode.NOT_FOUND, f"payload_blob_id: no blob {sub.payload_blob_id!r}")
        task, created = await self._submit(sub, context)
        return tasks_pb2.SubmitTaskResponse(task=self._proto(task), created=created)

    async def DeferInvoke(  # noqa: N802
        self, request: tasks_pb2.DeferInvokeRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.DeferInvokeResponse:
        try:  # a tenant's call: its quotas apply (an agent defers it, for the tenant)
            sub = dataclasses.replace(convert.defer_from_proto(request), limited=True)
        except convert.ConvertError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.request_id.startswith(TASK_REQUEST_PREFIX):
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         "request_id: a task worker's call is not deferred again (the task itself retries)")
        task, created = await self._submit(sub, context)
        if created:
            log.info("request %s to %s deferred as task %s: %s", request.request_id, request.service, task.id,
                     request.reason or "no reason given")
        return tasks_pb2.DeferInvokeResponse(task=self._proto(task), queue_id=f"queue_{request.request_id}",
                                             message=DEFER_MESSAGE)

    async def UploadBlob(  # noqa: N802
        self, request_iterator: AsyncIterator[tasks_pb2.UploadBlobRequest], context: grpc.aio.ServicerContext
    ) -> tasks_pb2.UploadBlobResponse:
        limits = self.uploads
        parts: list[bytes] = []
        size, held, content_type = 0, 0, ""
        tenant = CALLER.get() or ""
        room = await self._blob_room(tenant, context)  # before reading: grpc.aio's reader is never left unawaited
        parts_in = aiter(request_iterator)
        try:
            while True:
                try:
                    async with asyncio.timeout(limits.idle_timeout_s):
                        part = await anext(parts_in)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"chunk: none arrived for {limits.idle_timeout_s:g} s; upload again")
                content_type = content_type or part.content_type
                size += len(part.chunk)
                if size > limits.max_blob_bytes:
                    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                 f"chunk: blob larger than {limits.max_blob_bytes} bytes")
                if size > room:  # refused as it arrives, not once held whole
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 self._s.bytes_quota_message(tenant, size, room))
                if self.uploading + len(part.chunk) > limits.max_uploading_bytes:
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"chunk: uploads in progress hold {self.uploading} bytes, the control plane's "
                                 f"limit is {limits.max_uploading_bytes}; upload again shortly")
                mine = self.uploading_by.get(tenant, 0)
                if mine + len(part.chunk) > limits.max_uploading_bytes_per_caller:
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"chunk: this key's uploads in progress hold {mine} bytes, the limit per key is "
                                 f"{limits.max_uploading_bytes_per_caller}; finish or end one first")
                self.uploading += len(part.chunk)
                self.uploading_by[tenant] = mine + len(part.chunk)
                held += len(part.chunk)
                parts.append(part.chunk)
            blob = b"".join(parts)
            parts.clear()
            try:
                blob_id = await self._s.call(self._s.put_blob, blob, content_type or "application/json", tenant)
            except SubmitError as exc:
                await _abort(context, _CODES[exc.code], str(exc))
        finally:  # held until stored (the store's thread takes one at a time)
            self.uploading -= held
            left = self.uploading_by.get(tenant, 0) - held
            if left:
                self.uploading_by[tenant] = left
            else:
                self.uploading_by.pop(tenant, None)
        return tasks_pb2.UploadBlobResponse(blob_id=blob_id, size=size)

    async def _blob_room(self, tenant: str, context: grpc.aio.ServicerContext) -> float:
        """The bytes a tenant key's upload may hold before it is refused (its quota's room; the
        store checks again, exactly, when it is whole); inf for an operator's. A tenant with no
        room is refused before a byte is held, even for content it uploaded before (a blob's id
        is not known until the whole of it has arrived)."""
        try:
            return await self._s.call(self._s.upload_room, tenant)
        except SubmitError as exc:
            await _abort(context, _CODES[exc.code], str(exc))

    async def DownloadBlob(  # noqa: N802
        self, request: tasks_pb2.DownloadBlobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tasks_pb2.DownloadBlobResponse]:
        for name in ("blob_id", "task_id", "lease_id"):
            if not getattr(request, name):
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{name}: required")
        data = await self._s.call(self._s.blob, request.blob_id) if await self._leased_payload(request) else None
        if data is None:  # the same answer whether the blob or the lease is missing
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"blob_id: no blob {request.blob_id!r} for a lease on task {request.task_id!r}")
        for start in range(0, max(1, len(data)), CHUNK_BYTES):
            yield tasks_pb2.DownloadBlobResponse(chunk=data[start:start + CHUNK_BYTES])

    async def _leased_payload(self, request: tasks_pb2.DownloadBlobRequest) -> bool:
        """Whether the blob is the payload of a task the caller holds the (secret) lease on."""
        try:
            task = await self._s.call(self._s.get, request.task_id)
        except TaskNotFound:
            return False
        return (task.state.holds_lease and task.payload_blob_id == request.blob_id
                and hmac.compare_digest(task.lease_id.encode(), request.lease_id.encode()))

    async def _get(self, task_id: str, context: grpc.aio.ServicerContext) -> Task:
        if not task_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "id: required")
        try:
            task = await self._s.call(self._s.get, task_id)
        except TaskNotFound:
            task = None
        caller = CALLER.get()
        if task is None or caller not in (None, task.tenant):  # another tenant's task does not exist
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"id: no task {task_id!r}")
        return task

    async def _tenant_filter(self, requested: str, context: grpc.aio.ServicerContext) -> str:
        """The tenant a list or watch is limited to: the caller's own when a tenant key called."""
        caller = CALLER.get()
        if caller is None:
            return requested
        if requested not in ("", caller):
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"tenant: a key of tenant {caller!r} cannot see tenant {requested!r}")
        return caller

    async def GetTask(  # noqa: N802
        self, request: tasks_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.GetTaskResponse:
        return tasks_pb2.GetTaskResponse(task=self._proto(await self._get(request.id, context)))

    async def CancelTask(  # noqa: N802
        self, request: tasks_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.CancelTaskResponse:
        await self._get(request.id, context)
        try:
            task = await self._s.call(self._s.cancel, request.id)
        except TransitionError as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return tasks_pb2.CancelTaskResponse(task=self._proto(task))

    async def ListTasks(  # noqa: N802
        self, request: tasks_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ListTasksResponse:
        try:
            states = [convert.state_from_proto(s, f"states[{i}]") for i, s in enumerate(request.states)]
        except convert.ConvertError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.limit > 1000:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "limit: at most 1000")
        tenant = await self._tenant_filter(request.tenant, context)
        tasks = await self._s.call(self._s.list_tasks, states, tenant, request.service, request.limit or 100)
        return tasks_pb2.ListTasksResponse(tasks=[self._proto(t, with_payload=False) for t in tasks])

    async def WatchTasks(  # noqa: N802
        self, request: tasks_pb2.WatchTasksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tasks_pb2.WatchTasksResponse]:
        ids = set(request.ids)
        tenant = await self._tenant_filter(request.tenant, context)
        caller, limits = CALLER.get() or "", self.watches
        if sum(self.watching.values()) >= limits.max_watches:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{limits.max_watches} watches are open on this control plane (its limit); watch again later")
        if self.watching.get(caller, 0) >= limits.max_watches_per_caller:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"this key has {limits.max_watches_per_caller} watches open (the limit per key); "
                         "close one, or watch several tasks in one (ids)")
        self.watching[caller] = self.watching.get(caller, 0) + 1
        try:
            async with contextlib.aclosing(self._watch(ids, tenant, request.service, context)) as replies:
                async for reply in replies:
                    yield reply
        finally:
            left = self.watching[caller] - 1
            if left:
                self.watching[caller] = left
            else:
                del self.watching[caller]

    async def _watch(self, ids: set[str], tenant: str, service: str, context: grpc.aio.ServicerContext
                     ) -> AsyncGenerator[tasks_pb2.WatchTasksResponse, None]:
        def wanted(t: Task) -> bool:
            return (not ids or t.id in ids) and tenant in ("", t.tenant) and service in ("", t.service)

        with self._s.watch() as changes:  # subscribed before reading, so nothing falls between
            if ids:
                current = []
                for task_id in sorted(ids):
                    try:
                        found = await self._s.call(self._s.get, task_id)
                    except TaskNotFound:
                        found = None
                    if found is None or tenant not in ("", found.tenant):
                        await _abort(context, grpc.StatusCode.NOT_FOUND, f"ids: no task {task_id!r}")
                    current.append(found)
            else:
                current = await self._s.call(self._s.list_tasks, (), tenant, service, 1000)
            open_ids = {t.id for t in current if not t.state.final}
            for task in current:
                yield tasks_pb2.WatchTasksResponse(task=self._proto(task, with_payload=False))
            while not ids or open_ids:
                changed = await changes.get()
                if changed is None:
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 "watcher fell too far behind; watch again")
                if not wanted(changed):
                    continue
                if changed.state.final:
                    open_ids.discard(changed.id)
                yield tasks_pb2.WatchTasksResponse(task=self._proto(changed, with_payload=False))

    async def GetTaskStats(  # noqa: N802
        self, request: tasks_pb2.GetTaskStatsRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.GetTaskStatsResponse:
        return convert.stats_to_proto(await self._s.call(self._s.stats))

    async def LeaseTasks(  # noqa: N802
        self, request: tasks_pb2.LeaseTasksRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.LeaseTasksResponse:
        try:
            offer, wait_s = convert.offer_from_proto(request)
        except convert.ConvertError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        leased = await self._s.lease(offer, wait_s)
        if leased and context.cancelled():  # the agent gave up waiting: hand them straight back
            for t in leased:
                await self._s.call(self._s.complete, t.id, Completion("released", t.lease_id))
            return tasks_pb2.LeaseTasksResponse()
        ttl = duration(self._s.options.lease_ttl_s)
        return tasks_pb2.LeaseTasksResponse(
            leases=[tasks_pb2.LeasedTask(task=self._proto(t), lease_id=t.lease_id, lease_ttl=ttl) for t in leased]
        )

    async def HeartbeatTask(  # noqa: N802
        self, request: tasks_pb2.HeartbeatTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.HeartbeatTaskResponse:
        await self._get(request.task_id, context)
        beat = await self._s.call(self._s.heartbeat, request.task_id, request.lease_id, request.progress,
                                  request.progress_message, request.started)
        reply = tasks_pb2.HeartbeatTaskResponse(lease_valid=beat.lease_valid, cancelled=beat.cancelled)
        if beat.lease_valid:
            reply.lease_expires_at.CopyFrom(timestamp(beat.task.lease_expires_at))
        return reply

    async def CompleteTask(  # noqa: N802
        self, request: tasks_pb2.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.CompleteTaskResponse:
        await self._get(request.task_id, context)
        try:
            report = convert.completion_from_proto(request)
        except convert.ConvertError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        accepted, task = await self._s.call(self._s.complete, request.task_id, report)
        return tasks_pb2.CompleteTaskResponse(accepted=accepted, task=self._proto(task, with_payload=False))


class PurgeTally:
    """Rows the purge deleted in this process, over every reign (for /metrics)."""

    def __init__(self) -> None:
        self.total = Purged()

    def by_kind(self) -> dict[str, int]:
        t = self.total
        return {"tasks": t.tasks, "attempts": t.attempts, "blobs": t.blobs, "blob_bytes": t.blob_bytes}


class TasksRuntime:
    """The scheduler, its servicer, the lease sweeper and the retention purge, as the control
    plane runs them (on the leader only, with replicas: a follower makes none)."""

    def __init__(self, store: TaskStoreLike, registry_state: Callable[[], RegistryState],
                 options: SchedulerOptions, *, purge_interval_s: float = 60.0, purge_batch: int = PURGE_BATCH,
                 tally: PurgeTally | None = None) -> None:
        self.store = store
        self.scheduler = TaskScheduler(self.store, registry_state, options)
        self.servicer = TasksServicer(self.scheduler)
        self.purge_interval_s = purge_interval_s
        self.purge_batch = purge_batch
        self.tally = tally or PurgeTally()
        self._loops: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._loops = [asyncio.ensure_future(self._sweep_forever()), asyncio.ensure_future(self._purge_forever())]

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(1.0, self.scheduler.options.lease_ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.scheduler.call(self.scheduler.sweep)
            except Exception:  # a failed sweep must not stop the next one
                log.exception("task lease sweep failed")

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.purge()
            except Exception:  # a failed purge must not stop the next one
                log.exception("task retention purge failed")
            await asyncio.sleep(self.purge_interval_s)

    async def purge(self) -> Purged:
        """One purge round: bites of at most `purge_batch` rows each, one transaction each on
        the store's thread (other calls run between them), until a bite leaves nothing: first
        what is past the retention, then each tenant's oldest finished tasks beyond
        max_finished_tasks_per_tenant; one log line for the round when it deleted anything."""
        done = Purged()
        while True:
            bite = await self._bite(self.scheduler.purge, self.purge_batch)
            done += bite
            if bite.tasks < self.purge_batch and bite.blobs < self.purge_batch:
                break
        trimmed = Purged()
        for tenant, _ in await self.scheduler.call(self.scheduler.tenants_over_kept):
            while (bite := await self._bite(self.scheduler.trim, tenant, self.purge_batch)).tasks == self.purge_batch:
                trimmed += bite
            trimmed += bite
        total = done + trimmed
        if total != Purged():
            log.info("task retention: deleted %d finished task(s) (%d beyond their tenant's "
                     "max_finished_tasks_per_tenant) with %d attempt row(s) and %d blob(s) (%d bytes)",
                     total.tasks, trimmed.tasks, total.attempts, total.blobs, total.blob_bytes)
        return total

    async def _bite(self, method: Callable[..., Purged], *args: object) -> Purged:
        bite = await self.scheduler.call(method, *args)
        self.tally.total += bite
        return bite

    async def close(self) -> None:
        for loop in self._loops:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await self.store.serial.run(self.store.close)  # after whatever is still queued on it
        if self.store.owns_serial:
            self.store.serial.close()


def attach(server: grpc.aio.Server, db_path: str, registry_state: Callable[[], RegistryState],
           options: SchedulerOptions | None = None) -> TasksRuntime:
    """Add TasksService to `server`; call `.start()` once the loop runs and `await .close()` at the end."""
    runtime = TasksRuntime(TaskStore(db_path), registry_state, options or SchedulerOptions())
    tasks_pb2_grpc.add_TasksServiceServicer_to_server(runtime.servicer, server)
    return runtime
