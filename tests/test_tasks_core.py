"""Pure parts of the task scheduler: aging and order, what to lease, the allocator, the task
lifecycle (lease expiry, retry backoff, dead-lettering), and a Hypothesis state machine that
drives the real scheduler on an in-memory store with an injected clock."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from switchgear.controlplane.model import (
    Category,
    EndpointSpec,
    RegistryState,
    ResourceAllocationSettings,
    ServiceSpec,
    Settings,
)
from switchgear.controlplane.tasks import allocator, lifecycle, queue
from switchgear.controlplane.tasks.model import (
    ZERO,
    AgentOffer,
    Holding,
    Resources,
    Task,
    TaskError,
    TaskState,
    Usage,
)
from switchgear.controlplane.tasks.scheduler import SchedulerOptions, Submission, SubmitError, TaskScheduler
from switchgear.controlplane.tasks.store import TaskStore

GIB = 1024**3
LLM = allocator.DEFAULT_REQUIREMENTS["llm"]
DOC = allocator.DEFAULT_REQUIREMENTS["document"]
OTHER = allocator.OTHER_REQUIREMENTS
BIG_POOL = Resources(cpu=8, memory_bytes=16 * GIB, gpu=math.inf, disk_iops=math.inf, network_mbps=math.inf)


def task(
    tid: str, priority: int = 5, at: float = 0.0, need: Resources = OTHER, service: str = "svc", **kw: object
) -> Task:
    return Task(id=tid, tenant="t", service=service, category="llm", method="m", priority=priority,
                requirements=need, submitted_at=at, **kw)  # type: ignore[arg-type]


def offer(capacity: int = 10, services: tuple[str, ...] = ("svc",), max_tasks: int = 10) -> AgentOffer:
    return AgentOffer("a1", capacity, ZERO, frozenset(services), max_tasks)


# -- aging and order


@pytest.mark.parametrize(
    ("priority", "waited_s", "interval_s", "expected"),
    [
        (5, 0, 60, 5.0),
        (5, 30, 60, 5.5),
        (1, 540, 60, 10.0),  # nine minutes: a priority-1 task reaches the top
        (1, 5000, 60, 10.0),  # capped
        (10, 100, 60, 10.0),
        (3, -5, 60, 3.0),  # clock skew never lowers a priority
        (3, 1000, 0, 3.0),  # aging off
    ],
)
def test_effective_priority(priority: int, waited_s: float, interval_s: float, expected: float) -> None:
    assert queue.effective_priority(priority, waited_s, interval_s) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("tasks", "now", "expected"),
    [
        ([task("a", 5, 0), task("b", 9, 0), task("c", 1, 0)], 0, ["b", "a", "c"]),
        ([task("a", 5, 10), task("b", 5, 0)], 10, ["b", "a"]),  # equal priority: older first
        ([task("old", 1, 0), task("new", 9, 600)], 600, ["old", "new"]),  # aged to 10 beats a fresh 9
        ([task("old", 1, 0), task("new", 10, 600)], 600, ["old", "new"]),  # ties at 10: older first
        ([task("y", 4, 0), task("x", 4, 0)], 0, ["x", "y"]),  # then id: a total order
    ],
)
def test_order(tasks: list[Task], now: float, expected: list[str]) -> None:
    assert [t.id for t in queue.ordered(tasks, now, 60.0)] == expected


# -- what to lease

POOL_2CPU = Resources(cpu=2, memory_bytes=4 * GIB, gpu=math.inf, disk_iops=math.inf, network_mbps=math.inf)


@pytest.mark.parametrize(
    ("name", "tasks", "pool", "holding", "capacity", "in_flight", "max_concurrent", "expected"),
    [
        ("by priority within slots", [task("a", 3), task("b", 7), task("c", 5)], BIG_POOL, Holding(), 2, 0, 100,
         ["b", "c"]),
        ("holding uses slots", [task("a"), task("b")], BIG_POOL, Holding(1, OTHER), 2, 0, 100, ["a"]),
        ("cluster cap", [task("a"), task("b"), task("c")], BIG_POOL, Holding(), 10, 98, 100, ["a", "b"]),
        ("backfill a smaller one", [task("doc", 8, need=DOC), task("small", 3)], POOL_2CPU, Holding(), 5, 0, 100,
         ["small"]),
        ("top priority that could fit reserves the agent",
         [task("doc", 10, need=DOC), task("small", 3)], BIG_POOL, Holding(1, Resources(cpu=6)), 5, 0, 100, []),
        ("top priority that can never fit here does not block",
         [task("doc", 10, need=DOC), task("small", 3)], POOL_2CPU, Holding(), 5, 0, 100, ["small"]),
        ("resources bound before slots", [task(str(i), need=LLM) for i in range(5)], BIG_POOL, Holding(), 10, 0, 100,
         ["0", "1", "2", "3"]),
        ("backoff not over", [task("later", 9, not_before=50.0), task("now", 1)], BIG_POOL, Holding(), 5, 0, 100,
         ["now"]),
        ("services the agent runs", [task("x", 9, service="other"), task("y", 1)], BIG_POOL, Holding(), 5, 0, 100,
         ["y"]),
        ("only queued", [task("r", 9, state=TaskState.RUNNING), task("q", 1)], BIG_POOL, Holding(), 5, 0, 100, ["q"]),
    ],
)
def test_select(name: str, tasks: list[Task], pool: Resources, holding: Holding, capacity: int, in_flight: int,
                max_concurrent: int, expected: list[str]) -> None:
    chosen = queue.select(tasks, offer(capacity), pool, holding, cluster_in_flight=in_flight,
                          max_concurrent=max_concurrent, now=10.0)
    assert [t.id for t in chosen] == expected, name


resources_st = st.builds(
    Resources, cpu=st.sampled_from([0.5, 1, 2, 4]), memory_bytes=st.sampled_from([GIB, 2 * GIB, 8 * GIB]),
    gpu=st.sampled_from([0, 0.5, 1]), disk_iops=st.sampled_from([0, 1000]), network_mbps=st.sampled_from([0, 50, 200]),
)
pool_st = st.builds(
    Resources, cpu=st.sampled_from([1, 2, 4, 8, 16]), memory_bytes=st.sampled_from([2 * GIB, 8 * GIB, 32 * GIB]),
    gpu=st.sampled_from([0.5, 1, 2, math.inf]), disk_iops=st.sampled_from([1000, math.inf]),
    network_mbps=st.sampled_from([100, 1000, math.inf]),
)
tasks_st = st.lists(
    st.tuples(st.integers(1, 10), st.floats(0, 1000), resources_st, st.sampled_from(["svc", "other"])),
    max_size=30,
).map(lambda rows: [task(f"t{i}", p, at, need, svc) for i, (p, at, need, svc) in enumerate(rows)])


@given(tasks=tasks_st, pool=pool_st, capacity=st.integers(1, 12), held=st.integers(0, 3),
       in_flight=st.integers(0, 20), max_concurrent=st.integers(1, 25), now=st.floats(1000, 3000))
def test_select_never_exceeds_capacity_and_leases_higher_effective_priority_first(
    tasks: list[Task], pool: Resources, capacity: int, held: int, in_flight: int, max_concurrent: int, now: float
) -> None:
    holding = Holding(held, Resources(cpu=min(pool.cpu, held * 0.5)))
    chosen = queue.select(tasks, offer(capacity), pool, holding, cluster_in_flight=in_flight,
                          max_concurrent=max_concurrent, now=now)
    used = holding.resources
    for t in chosen:
        used = used + t.requirements
    assert used.fits_in(pool)
    assert len(chosen) <= max(0, capacity - held) and in_flight + len(chosen) <= max(max_concurrent, in_flight)
    # Replay the order: whatever was passed over before a chosen task did not fit the room left.
    order = queue.ordered([t for t in tasks if t.service == "svc"], now, 60.0)
    ids = [t.id for t in chosen]
    assert ids == [t.id for t in order if t.id in ids]  # leased in effective-priority order
    free = pool - holding.resources
    last = order.index(chosen[-1]) if chosen else -1
    for t in order[: last + 1]:
        if t.id in ids:
            free = free - t.requirements
        else:
            assert not t.requirements.fits_in(free)


# -- allocator


@pytest.mark.parametrize(
    ("category", "metadata", "expected"),
    [
        ("llm", {}, Resources(2, 4 * GIB, 0.5, 0, 100)),
        ("document", {}, Resources(4, 8 * GIB, 0, 1000, 200)),
        ("embedding", {}, Resources(1, 2 * GIB, 0, 0, 50)),
        ("knowledge_graph", {"resources.cpu": "8", "resources.memory": "16Gi"}, Resources(8, 16 * GIB, 0, 0, 50)),
        ("llm", {"resources.gpu": "0", "resources.network_bandwidth": "10"}, Resources(2, 4 * GIB, 0, 0, 10)),
        ("document", {"resources.disk_io": "250", "resources.memory": "512Mi"},
         Resources(4, 512 * 1024**2, 0, 250, 200)),
    ],
)
def test_requirements(category: str, metadata: dict[str, str], expected: Resources) -> None:
    assert allocator.requirements(category, metadata) == expected
    assert allocator.requirements(category, metadata, ResourceAllocationSettings()) == expected  # same defaults


def test_default_cpu_and_memory_are_the_other_categories_request() -> None:
    """resource_allocation's defaults are a per-task request (the seed's table's last row);
    llm and document keep their own rows, a service's metadata still overrides."""
    seed = ResourceAllocationSettings(default_cpu=2.0, default_memory_bytes=4 * GIB)
    assert allocator.requirements("vector_db", {}, seed) == Resources(2, 4 * GIB, 0, 0, 50)
    assert allocator.requirements("document", {}, seed) == DOC
    assert allocator.requirements("embedding", {"resources.cpu": "0.5"}, seed) == Resources(0.5, 4 * GIB, 0, 0, 50)


