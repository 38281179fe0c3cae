"""Admission control: the pure core (tables + a Hypothesis state machine) and the asyncio edge."""

from __future__ import annotations

import asyncio
import contextlib
from typing import ClassVar

import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from switchgear.dataplane.resilience.admission import AdmissionCore, AdmissionSettings, Effects, ShedReason
from switchgear.dataplane.resilience.admission_edge import Admission, Shed
from switchgear.dataplane.resilience.stats import ResilienceStats


def core(queue: int = 2, limits: dict[str, int] | None = None, **settings: float) -> AdmissionCore:
    c = AdmissionCore(AdmissionSettings(**settings))
    c.configure(0.0, "svc", queue, {"a": 1, "b": 2} if limits is None else limits)
    return c


def ask(c: AdmissionCore, now: float, rid: int, priority: int, endpoint: str = "a", deadline: float = 100.0) -> Effects:
    return c.request(now, rid, "svc", endpoint, priority, deadline)


def granted(e: Effects) -> list[int]:
    return [g.id for g in e.granted]


def shed(e: Effects) -> list[tuple[int, ShedReason]]:
    return [(r.id, r.reason) for r in e.shed]


def test_grants_up_to_the_limit_then_queues() -> None:
    c = core()
    assert granted(ask(c, 0, 1, 5)) == [1]
    assert ask(c, 0, 2, 5) == Effects()  # queued
    assert [w.id for w in c.queued("svc")] == [2]
    assert granted(ask(c, 0, 3, 5, endpoint="b")) == [3] and granted(ask(c, 0, 4, 5, endpoint="b")) == [4]
    assert c.in_flight("svc", "a") == 1 and c.in_flight("svc", "b") == 2
    assert granted(ask(c, 0, 5, 5, endpoint="unlimited")) == [5]  # no limit configured


@pytest.mark.parametrize(
    ("queued", "newcomer", "shed_id", "order"),
    [
        # (id, priority) already queued; newcomer (id, priority); who is shed; queue order after
        ([(2, 5), (3, 5)], (4, 5), 4, [2, 3]),  # tie: the newer request loses
        ([(2, 5), (3, 5)], (4, 4), 4, [2, 3]),  # newcomer is the lowest
        ([(2, 5), (3, 3)], (4, 9), 3, [4, 2]),  # a queued lower one is pushed out
        ([(2, 3), (3, 3)], (4, 5), 3, [4, 2]),  # among equal lowest, the newest queued one goes
        ([(2, 9), (3, 1)], (4, 2), 3, [2, 4]),
    ],
)
def test_full_queue_sheds_the_lowest_priority(queued: list[tuple[int, int]], newcomer: tuple[int, int],
                                             shed_id: int, order: list[int]) -> None:
    c = core()
    ask(c, 0, 1, 5)  # fills "a"
    for rid, priority in queued:
        assert ask(c, 0, rid, priority) == Effects()
    effects = ask(c, 1, *newcomer)
    assert shed(effects) == [(shed_id, ShedReason.QUEUE_FULL)]
    assert [w.id for w in c.queued("svc")] == order


def test_release_wakes_the_highest_priority_then_the_oldest() -> None:
    c = core(queue=0)  # unbounded
    ask(c, 0, 1, 5)
    for rid, priority in [(2, 3), (3, 8), (4, 8), (5, 5)]:
        ask(c, 0, rid, priority)
    order = []
    current = 1
    for t in range(1, 5):
        woken = granted(c.release(float(t), current))
        assert len(woken) == 1
        current = woken[0]
        order.append(current)
    assert order == [3, 4, 5, 2]


def test_waiters_for_a_full_endpoint_do_not_block_another() -> None:
    c = core()
    ask(c, 0, 1, 5)
    ask(c, 0, 2, 9)  # waits for "a"
    assert granted(ask(c, 0, 3, 1, endpoint="b")) == [3]
    assert granted(c.release(1.0, 1)) == [2]


