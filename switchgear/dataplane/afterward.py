"""Work a request owes that need not delay its answer: run once the answer's last byte is written.

A request's bookkeeping after its upstream answered (the response cache's store, the quota
accounting of its tokens and cost, the door's metrics and access-log line) used to run before the
answer was written. A front door that writes its answers itself opens a `Later` per request
(`collect`); code on the request's path hands such work to `later(fn, *args)`, which queues it
there. After the write the door schedules `Later.run` with `loop.call_soon`: the answer leaves
first, and when several answers are ready at once (sixteen callers whose upstream calls end
together) every one of them is written before any of their bookkeeping runs.

Nothing a later request can see changes: a caller's next request is read from the socket only
after the callbacks already queued have run, so it finds the store and the accounting done, as
before. Only requests already in flight when the answer was written may run before it (one loop
pass), as they could run between any two awaits of the request before.

Without a `Later` (the gRPC door, streams, tests calling the pipeline directly), or once it has
run, `later` runs the work at once: exactly the old behaviour.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("switchgear.dataplane.afterward")

_CURRENT: contextvars.ContextVar[Later | None] = contextvars.ContextVar("switchgear_later", default=None)


class Later:
    """The work one request queued; `run` once (later calls of `later` then run at once)."""

    __slots__ = ("_work", "done")

    def __init__(self) -> None:
        self._work: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self.done = False

    def add(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        if self.done:
            fn(*args)
        else:
            self._work.append((fn, args))

    def run(self) -> None:
        """Each queued piece in the order queued; one that raises is logged and the rest still run."""
        self.done = True
        work, self._work = self._work, []
        for fn, args in work:
            try:
                fn(*args)
            except Exception:
                log.exception("work after an answer failed: %s", getattr(fn, "__qualname__", fn))


def collect() -> tuple[Later, contextvars.Token[Later | None]]:
    """A new Later for the current request (its context and the tasks it starts); give the token
    back with `stop` when the request's handler returned."""
    later_ = Later()
    return later_, _CURRENT.set(later_)


def stop(token: contextvars.Token[Later | None]) -> None:
    try:
        _CURRENT.reset(token)
    except ValueError:  # reset on another context (should not happen): the request is over anyway
        _CURRENT.set(None)


def later(fn: Callable[..., object], *args: Any) -> None:
    """`fn(*args)` after the current request's answer is written; now when nothing collects."""
    current = _CURRENT.get()
    if current is None:
        fn(*args)
    else:
        current.add(fn, args)