@pytest.mark.parametrize(
    ("metadata", "needle"),
    [({"resources.cpu": "lots"}, "resources.cpu"), ({"resources.memory": "8 parsecs"}, "resources.memory"),
     ({"resources.gpu": "-1"}, "resources.gpu"), ({"resources.cpu": "nan"}, "resources.cpu")],
)
def test_bad_override_names_the_key(metadata: dict[str, str], needle: str) -> None:
    with pytest.raises(allocator.AllocationError, match=needle):
        allocator.requirements("llm", metadata)


def test_agent_pool_defaults_and_never_fits() -> None:
    undeclared = allocator.agent_pool(ZERO)
    assert undeclared == Resources(math.inf, math.inf, math.inf, math.inf, math.inf)
    assert allocator.agent_pool(Resources(cpu=16, gpu=1)) == Resources(16, math.inf, 1, math.inf, math.inf)
    assert allocator.never_fits(DOC, "document", [undeclared]) is None  # an agent that declares nothing holds it
    small = allocator.agent_pool(Resources(cpu=2, memory_bytes=4 * GIB))
    assert allocator.never_fits(LLM, "llm", [small]) is None
    reason = allocator.never_fits(DOC, "document", [small])
    assert reason is not None and reason.startswith("Resource allocation failed: ")
    assert "cpu 4 > 2" in reason and "memory_bytes 8Gi > 4Gi" in reason
    assert allocator.never_fits(DOC, "document", [small, BIG_POOL]) is None  # a big agent can hold it
    assert allocator.utilisation(Resources(cpu=1, memory_bytes=GIB), small) == {
        "cpu": 0.5, "memory_bytes": 0.25, "gpu": 0.0, "disk_iops": 0.0, "network_mbps": 0.0}


