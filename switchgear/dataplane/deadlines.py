"""Time limits on one shared timer: `async with deadlines.within(seconds):` as `asyncio.timeout`.

`asyncio.timeout` arms a loop timer when a block is entered and cancels it when the block ends:
on the request path (an attempt's time limit, a Redis round) that is a timer armed and dropped
per call, most of which never fire. Here every block of one `Deadlines` shares one timer, armed
at the earliest deadline of the blocks running (or earlier): entering a block whose deadline is
later than the armed one costs a dict insertion, leaving it a dict removal. When the timer fires
it cancels the blocks that are due and re-arms at the earliest deadline left, so no block runs
past its deadline by more than the loop's own timer lateness, as with `asyncio.timeout`.

A block that ran out raises TimeoutError in its task, with the same cancellation accounting as
`asyncio.timeout` (a cancellation of the task by someone else is not turned into a timeout).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    """The running blocks of one event loop and the timer that enforces their deadlines."""

    __slots__ = ("_at", "_due", "_loop", "_timer")

    def __init__(self) -> None:
        self._due: dict[_Within, float] = {}  # running block -> its deadline (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._at = 0.0  # when the timer fires (no later than the earliest deadline in _due)
        self._loop: asyncio.AbstractEventLoop | None = None  # the timer's loop

    def within(self, timeout_s: float) -> _Within:
        """A block that raises TimeoutError once `timeout_s` seconds have passed (as asyncio.timeout)."""
        return _Within(self, timeout_s)

    @property
    def running(self) -> int:
        """Blocks entered and not yet left."""
        return len(self._due)

    def _enter(self, block: _Within, when: float, loop: asyncio.AbstractEventLoop) -> None:
        self._due[block] = when
        if self._timer is None or when < self._at or loop is not self._loop:
            if self._timer is not None:
                self._timer.cancel()
            self._at, self._loop = when, loop
            self._timer = loop.call_at(when, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        due = [block for block, when in self._due.items() if when <= now]
        for block in due:
            del self._due[block]
            block.expire()
        if self._due:
            self._at = min(self._due.values())
            self._timer = loop.call_at(self._at, self._fire, loop)


class _Within:
    """One `Deadlines.within` block (entered once)."""

    __slots__ = ("_cancelling", "_deadlines", "_expired", "_task", "_timeout_s")

    def __init__(self, deadlines: Deadlines, timeout_s: float) -> None:
        self._deadlines = deadlines
        self._timeout_s = timeout_s
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False

    async def __aenter__(self) -> _Within:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline is kept inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        loop = asyncio.get_running_loop()
        self._deadlines._enter(self, loop.time() + self._timeout_s, loop)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._expired:
            self._deadlines._due.pop(self, None)
            return
        assert self._task is not None
        if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def expire(self) -> None:
        assert self._task is not None
        self._expired = True
        self._task.cancel()

    @property
    def expired(self) -> bool:
        return self._expired
