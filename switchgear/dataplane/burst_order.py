"""`agent --burst-order K`: K requests at once in their forward leg, the others wait their turn.

Closed-loop callers against one upstream stay nearly in step, so requests reach the agent in
bursts. One event loop runs a burst like processor sharing: every request of it runs its work
before the Redis round (parse, key check, policy, cache key, the round's packing), then the
rounds' replies come back and each runs its work up to the upstream send. The first request's
upstream call then waits for the whole burst's pre-Redis work, and the median caller's forward
leg is most of the burst's, where run to completion would give it half (bench/overhead/README.md,
Session 10, measured with stamps along the request).

`BurstOrder` is a gate on the forward leg (request read -> its first upstream attempt sent): at
most K requests hold a slot, a request arriving when all are held waits (first come, first
served) and starts when one holder sends its upstream request or finishes. K=2 lets one
request's Redis wait overlap another's CPU work. A slot is never held across anything slow:

- it is given up at the first upstream attempt's start (`attempt_started`, an attempt observer
  run in the request's task), on every exit of the request (answer, error, cache hit,
  cancellation when the caller disconnects), and by `step_aside()` before a wait on another
  request (the response cache's single flight, the admission queue of an endpoint's
  concurrency limit);
- and whatever the request awaits meanwhile (a Redis that stalls, a slow lookup), a slot is taken
  back `hold_s` after it was given (1 ms by default: ~3x a request's forward leg here), so
  nobody waits behind a stalled holder for longer than that. The timer exists only while
  someone waits.

Only while the loop has time to spare: when its thread used BUSY_SHARE of a core or more over
the last BUSY_WINDOW_S, every request goes through at once for the next window (and those
waiting are let go). A saturated loop has a queue whatever the order, and there the burst's
step-at-a-time order costs less CPU per request (each step's code runs warm for the next
request): gated at full load, the production agent served 12-25 % fewer requests a second.

Per event loop (each `--workers` process runs its own); the HTTP door only (http.py: its
middleware, after the edge so that the wait counts in the request's latency, and after the
body is read whole so that a slow body holds no slot).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import time
from collections import deque
from collections.abc import AsyncIterator

HOLD_S = 0.001  # a slot is taken back this long after it was given, sent or not
BUSY_WINDOW_S = 0.05  # how often the loop thread's CPU share is read
BUSY_SHARE = 0.6  # at or above this share of a core the gate lets every request through
MAX_SLOTS = 64


def burst_order_arg(text: str) -> int:
    """The flag's value: 'off' (0) or 1..MAX_SLOTS requests at once in their forward leg."""
    if text.strip().lower() == "off":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not 'off' or a whole number of requests: {text!r}") from None
    if not 0 <= value <= MAX_SLOTS:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..{MAX_SLOTS} (or 'off')")
    return value


class _Slot:
    __slots__ = ("deadline", "live")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.live = True


_held: contextvars.ContextVar[tuple[BurstOrder, _Slot] | None] = contextvars.ContextVar(
    "switchgear_burst_slot", default=None)


def step_aside() -> None:
    """The current request is about to wait on another request or a queue: its slot, if it
    holds one, goes to the next in line."""
    held = _held.get()
    if held is not None:
        held[0].leave(held[1])


