"""Single-flight: concurrent calls with one key share one execution.

A burst of identical cache misses makes one upstream call; every waiter gets its result (or
its exception). The key is forgotten as soon as the call finishes, so a later call runs anew.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from switchgear.dataplane.burst_order import step_aside

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[T]] = {}
        self.shared = 0  # calls answered by another call's execution

    async def do(self, key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Run `call` unless one with `key` is running; returns (result, shared?)."""
        running = self._inflight.get(key)
        if running is not None:
            self.shared += 1
            step_aside()  # (waiting on another request: a burst's next one may go first)
            try:
                return await asyncio.shield(running), True
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if running.cancelled() and task is not None and not task.cancelling():
                    return await self.do(key, call)  # the leader's caller went away, not ours
                raise
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await call()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            del self._inflight[key]
