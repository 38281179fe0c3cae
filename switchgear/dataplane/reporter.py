"""The agent's load reports (loadreport.proto): per-endpoint deltas, streamed every interval.

`LoadAccumulator` is an AttemptObserver: each attempt adds to the current interval's deltas
(O(1) dict updates on the event loop, no I/O). `ReportClient` keeps a stream open to a control
plane, takes the interval and histogram bounds it is told, and every interval swaps the
accumulator's deltas out and sends them (an empty report too: it says nothing is in flight).
Deltas of an interval whose send failed are lost, not resent: a report is a sample, and the
control plane's windows tolerate a gap better than a double count. In the agent, reports go
where its snapshot stream is, with the report token that stream was issued (the control plane
takes a node's reports only from the holder of its snapshot stream), and the agent credential.

Hooks for components other issues add (all O(1), call from the event loop):
`record_cache(service, hit)`, `record_breaker_trip(service, endpoint)`,
`set_queue_length(service, n)`. `capacity(service, endpoint)` (set by the agent) gives each
endpoint row's capacity gauge: max_concurrency when configured, else the learned one, 0 unknown.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from switchgear.dataplane.client import CHANNEL_OPTIONS, REPORT_TOKEN_HEADER, Backoff, SnapshotClient, bearer
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.managed.node import NodeManager
from switchgear.tls import ClientTls, aio_channel
from switchgear.v1 import discovery_pb2, loadreport_pb2, loadreport_pb2_grpc
from switchgear.wire.loadreport import row_to_proto
from switchgear.wire.stats import SUMS, LoadRow, typed_sums

log = logging.getLogger("switchgear.dataplane.reporter")

Key = tuple[str, str]


@dataclass
class _Delta:
    """One key's figures since the last drain: `sums` by LoadSums field (counts kept as floats,
    rounded back when drained), failures by kind, the latency histogram."""

    category: str = ""
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUMS, 0.0))
    failed: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=list)

    def add(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self.sums[name] += amount

    def row(self, key: Key, in_flight: int, queue_length: int, capacity: int = 0) -> LoadRow:
        return LoadRow(service=key[0], endpoint=key[1], category=self.category,
                       failed=tuple(sorted(self.failed.items())), latency_buckets=tuple(self.buckets),
                       in_flight=in_flight, queue_length=queue_length, capacity=capacity,
                       **typed_sums(self.sums))


class LoadAccumulator:

    after_answer = True  # counts only: a success reaches it after the answer (events.AttemptObserver)
    def __init__(self, bounds_s: Sequence[float] = ()) -> None:
        self._bounds = list(bounds_s)
        self._deltas: dict[Key, _Delta] = {}
        self._in_flight: dict[Key, int] = {}
        self._queue: dict[str, int] = {}
        self._categories: dict[Key, str] = {}
        self.capacity: Callable[[str, str], int] = lambda service, endpoint: 0

    def set_bounds(self, bounds_s: Sequence[float]) -> None:
        if list(bounds_s) != self._bounds:
            self._bounds = list(bounds_s)
            for d in self._deltas.values():
                d.buckets = []

    def _delta(self, key: Key, category: str = "") -> _Delta:
        d = self._deltas.get(key)
        if d is None:
            d = self._deltas[key] = _Delta(category or self._categories.get(key, ""))
        return d

    # AttemptObserver
    def attempt_started(self, event: AttemptStart) -> None:
        key = (event.service, event.endpoint)
        self._categories[key] = event.category
        sums = self._delta(key, event.category).sums  # per attempt: plain adds, no keyword dicts
        sums["issued"] += 1
        if event.attempt > 1:
            sums["failovers"] += 1
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def attempt_ended(self, event: AttemptEnd) -> None:
        key = (event.service, event.endpoint)
        d = self._delta(key, event.category)
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        if event.cancelled or (event.error is not None and event.error.caller_fault):
            # Abandoned (a lost hedge, a caller gone) or the caller's own mistake: counts nowhere
            # shared, not as issued, failed or latency (health scores, weights and alerts read these).
            d.sums["issued"] = max(0.0, d.sums["issued"] - 1)
            return
        sums, latency = d.sums, event.latency_s
        sums["latency_sum_s"] += latency
        sums["latency_count"] += 1
        if self._bounds:
            if not d.buckets:
                d.buckets = [0] * (len(self._bounds) + 1)
            d.buckets[bisect.bisect_left(self._bounds, latency)] += 1
        if event.error is None:
            sums["succeeded"] += 1
            sums["success_latency_sum_s"] += latency
            sums["success_latency_count"] += 1
            sums["input_tokens"] += event.usage.input_tokens
            sums["output_tokens"] += event.usage.output_tokens
            sums["cost_usd"] += event.cost_usd
        else:
            kind = event.error.value
            d.failed[kind] = d.failed.get(kind, 0) + 1
        if event.ttft_s is not None:
            sums["ttft_sum_s"] += event.ttft_s
            sums["ttft_count"] += 1

    # hooks for the cache, breaker and admission components
    def record_cache(self, service: str, hit: bool) -> None:
        self._delta((service, "")).add(cache_lookups=1, cache_hits=int(hit))

    def record_breaker_trip(self, service: str, endpoint: str) -> None:
        self._delta((service, endpoint)).add(breaker_trips=1)

    def set_queue_length(self, service: str, length: int) -> None:
        self._queue[service] = length

    def drain(self) -> list[loadreport_pb2.EndpointLoad]:
        """The deltas since the previous drain (and current gauges), as wire messages."""
        deltas, self._deltas = self._deltas, {}
        keys = set(deltas) | set(self._in_flight) | {(s, "") for s, n in self._queue.items() if n}
        loads = []
        for key in sorted(keys):
            d = deltas.get(key) or _Delta(self._categories.get(key, ""))
            queue = self._queue.get(key[0], 0) if not key[1] else 0
            capacity = self.capacity(*key) if key[1] else 0
            loads.append(row_to_proto(d.row(key, self._in_flight.get(key, 0), queue, capacity)))
        return loads


#: The least time between two reports when replica state changes bring one forward (seconds).
EARLY_REPORT_GAP_S = 0.05


class ReportClient:
    """Streams the accumulator's deltas to a control plane; reconnects like the snapshot client."""

    def __init__(
        self,
        addresses: Sequence[str],
        node: discovery_pb2.Node,
        accumulator: LoadAccumulator,
        *,
        version: Callable[[], str] = lambda: "",
        tenants: Callable[[], Mapping[str, Any]] = dict,
        restore: Callable[[Mapping[str, Any]], None] = lambda tallies: None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        snapshots: SnapshotClient | None = None,
        nodes: NodeManager | None = None,
    ) -> None:
        self._nodes = nodes  # runs the managed replicas the control plane assigns (managed/node.py)
        # With `snapshots`, reports follow the snapshot stream: to its control plane, with the
        # report token it was issued (the control plane takes a node's reports only so).
        self._snapshots = snapshots
        self._addresses = list(addresses)
        self._node = node
        self._acc = accumulator
        self._version = version
        self._tenants = tenants  # drains per-tenant usage tallies (quota.UsageTally)
        self._restore = restore  # gives back tallies a report could not carry (the next one will)
        self._backoff = backoff or Backoff()
        self._clock = clock
        self.interval_s = 10.0
        self.reports_sent = 0
        self.tls: ClientTls | None = None  # set by the agent when the control plane speaks TLS
        self.token: str | None = None  # the agent token, when the agent has one

    async def run(self, stop: asyncio.Event) -> None:
        turn = 0
        while not stop.is_set():
            target = await self._target(turn, stop)
            if target is not None:
                address, report_token = target
                try:
                    await self._session(address, report_token, stop)
                except grpc.aio.AioRpcError as exc:
                    log.info("load report stream to %s ended: %s %s", address, exc.code().name, exc.details())
            turn += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._backoff.next())

    async def _target(self, turn: int, stop: asyncio.Event) -> tuple[str, str] | None:
        """Where to report, and with which report token: the snapshot stream's, once it is open."""
        if self._snapshots is None:
            return self._addresses[turn % len(self._addresses)], ""
        waits = {asyncio.ensure_future(self._snapshots.connected.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        session = self._snapshots.session
        return None if session is None else (session.address, session.report_token)

    async def _session(self, address: str, report_token: str, stop: asyncio.Event) -> None:
        async with aio_channel(address, self.tls, CHANNEL_OPTIONS) as channel:
            metadata = (*bearer(self.token), *(((REPORT_TOKEN_HEADER, report_token),) if report_token else ()))
            call = loadreport_pb2_grpc.LoadReportingServiceStub(channel).StreamLoadStats(metadata=metadata)
            # The offer and what it runs already (a control plane that restarted adopts those
            # replicas before it places any: managed/node.py).
            await call.write(loadreport_pb2.StreamLoadStatsRequest(
                node=self._node, node_resources=self._nodes.offer() if self._nodes else None,
                replicas=self._nodes.statuses() if self._nodes else ()))
            first = await call.read()
            if first is grpc.aio.EOF:
                return
            self._configure(first)
            self._backoff.reset()
            self._acc.drain()  # what happened while disconnected is not attributed to this interval
            last = self._clock()
            reader = asyncio.ensure_future(self._read(call))
            try:
                while not stop.is_set() and not reader.done():
                    await self._pause(stop, last)
                    if reader.done():
                        break
                    now = self._clock()
                    tallies = self._tenants()
                    request = loadreport_pb2.StreamLoadStatsRequest(
                        endpoint_loads=self._acc.drain(), snapshot_version=self._version(),
                        tenant_loads=[
                            loadreport_pb2.TenantLoad(tenant=t, requests=u.requests, rejected=u.rejected,
                                                      tokens=u.tokens, cost_usd=u.cost_usd)
                            for t, u in tallies.items()
                        ],
                        replicas=self._nodes.statuses() if self._nodes else (),
                    )
                    request.load_report_interval.FromNanoseconds(round((now - last) * 1e9))
                    last = now
                    try:
                        await call.write(request)
                    except BaseException:
                        # Usage is what budgets and the usage API count: a report that did not
                        # go out gives its tallies back to go with the next session's first.
                        if tallies:
                            self._restore(tallies)
                        raise
                    self.reports_sent += 1
            finally:
                reader.cancel()
                call.cancel()

    async def _pause(self, stop: asyncio.Event, last: float) -> None:
        """Until the next report is due: the interval, or sooner when a managed replica changed
        state (its route should learn at once), but never within EARLY_REPORT_GAP_S of the last."""
        if self._nodes is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            return
        changed = self._nodes.changed
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(changed.wait())}
        try:
            await asyncio.wait(waits, timeout=self.interval_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        changed.clear()
        gap = EARLY_REPORT_GAP_S - (self._clock() - last)
        if gap > 0 and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=gap)

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            self._configure(response)
            if response.assignments_set and self._nodes is not None:
                await self._nodes.apply(response.assignments)

    def _configure(self, response: loadreport_pb2.StreamLoadStatsResponse) -> None:
        interval = response.load_reporting_interval.ToNanoseconds() / 1e9
        if interval > 0:
            self.interval_s = interval
        if response.latency_bucket_bounds_s:
            self._acc.set_bounds(response.latency_bucket_bounds_s)