class BurstOrder:
    """The gate (module docstring); also an attempt observer that frees a request's slot when
    its first upstream attempt starts."""

    after_answer = False  # (not a counting observer: it hears a success's end at once)

    def __init__(self, slots: int, hold_s: float = HOLD_S, busy_share: float = BUSY_SHARE) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.hold_s = hold_s
        self.busy_share = busy_share
        self.holding = 0
        self.waited = 0  # requests that waited for a slot
        self.taken_back = 0  # slots taken back at the hold bound
        self._holders: deque[_Slot] = deque()  # in the order given (so by deadline)
        self._waiting: deque[asyncio.Future[_Slot]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.passing = False  # the loop is busy: no gate (the window's CPU share >= BUSY_SHARE)
        self._window: tuple[float, float] = (0.0, 0.0)  # (its end, the thread's CPU seconds at its start)

    async def enter(self) -> _Slot:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._window[0]:
            self._sample(now)
        waiting = self._waiting
        if self.holding < self.slots or self.passing:
            while waiting and waiting[0].done():  # (waiters cancelled meanwhile)
                waiting.popleft()
            if not waiting:
                return self._give(now)
        self.waited += 1
        waiter: asyncio.Future[_Slot] = loop.create_future()
        waiting.append(waiter)
        if self.holding < self.slots or self.passing:
            self._hand_over()
        self._arm(loop)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed a slot as we were cancelled: pass it on
                self.leave(waiter.result())
            raise

    def leave(self, slot: _Slot) -> None:
        """Give `slot` up (again: nothing)."""
        if not slot.live:
            return
        slot.live = False
        self.holding -= 1
        holders = self._holders
        while holders and not holders[0].live:
            holders.popleft()
        if self._waiting:
            self._hand_over()

    def attempt_started(self, event: object) -> None:
        step_aside()

    def attempt_ended(self, event: object) -> None:
        pass

    def free(self) -> _Slot | None:
        """A slot at once when one is free and nobody waits (the usual case: no coroutine, no
        future), else None: then `enter`."""
        if self.holding < self.slots and not self._waiting:
            now = asyncio.get_running_loop().time()
            if now < self._window[0]:
                return self._give(now)
        return None

    def mark(self, slot: _Slot) -> contextvars.Token[tuple[BurstOrder, _Slot] | None]:
        """`slot` is the current request's (what `attempt_started` and `step_aside` give up)."""
        return _held.set((self, slot))

    def unmark(self, slot: _Slot, token: contextvars.Token[tuple[BurstOrder, _Slot] | None]) -> None:
        """The request is done: `mark` undone and its slot given up (if it still held it)."""
        _held.reset(token)
        self.leave(slot)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A slot for the current request's forward leg, given up on every way out (the HTTP
        door does the same inline: http.py)."""
        slot = self.free() or await self.enter()
        token = self.mark(slot)
        try:
            yield
        finally:
            self.unmark(slot, token)

    def _give(self, now: float) -> _Slot:
        slot = _Slot(now + self.hold_s)
        self.holding += 1
        self._holders.append(slot)
        return slot

    def _hand_over(self) -> None:
        now = asyncio.get_running_loop().time()
        waiting = self._waiting
        while waiting and (self.holding < self.slots or self.passing):
            waiter = waiting.popleft()
            if not waiter.done():  # (a cancelled waiter is skipped)
                waiter.set_result(self._give(now))

    def _sample(self, now: float) -> None:
        """Gate or not for the next window, from the loop thread's CPU share in the last one. A
        busy loop has a queue of work whatever the order, and serving a burst's requests a step at
        a time costs less CPU each (the same code runs warm for each): order only pays where the
        loop has time to spare (bench/overhead/README.md, Session 10)."""
        end, cpu_then = self._window
        cpu = time.thread_time()
        span = now - end + BUSY_WINDOW_S
        self.passing = end > 0 and now - end < BUSY_WINDOW_S and (cpu - cpu_then) >= self.busy_share * span
        self._window = (now + BUSY_WINDOW_S, cpu)
        if self.passing and self._waiting:
            self._hand_over()

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None and self._holders:
            self._timer = loop.call_at(self._holders[0].deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        holders = self._holders
        while holders and (not holders[0].live or holders[0].deadline <= now):
            slot = holders.popleft()
            if slot.live:
                slot.live = False
                self.holding -= 1
                self.taken_back += 1
        self._hand_over()
        while self._waiting and self._waiting[0].done():
            self._waiting.popleft()
        if self._waiting:
            self._arm(loop)