@pytest.mark.parametrize(("text", "expected"), [("8Gi", 8 * GIB), ("512Mi", 512 * 1024**2), ("1000", 1000),
                                                ("2G", 2e9), ("1.5GiB", 1.5 * GIB)])
def test_parse_size(text: str, expected: float) -> None:
    assert allocator.parse_size(text) == expected


# -- lifecycle

POLICY = lifecycle.RetryPolicy(base_delay_s=1.0, max_delay_s=10.0)


@pytest.mark.parametrize(("attempts", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (40, 10.0)])
def test_backoff(attempts: int, delay: float) -> None:
    assert POLICY.backoff_s(attempts) == delay


def leased(t: Task, now: float = 100.0, ttl: float = 10.0) -> Task:
    return lifecycle.lease(t, "a1", f"L{t.attempts + 1}", now, ttl)


def test_lease_heartbeat_and_expiry() -> None:
    t = leased(task("x", max_attempts=2))
    assert (t.state, t.attempts, t.lease_expires_at) == (TaskState.LEASED, 1, 110.0)
    beat = lifecycle.heartbeat(t, "L1", 105.0, 10.0, 0.4, "half", started=True)
    assert beat.lease_valid and beat.task.state is TaskState.RUNNING and beat.task.lease_expires_at == 115.0
    assert beat.task.started_at == 105.0 and beat.task.progress == 0.4
    assert not lifecycle.heartbeat(beat.task, "L0", 106.0, 10.0, 0.5, "", False).lease_valid  # another lease
    assert not lifecycle.heartbeat(beat.task, "L1", 115.0, 10.0, 0.5, "", False).lease_valid  # too late
    assert not lifecycle.expired(beat.task, 114.9) and lifecycle.expired(beat.task, 115.0)
    again = lifecycle.expire(beat.task, 115.0)
    assert again.state is TaskState.QUEUED and again.not_before == 115.0 and again.error is not None
    assert again.error.kind == "lease_expired"
    last = lifecycle.expire(leased(again, 120.0), 131.0)
    assert last.state is TaskState.DEAD_LETTERED and last.attempts == 2