@pytest.mark.parametrize(
    ("queue_timeout", "deadline", "expires", "reason"),
    [
        (0.0, 5.0, 5.0, ShedReason.DEADLINE),
        (2.0, 5.0, 2.0, ShedReason.QUEUE_TIMEOUT),
        (9.0, 5.0, 5.0, ShedReason.DEADLINE),
    ],
)
def test_queue_wait_is_bounded(queue_timeout: float, deadline: float, expires: float, reason: ShedReason) -> None:
    c = core(queue_timeout_s=queue_timeout)
    ask(c, 0, 1, 5)
    ask(c, 0, 2, 5, deadline=deadline)
    assert c.expire(expires - 0.01) == Effects()
    assert shed(c.expire(expires)) == [(2, reason)]
    assert c.queued("svc") == ()


def test_expired_request_is_refused_and_expiry_runs_first() -> None:
    c = core()
    assert shed(ask(c, 5, 1, 5, deadline=5.0)) == [(1, ShedReason.DEADLINE)]
    ask(c, 5, 2, 5)
    ask(c, 5, 3, 5, deadline=6.0)
    effects = ask(c, 7, 4, 5)  # 3 expired at 6; 4 queues behind nothing but the full endpoint
    assert shed(effects) == [(3, ShedReason.DEADLINE)]


def test_retry_after_hint_from_service_times() -> None:
    c = core(queue=1, limits={"a": 2}, default_retry_after_s=1.0, ewma_alpha=0.5)
    assert c.retry_after_s("svc") == 1.0  # no history yet
    ask(c, 0, 1, 5)
    ask(c, 0, 2, 5)
    c.release(4.0, 1)  # held 4 s -> ewma 4
    ask(c, 4, 3, 5)
    c.release(6.0, 2)  # held 6 s -> ewma 5
    ask(c, 6, 4, 5)
    ask(c, 6, 5, 5)  # queued (a is full with 3 and 4)
    effects = ask(c, 6, 6, 5)  # queue full, newcomer shed
    # ewma 5 s * (1 queued + 1) / capacity 2 = 5 s
    assert effects.shed[0].retry_after_s == pytest.approx(5.0)


def test_cancel_and_raising_a_limit() -> None:
    c = core()
    ask(c, 0, 1, 5)
    ask(c, 0, 2, 5)
    assert shed(c.cancel(1, "svc", 2)) == [(2, ShedReason.CANCELLED)]
    assert c.cancel(1, "svc", 2) == Effects()
    ask(c, 1, 3, 5)
    assert granted(c.configure(2, "svc", 2, {"a": 2})) == [3]
    assert c.release(3, 999) == Effects()  # unknown ids are ignored


class AdmissionMachine(RuleBasedStateMachine):
    """Random requests, releases, cancels and time against one service with two endpoints."""

    LIMITS: ClassVar[dict[str, int]] = {"a": 1, "b": 2}

    def __init__(self) -> None:
        super().__init__()
        self.core = core(queue=3, limits=self.LIMITS)
        self.now = 0.0
        self.holding: list[int] = []
        self.next_id = 1

    def _apply(self, effects: Effects, newcomer: tuple[int, int] | None = None) -> None:
        self.holding.extend(g.id for g in effects.granted)
        for r in effects.shed:
            if r.reason is ShedReason.QUEUE_FULL:
                # the shed one was the lowest of everything queued plus the newcomer
                assert all(w.priority >= r.priority for w in self.core.queued("svc"))
                if newcomer is not None and newcomer[0] != r.id:
                    assert newcomer[1] >= r.priority

    @rule(priority=st.integers(1, 10), endpoint=st.sampled_from(["a", "b"]), ttl=st.floats(0, 5))
    def request(self, priority: int, endpoint: str, ttl: float) -> None:
        rid = self.next_id
        self.next_id += 1
        self._apply(self.core.request(self.now, rid, "svc", endpoint, priority, self.now + ttl), (rid, priority))

    @precondition(lambda self: self.holding)
    @rule(index=st.integers(min_value=0))
    def release(self, index: int) -> None:
        self._apply(self.core.release(self.now, self.holding.pop(index % len(self.holding))))

    @precondition(lambda self: self.core.queued("svc"))
    @rule(index=st.integers(min_value=0))
    def cancel(self, index: int) -> None:
        queued = self.core.queued("svc")
        self._apply(self.core.cancel(self.now, "svc", queued[index % len(queued)].id))

    @rule(dt=st.floats(0, 2))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._apply(self.core.expire(self.now))

    @invariant()
    def concurrency_never_exceeds_the_limit(self) -> None:
        for endpoint, limit in self.LIMITS.items():
            assert 0 <= self.core.in_flight("svc", endpoint) <= limit
        assert sum(self.core.in_flight("svc", e) for e in self.LIMITS) == len(self.holding)

    @invariant()
    def queue_is_bounded_ordered_and_only_waits_for_full_endpoints(self) -> None:
        queued = self.core.queued("svc")
        assert len(queued) <= 3
        assert [w.order for w in queued] == sorted(w.order for w in queued)
        assert all(not self.core.has_room("svc", w.endpoint) for w in queued)


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = hsettings(max_examples=150, stateful_step_count=60, deadline=None)


