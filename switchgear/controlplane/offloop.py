"""Blocking store calls off the event loop, one writer per store, in order.

The control plane's event loop serves every agent's snapshot stream, load reports and task
calls; a store call that waits (a PostgreSQL row lock held by another replica's commit, a
slow disk, a database failing over) must never stall it. Each store, and each connection
shared by several users, therefore owns a `Serial`: one thread of its own that runs the calls
made on that connection one at a time, in the order they were submitted.

Why a thread per store and not psycopg's async driver: the SQLite default has no async driver
in the standard library (and one more dependency would buy nothing over a thread), the queries
are written once for both databases on the synchronous `sql.Db`, and the single thread gives
the three properties the store's users rely on for free —
- one writer: a connection is only ever used by one thread, so no statement of one caller can
  land inside another caller's transaction;
- order: calls run in submission order (the registry's versions `<seq>.<hash12>` are committed
  in the order they were decided; a usage book saved later is never overwritten by an earlier);
- decisions stay atomic: a caller that reads, decides and writes inside one submitted call
  (the registry's changes, the task scheduler's leases) sees no other call in between, as it
  did when everything ran on the loop.
A call whose awaiting coroutine is cancelled still runs to its end on the thread: a commit is
never cut in half, and what it publishes is published.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("switchgear.controlplane.offloop")


class Serial:
    """One thread that runs blocking calls one at a time, in submission order. Thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"store-{name}")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on this Serial's thread (with the caller's context variables);
        its result or exception, without blocking the loop."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def submit(self, fn: Callable[[], object]) -> Future[object]:
        """Queue `fn` behind every call submitted before it, without waiting for it (a failure
        is logged): for writes whose caller does not wait, such as saving soft state."""
        future = self._pool.submit(fn)
        future.add_done_callback(self._log_failure)
        return future

    def _log_failure(self, future: Future[object]) -> None:
        exc = future.exception()
        if exc is not None:
            log.warning("background store write on %s failed: %s: %s", self.name, type(exc).__name__, exc)

    def close(self) -> None:
        """Refuse new calls; those queued still run (the thread ends after them)."""
        self._pool.shutdown(wait=False)


def on_loop(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether the calling thread is the one running `loop` (None: there is no loop to hop to)."""
    if loop is None:
        return True
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def call_on(loop: asyncio.AbstractEventLoop | None, fn: Callable[P, object], *args: P.args, **kwargs: P.kwargs) -> None:
    """Run `fn` now when called on `loop`'s thread, else queue it there (in call order).
    Asyncio's objects (events, futures, queues) are only touched from their loop."""
    if on_loop(loop):
        fn(*args, **kwargs)
    elif loop is not None and not loop.is_closed():  # a closed loop: the process is stopping
        loop.call_soon_threadsafe(functools.partial(fn, *args, **kwargs))
