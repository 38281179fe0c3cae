"""Agents as task workers, and the request path's way to defer a request as a task.

`TaskWorker` long-polls the control plane's TasksService for tasks that fit the agent's spare
capacity (`--task-capacity` slots and a declared resource pool), runs each through the agent's
own `Invoker` (the same routing, retries and adapters as Gateway.Invoke), heartbeats while it
runs (renewing the lease and reporting progress) and reports the outcome. A report the control
plane cannot take now is retried until it can (a restarted control plane still accepts it).
Cancellation or a lost lease, learned from a heartbeat, stops the invocation.

`TasksClient.defer` is the document fallback hook: a request that could not be served becomes
a task ("queued for later processing"); the caller gets the task id and the seed's queue id.
This module is an I/O edge: it converts tasks.proto messages itself, at the boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from google.protobuf import duration_pb2

from switchgear.dataplane.client import CHANNEL_OPTIONS, Backoff, bearer
from switchgear.dataplane.convert import TASK_REQUEST_PREFIX, Call, RequestError
from switchgear.dataplane.invoke import CallFailed, Invoker, Result, ServiceNotFound, Unsupported
from switchgear.dataplane.outcome import refusal
from switchgear.dataplane.resilience.admission_edge import Shed
from switchgear.dataplane.snapshot import AgentSnapshot, Holder
from switchgear.tls import ClientTls, aio_channel
from switchgear.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc

log = logging.getLogger("switchgear.dataplane.worker")


@dataclass(frozen=True)
class WorkerResources:
    """The pool an agent offers to tasks; 0 = the control plane's default (cpu, memory) or
    not limited (gpu, disk IOPS, network)."""

    cpu: float = 0.0
    memory_bytes: int = 0
    gpu: float = 0.0
    disk_iops: float = 0.0
    network_mbps: float = 0.0


@dataclass(frozen=True)
class WorkerOptions:
    capacity: int = 0  # concurrent tasks; 0 = this agent runs no tasks
    resources: WorkerResources = WorkerResources()
    poll_wait_s: float = 5.0  # long-poll for work
    drain_s: float = 5.0  # on shutdown, time running tasks get to finish before being given back
    report_patience_s: float = 300.0  # how long an outcome report is retried


@dataclass(frozen=True)
class Deferred:
    task_id: str
    queue_id: str
    message: str

    def fallback_body(self) -> dict[str, Any]:
        """The seed's document fallback response, with the task id to Watch."""
        return {"processed": False, "message": self.message, "fallback": True,
                "queue_id": self.queue_id, "task_id": self.task_id}