@pytest.mark.parametrize(
    ("attempts_before", "retryable", "state", "not_before"),
    [
        (0, True, TaskState.QUEUED, 101.0),
        (1, True, TaskState.QUEUED, 102.0),
        (2, True, TaskState.DEAD_LETTERED, 0.0),  # the third attempt was the last
        (0, False, TaskState.FAILED, 0.0),
    ],
)
def test_failure_retries_with_backoff_then_dead_letters(
    attempts_before: int, retryable: bool, state: TaskState, not_before: float
) -> None:
    t = leased(task("x", attempts=attempts_before, max_attempts=3))
    error = TaskError("retryable" if retryable else "client", "boom")
    report = lifecycle.Completion("failed", t.lease_id, error=error, retryable=retryable)
    new = lifecycle.complete(t, report, True, 100.0, POLICY)
    assert new is not None and new.state is state and new.not_before == not_before and new.error == error


def test_completion_rules() -> None:
    t = leased(task("x"))
    ok = lifecycle.Completion("succeeded", t.lease_id, result=b"{}", endpoint="e", usage=Usage(1, 2, 0.1))
    done = lifecycle.complete(t, ok, True, 101.0, POLICY)
    assert done is not None and done.state is TaskState.SUCCEEDED and done.usage.output_tokens == 2
    assert lifecycle.complete(done, ok, True, 102.0, POLICY) is None  # already final
    # re-leased after an expiry: a late success of the old lease still counts, a late failure does not
    relet = leased(lifecycle.expire(t, 111.0), 111.0)
    assert lifecycle.complete(relet, ok, True, 112.0, POLICY) is not None
    bad = lifecycle.Completion("failed", t.lease_id, error=TaskError("retryable", "x"), retryable=True)
    assert lifecycle.complete(relet, bad, True, 112.0, POLICY) is None
    assert lifecycle.complete(relet, dataclasses.replace(ok, lease_id="forged"), False, 112.0, POLICY) is None
    released = lifecycle.complete(relet, lifecycle.Completion("released", relet.lease_id), True, 113.0, POLICY)
    assert released is not None and released.state is TaskState.QUEUED and released.attempts == relet.attempts - 1
    cancelled = lifecycle.cancel(relet, 114.0)
    assert cancelled.state is TaskState.CANCELLED
    assert lifecycle.heartbeat(cancelled, relet.lease_id, 114.5, 10, 0, "", False).cancelled
    with pytest.raises(lifecycle.TransitionError):
        lifecycle.cancel(cancelled, 115.0)


# -- the scheduler as a state machine (real store in memory, injected clock)


