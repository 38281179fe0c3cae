"""Whether this agent can use Redis right now: one state for the quota counters and the cache.

Two modes. SHARED: quota and cache operations go to Redis, each bounded by its caller's
timeout. DEGRADED, entered on the first failure (an error or a timeout) of any Redis call:
operations do not go to Redis at all but answer locally at once, so once a dead or stopped
Redis has been noticed it costs requests nothing, not even the timeout. Meanwhile one probe at
a time, at most one per `probe_interval_s` and started by the calls that arrive (an idle agent
does not probe, and shows its last known mode), asks whether Redis answers again; the first
that does returns the agent to SHARED. A request therefore waits on Redis for at most one
timeout, and only while the outage is being discovered.

Recovery comes from the probe alone. Degraded calls never reach Redis, so a success seen while
DEGRADED is a call issued before the outage, and a failure of a call issued before the last
recovery is old news too: neither flips the mode, which keeps one warning line per outage and
one info line per recovery.

A Redis Cluster node is refused: a request's one script call touches keys (its tenant's
counters, its cache entry) that Cluster spreads over hash slots and will not take in one call.
The agent checks at start (`check`) and in every probe (`INFO cluster`), logs one error saying
so, and stays DEGRADED for as long as the node is one.

`RedisHealth` is the pure state machine (clock in, decisions out). `SharedRedis` is the edge
that wraps the client: every Redis call of the counters and the cache goes through `call`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from switchgear.dataplane.deadlines import Deadlines

log = logging.getLogger("switchgear.dataplane.redis")

T = TypeVar("T")

USES = ("quota", "cache")


class RedisHealth:
    """SHARED <-> DEGRADED, with per-use counts (`use` is "quota" or "cache").

    `failures[use]`: Redis calls that failed. `fallbacks[use]`: operations answered locally,
    failed or skipped while degraded. Use from the event loop; scrapes from another thread only
    read ints and a bool.
    """

    def __init__(self, *, probe_interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.probe_interval_s = probe_interval_s
        self._clock = clock
        self.degraded = False
        self.failures = dict.fromkeys(USES, 0)
        self.fallbacks = dict.fromkeys(USES, 0)
        self._since = clock()  # when the current mode began
        self._next_probe = 0.0

    def started(self) -> float | None:
        """Before a Redis call: its start time, or None when it must not be made (degraded)."""
        return None if self.degraded else self._clock()

    def failed(self, use: str, exc: BaseException, started: float) -> None:
        """A Redis call begun at `started` failed: enter DEGRADED unless it is old news."""
        self.failures[use] = self.failures.get(use, 0) + 1
        if self.degraded or started < self._since:
            return
        self.degraded = True
        self._since = self._clock()
        self._next_probe = self._since + self.probe_interval_s
        log.warning("redis unavailable (%s on %s); quotas use this agent's local counters and the cache its "
                    "memory only, probing every %g ms", type(exc).__name__, use,
                    self.probe_interval_s * 1e3)

    def fell_back(self, use: str) -> None:
        self.fallbacks[use] = self.fallbacks.get(use, 0) + 1

    def probe_due(self) -> bool:
        """While DEGRADED: True at most once per probe interval (the caller then probes)."""
        now = self._clock()
        if not self.degraded or now < self._next_probe:
            return False
        self._next_probe = now + self.probe_interval_s
        return True

    def probe_failed(self) -> None:
        """The interval restarts when the probe ends, so a slow probe is not followed at once by another."""
        self._next_probe = self._clock() + self.probe_interval_s

    def recovered(self) -> None:
        """A probe was answered: back to SHARED."""
        if not self.degraded:
            return
        now = self._clock()
        log.info("redis reachable again; shared quotas and cache resume (degraded for %.1f s)", now - self._since)
        self.degraded = False
        self._since = now


def bulk(value: bytes) -> bytes:
    """One RESP bulk string: how a command's every argument is sent (`packed`)."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def packed(count: int, body: bytes) -> bytes:
    """A command of `count` arguments whose bulk strings (`bulk`) are `body`, as the client's
    pack_command would send it (tests/test_redis_round.py compares the two)."""
    return b"*%d\r\n%b" % (count, body)