#: Reconnect quickly to a restarted control plane: a lease must be renewed within its TTL.
_CHANNEL_OPTIONS = (
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


class TasksClient:
    """Channels to the control plane(s) for TasksService; rotates on failure. Lazy: nothing
    connects until the first call."""

    def __init__(self, addresses: Sequence[str], tls: ClientTls | None = None, token: str | None = None) -> None:
        if not addresses:
            raise ValueError("at least one control-plane address is required")
        self._tls = tls
        self.metadata = bearer(token)  # the agent token: every TasksService call here is an agent's
        self._addresses = list(addresses)
        self._turn = 0
        self._channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> tasks_pb2_grpc.TasksServiceStub:
        if self._channel is None:
            self._channel = aio_channel(self._addresses[self._turn % len(self._addresses)], self._tls,
                                        _CHANNEL_OPTIONS)
        return tasks_pb2_grpc.TasksServiceStub(self._channel)

    @property
    def turn(self) -> int:
        """Which address is in use; pass it to `rotate` so that several calls failing on one
        dead control plane move on once, not once each."""
        return self._turn

    async def rotate(self, turn: int | None = None) -> None:
        """Use the next control-plane address (after a failure on the address of `turn`)."""
        if turn is not None and turn != self._turn:
            return  # another failed call already moved on
        if len(self._addresses) > 1 and self._channel is not None:
            channel, self._channel = self._channel, None
            self._turn += 1
            await channel.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def defer(self, call: Call, reason: str, timeout_s: float = 5.0) -> Deferred:
        """Queue `call` as a task (idempotent on call.request_id); grpc.RpcError if the control
        plane cannot take it (NOT_FOUND for an unknown service, FAILED_PRECONDITION when its
        resources can never be allocated)."""
        request = tasks_pb2.DeferInvokeRequest(
            request_id=call.request_id, service=call.service, method=call.method,
            payload=orjson.dumps(dict(call.payload)), priority=call.priority, tenant=call.tenant, reason=reason,
        )
        reply = await self.stub.DeferInvoke(request, timeout=timeout_s, metadata=self.metadata)
        return Deferred(task_id=reply.task.id, queue_id=reply.queue_id, message=reply.message)


class TaskWorker:
    def __init__(
        self,
        client: TasksClient,
        node_id: str,
        holder: Holder,
        invoker: Invoker,
        options: WorkerOptions,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._node_id = node_id
        self._holder = holder
        self._invoker = invoker
        self._options = options
        self._backoff = backoff or Backoff(base_s=0.1, cap_s=2.0)
        self._clock = clock
        self._running: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self.completed = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Lease and run tasks until `stop` is set; then drain and give back what is left."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                free = self._options.capacity - len(self._running)
                snapshot = self._holder.current
                if free <= 0 or snapshot is None:
                    self._slot_freed.clear()
                    waiter = asyncio.ensure_future(self._slot_freed.wait())
                    await asyncio.wait({waiter, stopping}, timeout=None if snapshot else 0.2,
                                       return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                turn = self._client.turn
                try:
                    leases = await self._lease(snapshot, free, stopping)
                except Exception as exc:
                    delay = self._backoff.next()
                    why = f"{exc.code().name} {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
                    log.warning("leasing tasks failed (%s); retrying in %.2f s", why, delay)
                    await self._client.rotate(turn)
                    await asyncio.wait({stopping}, timeout=delay)
                    continue
                self._backoff.reset()
                for leased in leases:
                    if stop.is_set():
                        released = tasks_pb2.CompleteTaskRequest(outcome=tasks_pb2.TASK_OUTCOME_RELEASED)
                        await self._report(leased, released, patience_s=2.0)
                        continue
                    job = asyncio.ensure_future(self._run(leased))
                    self._running[leased.task.id] = job
                    job.add_done_callback(functools.partial(self._finished, leased.task.id))
        finally:
            stopping.cancel()
            await self._drain()

    def _finished(self, task_id: str, _job: object = None) -> None:
        self._running.pop(task_id, None)
        self._slot_freed.set()

    async def _lease(
        self, snapshot: AgentSnapshot, free: int, stopping: asyncio.Future[Any]
    ) -> list[tasks_pb2.LeasedTask]:
        r = self._options.resources
        request = tasks_pb2.LeaseTasksRequest(
            agent=self._node_id, capacity=self._options.capacity, max_tasks=free,
            resources=tasks_pb2.Resources(cpu=r.cpu, memory_bytes=r.memory_bytes, gpu=r.gpu, disk_iops=r.disk_iops,
                                          network_mbps=r.network_mbps),
            services=sorted(name for name, s in snapshot.services.items() if not s.unsupported),
            wait=_duration(self._options.poll_wait_s),
        )
        call = self._client.stub.LeaseTasks(request, timeout=self._options.poll_wait_s + 10.0,
                                            metadata=self._client.metadata)

        async def answer() -> tasks_pb2.LeaseTasksResponse:
            return await call  # type: ignore[no-any-return]

        reply = asyncio.ensure_future(answer())
        done, _ = await asyncio.wait({reply, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if reply not in done:
            call.cancel()  # the control plane gives back whatever it leased to a cancelled poll
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reply
            return []
        return list(reply.result().leases)

    async def _drain(self) -> None:
        self._stopping = True
        if not self._running:
            return
        log.info("waiting up to %.1f s for %d running task(s)", self._options.drain_s, len(self._running))
        _, pending = await asyncio.wait(set(self._running.values()), timeout=self._options.drain_s)
        for job in pending:
            job.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _run(self, leased: tasks_pb2.LeasedTask) -> None:
        task = leased.task
        lost: list[str] = []  # why the heartbeat stopped the work, when it did
        work = asyncio.ensure_future(self._invoke(leased))
        beats = asyncio.ensure_future(self._heartbeats(leased, work, lost))
        try:
            report = await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if lost and not (current is not None and current.cancelling()):
                log.info("task %s: %s; stopped", task.id, lost[0])
                return
            work.cancel()
            if self._stopping:  # shutting down: give the lease back so another agent runs it
                await self._report(leased, tasks_pb2.CompleteTaskRequest(outcome=tasks_pb2.TASK_OUTCOME_RELEASED),
                                   patience_s=2.0)
                return
            raise
        finally:
            beats.cancel()
        await self._report(leased, report)
        self.completed += 1

    async def _invoke(self, leased: tasks_pb2.LeasedTask) -> tasks_pb2.CompleteTaskRequest:
        """Run one attempt; never raises for a task-level failure (it becomes the report)."""
        task, lease_id = leased.task, leased.lease_id
        snapshot = self._holder.current
        try:
            body = task.payload or await self._download(task.payload_blob_id, task.id, lease_id)
            payload = orjson.loads(body)
            if snapshot is None:
                raise ServiceNotFound("agent holds no snapshot")
            call = Call(
                request_id=f"{TASK_REQUEST_PREFIX}{task.id}-{task.attempts}", category="", service=task.service,
                method=task.method,
                payload=payload, priority=task.priority or 5, timeout_s=task.timeout.ToNanoseconds() / 1e9,
                user_id=task.tenant, session_id="", tenant=task.tenant,
            )
            result = await self._invoker.invoke(call, snapshot)
        except CallFailed as exc:
            # the task's owner reads this: the public message (service, endpoint, kind; no address)
            return _failure(exc.error.kind.value, refusal(exc).message, exc.error.kind.retryable)
        except (RequestError, orjson.JSONDecodeError) as exc:
            return _failure("client", str(exc), False)
        except (ServiceNotFound, Unsupported) as exc:  # this agent's snapshot may lag the control plane's
            return _failure("unavailable", str(exc), True)
        except grpc.aio.AioRpcError as exc:
            return _failure("unavailable", f"payload blob: {exc.code().name} {exc.details()}", True)
        except Shed as exc:  # admission refused it (agent overloaded): the task retries later
            return _failure("overloaded", str(exc), True)
        return _success(result)

    async def _download(self, blob_id: str, task_id: str, lease_id: str) -> bytes:
        parts = []
        request = tasks_pb2.DownloadBlobRequest(blob_id=blob_id, task_id=task_id, lease_id=lease_id)
        async for part in self._client.stub.DownloadBlob(request, timeout=60, metadata=self._client.metadata):
            parts.append(part.chunk)
        return b"".join(parts)

    async def _heartbeats(self, leased: tasks_pb2.LeasedTask, work: asyncio.Future[Any], lost: list[str]) -> None:
        """Renew the lease every third of its TTL with progress; stop `work` when told to."""
        task = leased.task
        ttl = max(0.3, leased.lease_ttl.ToNanoseconds() / 1e9)
        budget = task.timeout.ToNanoseconds() / 1e9
        started, first = self._clock(), True
        while not work.done():
            elapsed = self._clock() - started
            progress = min(0.95, elapsed / budget) if budget > 0 else 0.0
            request = tasks_pb2.HeartbeatTaskRequest(
                task_id=task.id, lease_id=leased.lease_id, agent=self._node_id, progress=progress, started=first,
                progress_message=f"attempt {task.attempts}: running {elapsed:.1f} s of a {budget:g} s budget",
            )
            turn = self._client.turn
            try:
                reply = await self._client.stub.HeartbeatTask(request, timeout=ttl / 2, metadata=self._client.metadata)
            except grpc.aio.AioRpcError as exc:  # keep working: a late success still counts
                log.debug("heartbeat for task %s failed: %s", task.id, exc.code().name)
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    await self._client.rotate(turn)
            else:
                first = False
                if reply.cancelled or not reply.lease_valid:
                    lost.append("cancelled" if reply.cancelled else "lease lost")
                    work.cancel()
                    return
            await asyncio.sleep(ttl / 3)

    async def _report(
        self, leased: tasks_pb2.LeasedTask, report: tasks_pb2.CompleteTaskRequest, patience_s: float | None = None
    ) -> None:
        """Send the outcome until the control plane answers (accepted or not) or patience runs out."""
        report.task_id, report.lease_id, report.agent = leased.task.id, leased.lease_id, self._node_id
        deadline = self._clock() + (self._options.report_patience_s if patience_s is None else patience_s)
        backoff = Backoff(base_s=0.1, cap_s=2.0)
        while True:
            turn = self._client.turn
            try:
                reply = await self._client.stub.CompleteTask(report, timeout=5.0, metadata=self._client.metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) or \
                        self._clock() >= deadline:
                    log.error("task %s: outcome not reported: %s %s", leased.task.id, exc.code().name, exc.details())
                    return
                if exc.code() == grpc.StatusCode.UNAVAILABLE:  # that replica is gone: try the next
                    await self._client.rotate(turn)
                await asyncio.sleep(backoff.next())
                continue
            if not reply.accepted:
                log.info("task %s: outcome came too late (task is %s)", leased.task.id,
                         tasks_pb2.TaskState.Name(reply.task.state))
            return


def _success(result: Result) -> tasks_pb2.CompleteTaskRequest:
    return tasks_pb2.CompleteTaskRequest(
        outcome=tasks_pb2.TASK_OUTCOME_SUCCEEDED, result=result.body, endpoint=result.endpoint,
        usage=common_pb2.Usage(input_tokens=result.usage.input_tokens, output_tokens=result.usage.output_tokens,
                               cost_usd=result.cost_usd, estimated=result.usage.estimated),
    )


def _failure(kind: str, message: str, retryable: bool) -> tasks_pb2.CompleteTaskRequest:
    return tasks_pb2.CompleteTaskRequest(
        outcome=tasks_pb2.TASK_OUTCOME_FAILED, error=tasks_pb2.TaskError(kind=kind, message=message),
        retryable=retryable,
    )


# ---------------------------------------------------------------------------------------
# command-line flags (the CLI stays a thin edge: it calls these two)

_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def _size(text: str) -> int:
    """"32Gi" -> bytes (also plain bytes, K/M/G/T and Ki/Mi/Gi/Ti)."""
    number = text.rstrip("KMGTikmgtBb")
    unit = text[len(number):].lower().removesuffix("b")
    try:
        return int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(f"not a size: {text!r} (e.g. 32Gi)") from None


def add_worker_arguments(parser: Any) -> None:
    """The agent's task-worker flags."""
    group = parser.add_argument_group("task worker (a resource left at 0 is not limited: --task-capacity bounds it)")
    group.add_argument("--task-capacity", type=int, default=0, metavar="N",
                       help="run up to N tasks at once from the control plane's queue (default 0: no tasks)")
    group.add_argument("--task-cpu", type=float, default=0.0, help="CPUs this agent offers to tasks (0 = not limited)")
    group.add_argument("--task-memory", type=_size, default=0, metavar="SIZE",
                       help="memory offered, e.g. 32Gi (0 = not limited)")
    group.add_argument("--task-gpu", type=float, default=0.0, help="GPUs offered (0 = not limited)")
    group.add_argument("--task-iops", type=float, default=0.0, help="disk IOPS offered (0 = not limited)")
    group.add_argument("--task-bandwidth", type=float, default=0.0, metavar="MBPS",
                       help="network Mbps offered (0 = not limited)")


def worker_options(args: Any) -> WorkerOptions:
    if args.task_capacity < 0:
        raise SystemExit("switchgear agent: --task-capacity must be >= 0")
    return WorkerOptions(
        capacity=args.task_capacity,
        resources=WorkerResources(cpu=args.task_cpu, memory_bytes=args.task_memory, gpu=args.task_gpu,
                                  disk_iops=args.task_iops, network_mbps=args.task_bandwidth),
    )