# --- the asyncio edge --------------------------------------------------------------------


async def test_slot_waits_then_is_granted_in_priority_order() -> None:
    admission = Admission(core(queue=5, limits={"a": 1}))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    order: list[int] = []
    first = asyncio.Event()

    async def call(priority: int, hold: float) -> None:
        async with admission.slot("svc", "a", priority, deadline):
            order.append(priority)
            first.set()
            await asyncio.sleep(hold)

    holder = asyncio.create_task(call(5, 0.05))
    await first.wait()
    waiters = [asyncio.create_task(call(p, 0)) for p in (2, 9, 5)]
    await asyncio.gather(holder, *waiters)
    assert order == [5, 9, 5, 2]
    assert admission.core.in_flight("svc", "a") == 0


async def test_slot_sheds_on_deadline_and_queue_full() -> None:
    stats = ResilienceStats()
    admission = Admission(core(queue=1, limits={"a": 1}), stats=stats)
    now = asyncio.get_running_loop().time()
    async with admission.slot("svc", "a", 5, now + 5):
        with pytest.raises(Shed) as late:
            async with admission.slot("svc", "a", 5, now + 0.05):
                pass
        assert late.value.reason is ShedReason.DEADLINE and late.value.retry_after_s > 0
        low = asyncio.create_task(_enter(admission, 1, now + 5))
        await asyncio.sleep(0)
        with pytest.raises(Shed) as full:  # equal priority: the newcomer loses
            async with admission.slot("svc", "a", 1, now + 5):
                pass
        assert full.value.reason is ShedReason.QUEUE_FULL
        high = asyncio.create_task(_enter(admission, 9, now + 5))  # pushes the low one out
        with pytest.raises(Shed):
            await low
    await high
    assert admission.core.queued("svc") == () and admission.core.in_flight("svc", "a") == 0
    counters = stats.counters("svc", "a")
    # shed: the late one, the full-queue newcomer, the pushed-out low one; queued: late, low, high
    assert (counters.sheds, counters.queued) == (3, 3)


async def _enter(admission: Admission, priority: int, deadline: float) -> None:
    async with admission.slot("svc", "a", priority, deadline):
        pass


async def test_cancelled_waiter_leaves_the_queue_and_body_errors_release() -> None:
    admission = Admission(core(queue=5, limits={"a": 1}))
    now = asyncio.get_running_loop().time()
    with pytest.raises(RuntimeError):
        async with admission.slot("svc", "a", 5, now + 5):
            waiter = asyncio.create_task(_enter(admission, 5, now + 5))
            await asyncio.sleep(0)
            assert len(admission.core.queued("svc")) == 1
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            assert admission.core.queued("svc") == ()
            raise RuntimeError("upstream blew up")
    assert waiter.cancelled()
    assert admission.core.queued("svc") == () and admission.core.in_flight("svc", "a") == 0
    admission.configure("svc", 5, {"a": 2})
    await _enter(admission, 5, now + 5)