def registry_state(cpu: float = 4.0, max_concurrent: int = 6) -> RegistryState:
    services = tuple(
        ServiceSpec(name=name, category=cat, protocol="openai", endpoints=(EndpointSpec("e0", "http://127.0.0.1:9/v1"),))
        for name, cat in (("chat", Category.LLM), ("docs", Category.DOCUMENT), ("embed", Category.EMBEDDING))
    )
    settings = Settings(resource_allocation=ResourceAllocationSettings(
        default_cpu=cpu, default_memory_bytes=16 * GIB, max_concurrent_tasks=max_concurrent))
    return RegistryState(services=services, settings=settings)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class SchedulerMachine(RuleBasedStateMachine):
    AGENTS: ClassVar[dict[str, tuple[int, Resources]]] = {
        "a1": (3, Resources(cpu=4)), "a2": (2, Resources(cpu=8, memory_bytes=32 * GIB))}

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.state = registry_state()
        self.ids = iter(range(10**9))
        self.scheduler = TaskScheduler(TaskStore(":memory:"), lambda: self.state,
                                       SchedulerOptions(lease_ttl_s=5.0, aging_interval_s=30.0,
                                                        retry=lifecycle.RetryPolicy(1.0, 4.0)),
                                       clock=self.clock, new_id=lambda: f"id{next(self.ids):06d}")
        self.submitted: set[str] = set()
        self.final: dict[str, TaskState] = {}
        self.leases: dict[str, Task] = {}

    @rule(service=st.sampled_from(["chat", "docs", "embed"]), priority=st.integers(1, 10),
          key=st.sampled_from(["", "", "k1", "k2"]))
    def submit(self, service: str, priority: int, key: str) -> None:
        try:
            t, created = self.scheduler.submit(Submission(service=service, method="chat.completions", payload=b"{}",
                                                          priority=priority, idempotency_key=key, max_attempts=2))
        except SubmitError as exc:  # the key was first used for another service
            assert exc.code == "conflict" and key
            return
        if key and not created:
            assert t.idempotency_key == key and t.service == service
        self.submitted.add(t.id)

    @rule(agent=st.sampled_from(["a1", "a2"]), services=st.sampled_from([("chat", "docs", "embed"), ("chat",)]))
    def lease(self, agent: str, services: tuple[str, ...]) -> None:
        capacity, pool = self.AGENTS[agent]
        for t in self.scheduler.lease_now(AgentOffer(agent, capacity, pool, frozenset(services), capacity)):
            self.leases[t.lease_id] = t

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "failed", "failed_hard", "released", "beat"]))
    def report(self, data: st.DataObject, outcome: str) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        t = self.leases[lease_id]
        if outcome == "beat":
            self.scheduler.heartbeat(t.id, lease_id, 0.5, "half", True)
            return
        kind = "released" if outcome == "released" else ("failed" if outcome.startswith("failed") else outcome)
        report = lifecycle.Completion(kind, lease_id, result=b"{}", error=TaskError("retryable", "x"),
                                      retryable=outcome == "failed")
        self.scheduler.complete(t.id, report)
        del self.leases[lease_id]

    @rule(task_index=st.integers(0, 50))
    def cancel(self, task_index: int) -> None:
        ids = sorted(self.submitted)
        assume(ids)
        t = self.scheduler.get(ids[task_index % len(ids)])
        if not t.state.final:
            self.scheduler.cancel(t.id)

    @rule(seconds=st.sampled_from([0.5, 2.0, 6.0, 40.0]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds
        self.scheduler.sweep()

    @invariant()
    def never_over_capacity(self) -> None:
        store = self.scheduler._store
        in_flight = 0
        for agent, (capacity, declared) in self.AGENTS.items():
            held = store.holding(agent)
            in_flight += len(held)
            used = ZERO
            for t in held:
                used = used + t.requirements
            pool = allocator.agent_pool(declared)
            assert len(held) <= capacity and used.fits_in(pool)
        assert in_flight == store.in_flight() <= self.state.settings.resource_allocation.max_concurrent_tasks

    @invariant()
    def final_is_final_and_attempts_bounded(self) -> None:
        for task_id in self.submitted:
            t = self.scheduler.get(task_id)
            assert t.attempts <= t.max_attempts
            if task_id in self.final:
                assert t.state is self.final[task_id]
            if t.state.final:
                self.final[task_id] = t.state


    @invariant()
    def a_succeeded_task_has_exactly_one_succeeded_attempt(self) -> None:
        rows = self.scheduler._store._db.all(  # type: ignore[attr-defined]
            "SELECT task_id, COUNT(*) FROM task_attempts WHERE outcome = 'succeeded' GROUP BY task_id")
        counted = {str(task_id): int(n) for task_id, n in rows}
        succeeded = {i for i in self.submitted if self.scheduler.get(i).state is TaskState.SUCCEEDED}
        assert counted == dict.fromkeys(succeeded, 1)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def test_aged_low_priority_task_overtakes_and_every_task_finishes(tmp_path: Path) -> None:
    """A stream of priority-9 tasks cannot starve a priority-1 task: after aging it goes first."""
    clock = Clock()
    state = registry_state(cpu=1.0)  # one "other" task at a time
    scheduler = TaskScheduler(TaskStore(tmp_path / "t.db"), lambda: state, SchedulerOptions(aging_interval_s=10.0),
                              clock=clock)
    low, _ = scheduler.submit(Submission(service="embed", method="m", priority=1))
    pool = Resources(cpu=1.0)
    order = []
    for _ in range(40):
        clock.now += 5.0
        scheduler.submit(Submission(service="embed", method="m", priority=9))
        (t,) = scheduler.lease_now(AgentOffer("a", 1, pool, frozenset({"embed"}), 1))
        order.append(t.id)
        scheduler.complete(t.id, lifecycle.Completion("succeeded", t.lease_id))
        if t.id == low.id:
            break
    # 1 + 85 s / 10 s = 9.5 > a fresh 9 on the 17th step: it waited ~85 s, not forever
    assert order[-1] == low.id and 16 <= len(order) <= 18
