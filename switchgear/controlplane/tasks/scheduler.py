"""The task scheduler: applies the pure decisions (queue, allocator, lifecycle) through the
task store, wakes agents long-polling for work and streams changes to watchers.

Called from the control plane's event loop through `call`, which runs each method on the task
store's thread (offloop.Serial), so a slow or locked store never stalls the loop. Every
decision and its write happen inside one such call, and calls run one at a time, so two
agents' lease calls can never both take one task or overfill a pool. Wake-ups and watchers
(asyncio objects) are always touched on the loop: a change made on the store's thread is
handed to the loop, in order.
Wall-clock time (`clock`, epoch seconds) is used throughout because lease deadlines and
backoffs are persisted and must mean the same after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ParamSpec, TypeVar

import orjson

from switchgear.controlplane.model import RegistryState, ServiceSpec
from switchgear.controlplane.offloop import call_on
from switchgear.controlplane.tasks import allocator, lifecycle, queue
from switchgear.controlplane.tasks.model import (
    RESOURCE_NAMES,
    ZERO,
    AgentOffer,
    Holding,
    Resources,
    Task,
    TaskError,
    TaskState,
)
from switchgear.controlplane.tasks.store import Purged, TaskStoreLike, blob_id_of
from switchgear.wire.attempt_policy import call_timeout

log = logging.getLogger("switchgear.controlplane.tasks")

P = ParamSpec("P")
T = TypeVar("T")

MAX_TIMEOUT_S = 86400.0
MAX_ATTEMPTS = 20
DEFAULT_ATTEMPTS = 3
DEFER_ATTEMPTS = 10
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
CANDIDATE_WINDOW = 512
#: Rows one purge transaction deletes at most (of tasks, and of blobs).
PURGE_BATCH = 500
_BLOBS_GO = "a blob no unfinished task names is deleted task_retention after its last upload"
#: A tenant's task store quotas: kind -> (its TenantPolicy field, resource_allocation's default).
_QUOTAS = MappingProxyType({
    "tasks": ("max_unfinished_tasks", "max_tasks_per_tenant"),
    "blobs": ("max_blobs", "max_blobs_per_tenant"),
    "blob_bytes": ("max_blob_bytes", "max_blob_bytes_per_tenant"),
})


class TaskNotFound(LookupError):
    pass


class SubmitError(ValueError):
    """A submission (or upload) that cannot be taken. `code` is "invalid", "not_found",
    "conflict", "resources" or "quota" (a tenant's limit in resource_allocation); `path` names
    the offending field."""

    def __init__(self, code: str, path: str, message: str, task: Task | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.code = code
        self.path = path
        self.task = task


@dataclass(frozen=True)
class Submission:
    service: str
    method: str
    payload: bytes = b""
    payload_blob_id: str = ""
    priority: int = 0
    timeout_s: float = 0.0
    idempotency_key: str = ""
    tenant: str = ""
    max_attempts: int = 0
    origin: str = "submit"
    #: Whether the tenant's quotas apply: a tenant key's submission or a tenant's deferred
    #: call (not an operator's).
    limited: bool = False


@dataclass(frozen=True)
class SchedulerOptions:
    lease_ttl_s: float = 10.0
    aging_interval_s: float = queue.DEFAULT_AGING_INTERVAL_S
    retry: lifecycle.RetryPolicy = field(default_factory=lifecycle.RetryPolicy)
    #: An agent counts towards cluster capacity while it asked for work this recently.
    agent_seen_s: float = 30.0
    max_wait_s: float = 30.0


@dataclass
class _Agent:
    capacity: int
    pool: Resources
    last_seen: float
    peak: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESOURCE_NAMES, 0.0))


@dataclass(frozen=True)
class PoolUsage:
    """Used against offered resources for one agent or the whole cluster."""

    used: Resources
    capacity: Resources
    tasks: int
    task_capacity: int

    @property
    def utilisation(self) -> dict[str, float]:
        return allocator.utilisation(self.used, self.capacity)


@dataclass(frozen=True)
class AgentStats:
    agent: str
    usage: PoolUsage
    peak: dict[str, float]
    last_seen: float


@dataclass(frozen=True)
class Stats:
    counts: dict[str, int]
    cluster: PoolUsage
    agents: tuple[AgentStats, ...]
    peak: dict[str, float]
    max_concurrent_tasks: int
    aging_interval_s: float
    lease_ttl_s: float


def _holding(tasks: Sequence[Task]) -> Holding:
    total = ZERO
    for t in tasks:
        total = total + t.requirements
    return Holding(tasks=len(tasks), resources=total)


def request_hash(sub: Submission) -> str:
    body = orjson.dumps([sub.service, sub.method, sub.payload.decode("utf-8", "replace"), sub.payload_blob_id])
    return hashlib.sha256(body).hexdigest()


class TaskScheduler:
    def __init__(
        self,
        store: TaskStoreLike,
        registry_state: Callable[[], RegistryState],
        options: SchedulerOptions = SchedulerOptions(),
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._store = store
        self._state = registry_state
        self.options = options
        self._clock = clock
        self._new_id = new_id
        self._agents: dict[str, _Agent] = {}
        self._peak = dict.fromkeys(RESOURCE_NAMES, 0.0)
        self._changed = asyncio.Event()
        self._watchers: set[asyncio.Queue[Task | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # where wake-ups go; set by `call`
        self._recover()

    async def call(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`method(*args, **kwargs)` (one of this scheduler's) on the task store's thread,
        after every call made before it."""
        self._loop = asyncio.get_running_loop()
        return await self._store.serial.run(method, *args, **kwargs)

    # -- start-up

    def _recover(self) -> None:
        """Give every lease held across a restart one fresh TTL to check in."""
        now = self._clock()
        extended = [
            dataclasses.replace(t, lease_expires_at=max(t.lease_expires_at, now + self.options.lease_ttl_s))
            for t in self._store.leased()
        ]
        if extended:
            self._store.save(extended)
            log.info("recovered %d leased task(s); their agents have %.0f s to check in",
                     len(extended), self.options.lease_ttl_s)

    # -- submission

    def submit(self, sub: Submission) -> tuple[Task, bool]:
        spec, payload = self._validate(sub)
        tenant = sub.tenant or "default"
        if sub.limited:
            self._check_task_quota(tenant, sub.idempotency_key)
        category = spec.category.value
        metadata = dict(spec.metadata)
        try:
            need = allocator.requirements(category, metadata, self._state().settings.resource_allocation)
        except allocator.AllocationError as exc:
            message = f"Resource allocation failed: service {spec.name!r} {exc}"
            raise SubmitError("resources", "service", message) from None
        now = self._clock()
        task = Task(
            id=self._new_id(), tenant=tenant, service=spec.name, category=category, method=sub.method,
            priority=sub.priority or queue.DEFAULT_PRIORITY, requirements=need, submitted_at=now,
            payload=payload, payload_blob_id=sub.payload_blob_id, timeout_s=sub.timeout_s or self._timeout(spec.name),
            idempotency_key=sub.idempotency_key, request_hash=request_hash(sub),
            max_attempts=sub.max_attempts or (DEFER_ATTEMPTS if sub.origin == "defer" else DEFAULT_ATTEMPTS),
            origin=sub.origin, updated_at=now,
        )
        reason = allocator.never_fits(need, category, self._pools(now))
        if reason is not None:
            task = dataclasses.replace(task, state=TaskState.FAILED, finished_at=now,
                                       error=TaskError("resource_allocation", reason))
        stored, created = self._store.insert(task)
        if not created:
            if stored.request_hash != task.request_hash:
                raise SubmitError("conflict", "idempotency_key",
                                  f"{sub.idempotency_key!r} was used for a different request (task {stored.id})")
            return stored, False
        self._changed_task(stored)
        if reason is not None:
            raise SubmitError("resources", "", f"{reason} (recorded as failed task {stored.id})", stored)
        return stored, True

    def _check_task_quota(self, tenant: str, idempotency_key: str) -> None:
        """Refuse a new task of a tenant holding its limit of unfinished ones. A resubmission
        of a key it already used is let through: it makes nothing new."""
        limit, key = self.quota(tenant, "tasks")
        if not limit:
            return
        held = self._store.unfinished_of(tenant)
        if held < limit or (idempotency_key and self._store.by_idempotency_key(tenant, idempotency_key)):
            return
        raise SubmitError("quota", "", (
            f"tenant {tenant!r} has {held} unfinished tasks (queued, leased or running), its limit "
            f"({key} = {limit}); submit again when some have finished"))

    def quota(self, tenant: str, kind: str) -> tuple[int, str]:
        """`tenant`'s limit of `kind` ("tasks", "blobs", "blob_bytes"; 0 = none) and the setting
        it comes from: its own policy's when set, else resource_allocation's."""
        own, default = _QUOTAS[kind]
        state = self._state()
        record = state.tenant(tenant)
        value = int(getattr(record.policy, own)) if record is not None else 0
        if value:
            return value, f"the tenant policy's {own}"
        return int(getattr(state.settings.resource_allocation, default)), f"resource_allocation.{default}"

    def _validate(self, sub: Submission) -> tuple[ServiceSpec, bytes]:
        if not sub.service:
            raise SubmitError("invalid", "service", "required")
        if not sub.method:
            raise SubmitError("invalid", "method", "required")
        if not 0 <= sub.priority <= queue.MAX_PRIORITY:
            raise SubmitError("invalid", "priority", f"must be within 1..10 (0 = default 5), got {sub.priority}")
        if not 0 <= sub.timeout_s <= MAX_TIMEOUT_S:
            raise SubmitError("invalid", "timeout", f"must be within 0..{MAX_TIMEOUT_S:g} s")
        if not 0 <= sub.max_attempts <= MAX_ATTEMPTS:
            raise SubmitError("invalid", "max_attempts", f"must be within 1..{MAX_ATTEMPTS} (0 = {DEFAULT_ATTEMPTS})")
        if len(sub.idempotency_key) > 256:
            raise SubmitError("invalid", "idempotency_key", "at most 256 characters")
        if len(sub.tenant) > 128:
            raise SubmitError("invalid", "tenant", "at most 128 characters")
        if sub.payload_blob_id:
            blob = self._store.get_blob(sub.payload_blob_id)
            if blob is None:
                raise SubmitError("not_found", "payload_blob_id", f"no blob {sub.payload_blob_id!r}")
            self._check_json(blob, "payload_blob_id")
            payload = b""
        else:
            if len(sub.payload) > MAX_PAYLOAD_BYTES:
                raise SubmitError("invalid", "payload", "too large: upload it with UploadBlob and name the blob")
            self._check_json(sub.payload or b"{}", "payload")
            payload = sub.payload or b"{}"
        spec = self._state().service(sub.service)
        if spec is None:
            raise SubmitError("not_found", "service", f"no service named {sub.service!r}")
        return spec, payload

    @staticmethod
    def _check_json(body: bytes, path: str) -> None:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise SubmitError("invalid", path, f"not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise SubmitError("invalid", path, f"must be a JSON object, got {type(value).__name__}")

    def _timeout(self, service: str) -> float:
        """The service's timeout, else its category policy's, else the default timeout
        (wire/attempt_policy.py::call_timeout: the same order as a synchronous call's)."""
        state = self._state()
        spec = state.service(service)
        assert spec is not None
        policies = dict(state.settings.category_policies)
        policy = policies.get(spec.category.value)
        return call_timeout(0.0, spec.timeout_s, policy.timeout_s if policy else 0.0, state.settings.default_timeout_s)

    def _pools(self, now: float) -> list[Resources]:
        """The pools a new task is judged against: the live workers' (what they declared, each
        undeclared resource unlimited); with no live worker, an undeclared pool, so the task
        queues for a worker yet to come (the seed's "queued for later processing")."""
        live = [a.pool for a in self._live_agents(now).values()]
        return live or [allocator.agent_pool(ZERO)]

    # -- reading

    def get(self, task_id: str) -> Task:
        task = self._store.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def list_tasks(
        self, states: Sequence[TaskState] = (), tenant: str = "", service: str = "", limit: int = 100
    ) -> list[Task]:
        return self._store.list(states, tenant, service, limit)

    def blob(self, blob_id: str) -> bytes | None:
        return self._store.get_blob(blob_id)

    def blob_owned(self, blob_id: str, tenant: str) -> bool:
        return self._store.blob_owned(blob_id, tenant)

    def put_blob(self, data: bytes, content_type: str, tenant: str = "") -> str:
        """Store an upload of `tenant` ("" = an operator's, not limited) within the tenant's
        blob quotas (SubmitError "quota"); see TaskStoreLike.put_blob. Content the tenant
        already uploaded is stored again without counting twice."""
        if tenant and not self._store.blob_owned(blob_id_of(data), tenant):
            room = self.upload_room(tenant)
            if len(data) > room:
                raise SubmitError("quota", "", self.bytes_quota_message(tenant, len(data), room))
        return self._store.put_blob(data, content_type, self._clock(), tenant)

    def upload_room(self, tenant: str) -> float:
        """The bytes a new blob of `tenant` may have (math.inf: not limited); SubmitError
        "quota" when the tenant may upload no new blob at all."""
        if not tenant:
            return math.inf
        (blobs, blobs_key), (size_limit, _) = self.quota(tenant, "blobs"), self.quota(tenant, "blob_bytes")
        if not (blobs or size_limit):
            return math.inf
        count, size = self._store.blob_usage(tenant)
        if blobs and count >= blobs:
            raise SubmitError("quota", "", f"tenant {tenant!r} holds {count} blobs, its limit ({blobs_key} = {blobs}); "
                                           f"{_BLOBS_GO}")
        room = size_limit - size if size_limit else math.inf
        if room <= 0:
            raise SubmitError("quota", "", self.bytes_quota_message(tenant, 1, room))
        return room

    def bytes_quota_message(self, tenant: str, size: int, room: float) -> str:
        """Why a blob of `size` bytes is refused when `tenant` has room for `room` more."""
        limit, key = self.quota(tenant, "blob_bytes")
        return (f"tenant {tenant!r} may store {max(0, int(room))} more bytes of blobs, not {size} "
                f"({key} = {limit}); {_BLOBS_GO}")

    def effective_priority(self, task: Task) -> float:
        waited = (task.finished_at or self._clock()) - task.submitted_at
        return queue.effective_priority(task.priority, waited, self.options.aging_interval_s)

    # -- operator actions

    def cancel(self, task_id: str) -> Task:
        """Cancel a task that is not final (lifecycle.TransitionError otherwise)."""
        task = self.get(task_id)
        new = lifecycle.cancel(task, self._clock())
        ended = [(new, task.lease_id, new.finished_at, "cancelled")] if task.state.holds_lease else []
        self._store.save([new], attempts_ended=ended)
        self._changed_task(new)
        return new

    # -- agents

    async def lease(self, offer: AgentOffer, wait_s: float) -> list[Task]:
        """Lease what fits `offer` now, or wait up to `wait_s` for something to. `offer.pool` is
        what the agent declared (zeros: unlimited)."""
        deadline = self._clock() + min(max(0.0, wait_s), self.options.max_wait_s)
        while True:
            changed = self._changed  # taken before looking, so no wake-up is missed
            leased = await self.call(self.lease_now, offer)
            remaining = deadline - self._clock()
            if leased or remaining <= 0:
                return leased
            # Backoffs end without any event: look again at least twice a second.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 0.5))

    def lease_now(self, offer: AgentOffer) -> list[Task]:
        """Lease what fits `offer` at this instant (no waiting): the decision and its write."""
        now = self._clock()
        self.sweep()
        pool = allocator.agent_pool(offer.pool)
        agent = self._agents.get(offer.agent)
        if agent is None:
            agent = self._agents[offer.agent] = _Agent(offer.capacity, pool, now)
        agent.capacity, agent.pool, agent.last_seen = offer.capacity, pool, now
        holding = _holding(self._store.holding(offer.agent))
        services = {s for s in offer.services if self._state().service(s) is not None}
        # A window of the best ready tasks: enough to fill the slots and backfill around misfits.
        window = min(CANDIDATE_WINDOW, max(32, 8 * offer.max_tasks))
        candidates = self._store.candidates(services, now, self.options.aging_interval_s, window)
        chosen = queue.select(
            candidates, dataclasses.replace(offer, services=frozenset(services)), pool, holding,
            cluster_in_flight=self._store.in_flight(),
            max_concurrent=self._state().settings.resource_allocation.max_concurrent_tasks,
            now=now, aging_interval_s=self.options.aging_interval_s,
        )
        leased = [lifecycle.lease(self.get(t.id), offer.agent, self._new_id(), now, self.options.lease_ttl_s)
                  for t in chosen]  # reloaded whole: candidates come without their payloads
        if leased:
            self._store.save(leased, attempts_started=[(t, now) for t in leased])
            self._record_peak(agent, _holding(self._store.holding(offer.agent)))
            for t in leased:
                self._changed_task(t, wake=False)
        return leased

    def heartbeat(self, task_id: str, lease_id: str, progress: float, message: str, started: bool) -> lifecycle.Beat:
        task = self.get(task_id)
        beat = lifecycle.heartbeat(task, lease_id, self._clock(), self.options.lease_ttl_s, progress, message, started)
        if beat.lease_valid:
            self._store.save([beat.task])
            if (beat.task.state, beat.task.progress, beat.task.progress_message) != (
                    task.state, task.progress, task.progress_message):
                self._changed_task(beat.task, wake=False)
        return beat

    def complete(self, task_id: str, report: lifecycle.Completion) -> tuple[bool, Task]:
        task = self.get(task_id)
        now = self._clock()
        known = self._store.lease_known(task_id, report.lease_id)
        new = lifecycle.complete(task, report, known, now, self.options.retry)
        if new is None:
            return False, task
        ended = [(new, report.lease_id, now, report.outcome)]
        if task.state.holds_lease and task.lease_id != report.lease_id:
            ended.append((new, task.lease_id, now, "superseded"))  # a late success won
        self._store.save([new], attempts_ended=ended)
        self._changed_task(new, wake=new.state is TaskState.QUEUED or task.state.holds_lease)
        return True, new

    def sweep(self) -> int:
        """Return every task whose lease expired to the queue (or dead-letter it), and fail
        queued tasks of services no longer registered (no agent would ever lease them)."""
        now = self._clock()
        gone = [t for t in self._store.leased() if lifecycle.expired(t, now)]
        new = [lifecycle.expire(t, now) for t in gone]
        state = self._state()
        orphans = [
            lifecycle.orphan(t, now)
            for service in self._store.queued_services() if state.service(service) is None
            for t in self._store.queued_of(service)
        ]
        if not new and not orphans:
            return 0
        self._store.save([*new, *orphans], attempts_ended=[(t, t.lease_id, now, "expired") for t in new])
        for t in new:
            log.warning("task %s: lease %s of agent %s expired; now %s", t.id, t.lease_id, t.agent, t.state.value)
        for t in [*new, *orphans]:
            self._changed_task(t)
        return len(new)

    def purge(self, limit: int = PURGE_BATCH) -> Purged:
        """One bounded bite of retention (two transactions of at most `limit` rows each): final
        tasks that finished more than task_retention ago, with their attempt rows; then blobs
        last uploaded more than task_retention ago that no unfinished task names. A bite with
        `limit` tasks or blobs may leave more: call again (on the store's thread, so the calls
        of others run between bites)."""
        retention = self._state().settings.resource_allocation.task_retention_s
        before = self._clock() - retention
        return self._store.purge_tasks(before, limit) + self._store.purge_blobs(before, limit)

    def tenants_over_kept(self) -> Sequence[tuple[str, int]]:
        """(tenant, finished tasks) of the tenants over max_finished_tasks_per_tenant."""
        keep = self._state().settings.resource_allocation.max_finished_tasks_per_tenant
        return self._store.tenants_over(keep) if keep else []

    def trim(self, tenant: str, limit: int = PURGE_BATCH) -> Purged:
        """One bite (at most `limit` rows) of `tenant`'s oldest finished tasks beyond
        max_finished_tasks_per_tenant."""
        keep = self._state().settings.resource_allocation.max_finished_tasks_per_tenant
        return self._store.purge_oldest_finished(tenant, keep, limit) if keep else Purged()

    # -- utilisation

    def _live_agents(self, now: float) -> dict[str, _Agent]:
        return {k: a for k, a in self._agents.items() if now - a.last_seen <= self.options.agent_seen_s}

    def _record_peak(self, agent: _Agent, holding: Holding) -> None:
        for name, value in allocator.utilisation(holding.resources, agent.pool).items():
            agent.peak[name] = max(agent.peak[name], value)
        self._cluster_peak()

    def _cluster_peak(self) -> None:
        for name, value in self._cluster_usage(self._clock()).utilisation.items():
            self._peak[name] = max(self._peak[name], value)

    def _cluster_usage(self, now: float) -> PoolUsage:
        agents = self._live_agents(now)
        capacity, used, tasks, slots = ZERO, ZERO, 0, 0
        holdings = {name: _holding(self._store.holding(name)) for name in agents}
        for name, agent in agents.items():
            capacity = capacity + agent.pool
            used = used + holdings[name].resources
            tasks += holdings[name].tasks
            slots += agent.capacity
        return PoolUsage(used, capacity, tasks, slots)

    def utilisation(self) -> dict[str, float]:
        """Cluster-wide used / offered per resource (for metrics): 0 for unlimited resources."""
        return self._cluster_usage(self._clock()).utilisation

    def stats(self) -> Stats:
        now = self._clock()
        agents = []
        for name, agent in sorted(self._live_agents(now).items()):
            holding = _holding(self._store.holding(name))
            usage = PoolUsage(holding.resources, agent.pool, holding.tasks, agent.capacity)
            agents.append(AgentStats(name, usage, dict(agent.peak), agent.last_seen))
        return Stats(
            counts=self._store.counts(), cluster=self._cluster_usage(now), agents=tuple(agents), peak=dict(self._peak),
            max_concurrent_tasks=self._state().settings.resource_allocation.max_concurrent_tasks,
            aging_interval_s=self.options.aging_interval_s, lease_ttl_s=self.options.lease_ttl_s,
        )

    # -- change feed

    def _changed_task(self, task: Task, wake: bool = True) -> None:
        call_on(self._loop, self._fan_out, task, wake)

    def _fan_out(self, task: Task, wake: bool) -> None:
        if wake:
            self._changed.set()
            self._changed = asyncio.Event()
        for watcher in list(self._watchers):
            try:
                watcher.put_nowait(task)
            except asyncio.QueueFull:  # a watcher that cannot keep up is dropped, not waited for
                self._watchers.discard(watcher)
                with contextlib.suppress(asyncio.QueueFull):
                    watcher.get_nowait()
                    watcher.put_nowait(None)

    @contextlib.contextmanager
    def watch(self, max_backlog: int = 10_000) -> Iterator[asyncio.Queue[Task | None]]:
        """A queue of changed tasks (None: the watcher fell too far behind and was dropped)."""
        watcher: asyncio.Queue[Task | None] = asyncio.Queue(max_backlog)
        self._watchers.add(watcher)
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)

