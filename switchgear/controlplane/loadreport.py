"""The load-reporting stream's control-plane end (loadreport.proto): agents' deltas -> Collector.

Thin: it tells each agent the interval and histogram bounds on connect (and a new interval,
after the agent's next report, when the config changes it), converts every report into
`LoadDelta`s and records them under the agent's node id; when the stream ends, the agent's
gauges are dropped.

A report stream for node X is taken only with the report token of a snapshot stream X holds
open on this control plane, and only while it does (agent_auth.NodeSessions): an agent cannot
report for another node, nor for one that is not connected.

With control-plane replicas, a `relay` takes the reports instead (every replica writes them to
the shared database) and the leader feeds them back through `apply` / `apply_gone`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import grpc

from switchgear.controlplane.agent_auth import NodeSessions, report_token
from switchgear.controlplane.collector import DEFAULT_LATENCY_BOUNDS_S, Collector
from switchgear.controlplane.container_manager import ContainerManager
from switchgear.controlplane.convert import duration
from switchgear.controlplane.usage import UsageDelta
from switchgear.v1 import loadreport_pb2, loadreport_pb2_grpc
from switchgear.wire.loadreport import row_from_proto

log = logging.getLogger("switchgear.controlplane.loadreport")


#: A report's row as the collector takes it (the wire's converter, shared with the agent).
delta_from_proto = row_from_proto


class Relay(Protocol):
    def record(self, node: str, request: loadreport_pb2.StreamLoadStatsRequest) -> None: ...

    def gone(self, node: str) -> None: ...


class LoadReportServicer(loadreport_pb2_grpc.LoadReportingServiceServicer):
    def __init__(
        self,
        collector: Collector,
        interval_s: Callable[[], float],
        *,
        bounds_s: Sequence[float] = DEFAULT_LATENCY_BOUNDS_S,
        clock: Callable[[], float] = time.monotonic,
        on_tenants: Callable[[list[UsageDelta]], None] = lambda deltas: None,
        relay: Relay | None = None,
        sessions: NodeSessions | None = None,
        containers: ContainerManager | None = None,
    ) -> None:
        self._containers = containers  # managed replicas: offers, states and assignments (container_manager.py)
        self._sessions = sessions  # None: reports are not bound to snapshot streams (unit tests)
        self._relay = relay
        self._on_tenants = on_tenants
        self._collector = collector
        self._interval_s = interval_s
        self._bounds = list(bounds_s)
        self._clock = clock
        self.reports = 0

    async def StreamLoadStats(  # noqa: N802 (generated name)
        self,
        request_iterator: AsyncIterator[loadreport_pb2.StreamLoadStatsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[loadreport_pb2.StreamLoadStatsResponse]:
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if not first.node.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node.id: required on the first request")
        node = first.node.id
        token = report_token(context.invocation_metadata())
        if not self._bound(node, token):
            log.warning("load reports for node %r refused from %s: no snapshot stream of that node here",
                        node, context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"node.id: load reports for {node!r} need the report token of that node's own "
                                "snapshot stream on this control plane")
        log.info("agent %s reports load", node)
        told = self._interval_s()
        if self._containers is not None and first.HasField("node_resources"):
            self._containers.node_offered(node, first.node_resources)
            self._containers.node_report(node, first.replicas)  # adopted before anything is placed
        yield loadreport_pb2.StreamLoadStatsResponse(
            load_reporting_interval=duration(told), latency_bucket_bounds_s=self._bounds
        )
        assigned = -1
        try:
            self._record(node, first)
            async for request in request_iterator:
                if not self._bound(node, token):
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"node.id: the snapshot stream of {node!r} ended; report again on its new one")
                self._record(node, request)
                response = loadreport_pb2.StreamLoadStatsResponse()
                if (wanted := self._interval_s()) != told:  # a config change: tell the agent at once
                    told = wanted
                    response.load_reporting_interval.CopyFrom(duration(told))
                assigned = self._assign(node, request, assigned, response)
                if response.ListFields():
                    yield response
        finally:
            if self._containers is not None:
                self._containers.node_gone(node)
            if self._relay is not None:
                self._relay.gone(node)
            else:
                self.apply_gone(node)

    def _assign(self, node: str, request: loadreport_pb2.StreamLoadStatsRequest, told: int,
                response: loadreport_pb2.StreamLoadStatsResponse) -> int:
        """Feed the node's replica states to the container manager; put its assignment set in
        `response` when it changed since `told` (a generation). Returns the generation sent."""
        if self._containers is None:
            return told
        self._containers.node_report(node, request.replicas)
        current = self._containers.assignments(node)
        if current is None or current[0] == told:
            return told
        response.assignments.extend(current[1])
        response.assignments_set = True
        return current[0]

    def _bound(self, node: str, token: str) -> bool:
        return self._sessions is None or self._sessions.valid(node, token)

    def _record(self, node: str, request: loadreport_pb2.StreamLoadStatsRequest) -> None:
        self.reports += 1
        if self._relay is not None:
            self._relay.record(node, request)
        else:
            self.apply(node, request)

    def apply_gone(self, node: str) -> None:
        self._collector.agent_gone(node)

    def apply(self, node: str, request: loadreport_pb2.StreamLoadStatsRequest) -> None:
        """Fold one report into the collector and the usage book (every report, empty ones
        too: an empty report says nothing is in flight any more)."""
        self._collector.record(node, [delta_from_proto(m) for m in request.endpoint_loads], self._clock())
        if request.tenant_loads:
            self._on_tenants([UsageDelta(t.tenant, t.requests, t.rejected, t.tokens, t.cost_usd)
                              for t in request.tenant_loads])
