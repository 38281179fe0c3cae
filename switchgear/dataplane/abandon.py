"""Attempts still waiting on a first token from an endpoint judged silent fail over at once.

When the routing statistics judge an endpoint silent (scheduling.stats.EndpointStats.silent:
its attempts since its last first token are jointly improbable under its own times to first
token), filters.not_silent holds new calls back — and, at the first such pick once it has also
completed no answer for QUIET_S, the attempts already waiting on it are abandoned here: each
ends as that endpoint's TIMEOUT ("judged silent, no first token in N s") and the call fails
over, instead of waiting out its first-token attempt timeout.

No task or timer per attempt: each waiting attempt is one entry in a per-endpoint dict (its
task and how many cancellations it had on entry); the judgement cancels the tasks, and each
block turns its own cancellation back into UpstreamError (TIMEOUT) with `Task.uncancel()` —
the same accounting as `asyncio.timeout` and deadlines.Deadlines, so a cancellation by anyone
else (the caller gone, a hedge lost, a deadline due) stays theirs.

The probe: an attempt started while its endpoint is judged silent is the one a second
not_silent lets through to see the endpoint answer again; it is not registered, and keeps its
normal first-token attempt timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from types import TracebackType

from switchgear.adapters.base import ErrorKind, UpstreamError

#: An endpoint judged silent has its waiting attempts abandoned only once it has also completed
#: no answer for this long: one whose slots are all taken by long answers sends no first token
#: for seconds, and is judged silent, yet still answers — a queue, whose waiting calls would only
#: pile onto the others, full too, if abandoned (bench/scheduling/README.md: an overload lost 4-7
#: points of success without this; with 0.5 s, none, and a hang is still left ~1.5 s sooner).
QUIET_S = 0.5


def quiet(last_answer_at: float | None, now: float) -> bool:
    """No answer completed in the last QUIET_S seconds (`last_answer_at`: LiveStats' last_sample_at)."""
    return last_answer_at is None or now - last_answer_at >= QUIET_S


class FirstTokenWaits:
    """The attempts waiting on a first token, by endpoint key ("service/endpoint")."""

    __slots__ = ("_by_key", "_clock", "_silenced")

    def __init__(self, silenced: Collection[str], clock: Callable[[], float]) -> None:
        self._by_key: dict[str, dict[FirstTokenWait, None]] = {}
        self._silenced = silenced  # keys judged silent now (LiveStats.silenced): their new attempts are probes
        self._clock = clock

    def waiting(self, key: str, endpoint: str) -> FirstTokenWait:
        """A block around an attempt's wait for its first token (left, or `answered()`, at it)."""
        return FirstTokenWait(self, key, endpoint, key in self._silenced)

    def waiting_on(self, key: str) -> bool:
        return key in self._by_key

    @property
    def count(self) -> int:
        return sum(len(waits) for waits in self._by_key.values())

    def abandon(self, key: str) -> int:
        """`key` was judged silent: its waiting attempts (not the caller's own task) end now as
        its TIMEOUT. How many were abandoned."""
        waits = self._by_key.pop(key, None)
        if not waits:
            return 0
        current = asyncio.current_task()
        abandoned = 0
        for wait in waits:
            if wait.task is current:  # (never cancel the judge itself; it is not waiting)
                continue
            wait.abandon()
            abandoned += 1
        return abandoned

    def _enter(self, wait: FirstTokenWait) -> None:
        waits = self._by_key.get(wait.key)
        if waits is None:
            waits = self._by_key[wait.key] = {}
        waits[wait] = None

    def _leave(self, wait: FirstTokenWait) -> None:
        waits = self._by_key.get(wait.key)
        if waits is not None:
            waits.pop(wait, None)
            if not waits:
                del self._by_key[wait.key]


class FirstTokenWait:
    """One attempt's wait for its first token (`FirstTokenWaits.waiting`); entered once."""

    __slots__ = ("_cancelling", "_registered", "_started", "_waits", "abandoned", "endpoint", "key", "probe", "task")

    def __init__(self, waits: FirstTokenWaits, key: str, endpoint: str, probe: bool) -> None:
        self._waits = waits
        self.key = key
        self.endpoint = endpoint
        self.probe = probe
        self.task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._started = 0.0
        self._registered = False
        self.abandoned = False

    async def __aenter__(self) -> FirstTokenWait:
        if not self.probe:
            task = asyncio.current_task()
            if task is not None:
                self.task = task
                self._cancelling = task.cancelling()
                self._started = self._waits._clock()
                self._waits._enter(self)
                self._registered = True
        return self

    def answered(self) -> None:
        """Its first token came: no longer abandoned with its endpoint."""
        if self._registered:
            self._registered = False
            self._waits._leave(self)

    def abandon(self) -> None:
        assert self.task is not None
        self._registered = False  # (FirstTokenWaits.abandon took it out)
        self.abandoned = True
        self.task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.answered()
        if not self.abandoned:
            return
        assert self.task is not None
        if self.task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            seconds = self._waits._clock() - self._started
            raise UpstreamError(ErrorKind.TIMEOUT, f"endpoint {self.endpoint}: judged silent, "
                                                   f"no first token in {seconds:.3g} s") from None


#: A wait that is never abandoned (stateless: may be entered by any number of attempts).
NO_WAIT = FirstTokenWait(FirstTokenWaits((), lambda: 0.0), "", "", probe=True)