class LuaScript:
    """A server-side script called by its digest (EVALSHA), loaded again when Redis lacks it (a
    restarted Redis). Not redis-py's Script object: its per-call Protocol isinstance checks cost
    more than the call."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._head = bulk(b"EVALSHA") + bulk(self.sha.encode())

    async def run_packed(self, redis: SharedRedis, count: int, body: bytes) -> Any:
        """EVALSHA with its numkeys, keys and arguments already packed: `count` bulk strings in
        `body` (built once per plan where they repeat, redis_round.Gate: the client's packing
        costs ~0.6 us an argument)."""
        command = packed(count + 2, self._head + body)
        try:
            return await redis.execute_packed(command)
        except Exception as exc:
            from redis.exceptions import NoScriptError  # (only agents with Redis import it)

            if not isinstance(exc, NoScriptError):
                raise
            await redis.execute("SCRIPT", "LOAD", self.source)
            return await redis.execute_packed(command)


class RedisUnavailable(Exception):
    """Raised by `SharedRedis.call` instead of the Redis error: the caller answers locally."""


class RedisClusterNode(Exception):
    """The configured Redis is a Redis Cluster node (refused: SharedRedis._refuse_cluster)."""


class SharedRedis:
    """The agent's Redis client behind a `RedisHealth`: the one way the counters and the cache call it.

    `client` is a redis.asyncio client. Nothing but `RedisUnavailable` (and cancellation of the
    caller) leaves `call`; the probe task swallows everything it meets.
    """

    def __init__(self, client: Any, health: RedisHealth | None = None, *, probe_timeout_s: float = 0.25,
                 max_idle: int = 32) -> None:
        self.client = client
        self.health = health if health is not None else RedisHealth()
        self._probe_timeout_s = probe_timeout_s
        self.probing: asyncio.Task[None] | None = None  # the probe in flight (tests await it)
        self._idle: list[Any] = []  # connections of `execute`, at most `max_idle` kept between commands
        self._max_idle = max_idle
        self._closing: asyncio.Future[Any] | None = None  # the last surplus connection being closed
        self._deadlines = Deadlines()
        self.cluster_refused = False  # a Redis Cluster node was met (logged once)
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
        self.address = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"

    async def execute(self, *args: Any) -> Any:
        """One command on a connection of our own, made by the client's pool but not lent by it:
        the library's encoder and reply parser without the pool's per-command lock, readiness
        poll, retry wrapper and telemetry hooks (half the client's cost per command).
        Bound it by the caller's timeout (`call`): a connection interrupted mid-command (timeout,
        cancellation, error) is closed, never reused; one command at a time per connection.
        As the client's own retry did, a kept connection that turns out closed (a restarted
        Redis) is retried once on a new one, and the other kept connections are dropped."""
        return await self.execute_packed(None, args)

    async def execute_packed(self, command: bytes | None, args: tuple[Any, ...] = ()) -> Any:
        """`execute` of a command already packed (`packed`), or of `args` when it is None."""
        from redis.exceptions import ConnectionError as RedisConnectionError  # (only agents with Redis import it)

        if not self._idle:
            return await self._execute_on(self.client.connection_pool.make_connection(), command, args)
        try:
            return await self._execute_on(self._idle.pop(), command, args)
        except (RedisConnectionError, OSError):
            stale, self._idle = self._idle, []
            for conn in stale:
                await conn.disconnect(nowait=True)
            return await self._execute_on(self.client.connection_pool.make_connection(), command, args)

    async def _execute_on(self, conn: Any, command: bytes | None, args: tuple[Any, ...]) -> Any:
        from redis.exceptions import ResponseError

        try:
            if not conn.is_connected:
                await conn.connect()
            await conn.send_packed_command(conn.pack_command(*args) if command is None else command,
                                           check_health=False)
            reply = await conn.read_response()
        except ResponseError:  # an error reply (e.g. NOSCRIPT) was read whole: the connection is fine
            self._keep(conn)
            raise
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._keep(conn)
        return reply

    def _keep(self, conn: Any) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:  # more were in use at once than are kept: close this one (its socket, no reply awaited)
            self._closing = asyncio.ensure_future(conn.disconnect(nowait=True))

    async def call(self, use: str, op: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """`op()` bounded by `timeout_s`; RedisUnavailable if it fails or Redis is degraded."""
        started = self.health.started()
        if started is None:
            self.health.fell_back(use)
            self._probe_if_due()
            raise RedisUnavailable
        try:
            async with self._deadlines.within(timeout_s):  # (no task or timer per call)
                return await op()
        except Exception as exc:
            self.health.failed(use, exc, started)
            self.health.fell_back(use)
            raise RedisUnavailable from exc

    def skipped(self, use: str) -> bool:
        """True while degraded (counted as a fallback, a probe started when due): the caller
        answers locally instead of queueing work for Redis."""
        if not self.health.degraded:
            return False
        self.health.fell_back(use)
        self._probe_if_due()
        return True

    def _probe_if_due(self) -> None:
        if (self.probing is None or self.probing.done()) and self.health.probe_due():
            self.probing = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        cluster = await self._cluster_node()
        if cluster is None or cluster:
            self.health.probe_failed()
        else:
            self.health.recovered()

    async def check(self) -> None:
        """At start: a Redis Cluster node is refused (module docstring) before any request
        meets it; an unreachable Redis is left to the calls and the probe."""
        if await self._cluster_node():
            started = self.health.started()
            if started is not None:
                self.health.failed("quota", RedisClusterNode(), started)

    async def _cluster_node(self) -> bool | None:
        """Whether Redis answers as a Cluster node (refused, logged once); None: no answer."""
        try:
            info = await asyncio.wait_for(self.client.info("cluster"), self._probe_timeout_s)
        except Exception:
            return None
        cluster = isinstance(info, dict) and str(info.get("cluster_enabled", "0")) == "1"
        if cluster:
            self._refuse_cluster()
        return cluster

    def _refuse_cluster(self) -> None:
        if self.cluster_refused:
            return
        self.cluster_refused = True
        log.error("redis at %s is a Redis Cluster node, which agents do not support: a request's one "
                  "script call touches its tenant's counters and its cache entry, keys that Cluster "
                  "spreads over hash slots and refuses in one call. Quotas stay on this agent's "
                  "local counters and the cache in its memory; use a standalone Redis (or a "
                  "primary with replicas)", self.address)

    async def aclose(self) -> None:
        if self.probing is not None:
            self.probing.cancel()
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect(nowait=True)
        await self.client.aclose()
