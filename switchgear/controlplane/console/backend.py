"""What the console reads and changes, through this control plane's own gRPC API.

The console calls AdminService, GovernanceService and TasksService on its own control plane
(over a loopback channel, with the admin token), so every rule those services enforce —
validation, audit, replicas' routing to the leader, key secrets shown once — holds for the
console exactly as for the CLI, and nothing here reads the store itself.

`History` keeps the per-target time series the Routes page charts: one sample of GetStats every
`interval_s`, `span_s` worth of them per target (bounded by the registry's targets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from switchgear.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    governance_pb2,
    governance_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

log = logging.getLogger("switchgear.controlplane.console")

CALL_TIMEOUT_S = 5.0


class Backend:
    """Typed calls to this control plane's services. Errors are grpc.aio.AioRpcError."""

    def __init__(self, address: str, token: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self.governance = governance_pb2_grpc.GovernanceServiceStub(self._channel)
        self.tasks = tasks_pb2_grpc.TasksServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def agents(self) -> admin_pb2.ListAgentsResponse:
        reply: admin_pb2.ListAgentsResponse = await self.admin.ListAgents(
            admin_pb2.ListAgentsRequest(), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def stats(self) -> admin_pb2.GetStatsResponse:
        reply: admin_pb2.GetStatsResponse = await self.admin.GetStats(
            admin_pb2.GetStatsRequest(), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def services(self) -> admin_pb2.ListServicesResponse:
        reply: admin_pb2.ListServicesResponse = await self.admin.ListServices(
            admin_pb2.ListServicesRequest(), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def alerts(self, recovered: int = 20) -> admin_pb2.ListAlertsResponse:
        reply: admin_pb2.ListAlertsResponse = await self.admin.ListAlerts(
            admin_pb2.ListAlertsRequest(recovered_limit=recovered), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def apply(self, yaml: str, dry_run: bool) -> admin_pb2.ApplyConfigResponse:
        reply: admin_pb2.ApplyConfigResponse = await self.admin.ApplyConfig(
            admin_pb2.ApplyConfigRequest(yaml=yaml, source="<console>", dry_run=dry_run),
            metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def service(self, name: str) -> admin_pb2.GetServiceResponse:
        reply: admin_pb2.GetServiceResponse = await self.admin.GetService(
            admin_pb2.GetServiceRequest(name=name), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def audit(self, limit: int = 50) -> governance_pb2.ListAuditResponse:
        reply: governance_pb2.ListAuditResponse = await self.governance.ListAudit(
            governance_pb2.ListAuditRequest(limit=limit), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def tenants(self) -> governance_pb2.ListTenantsResponse:
        reply: governance_pb2.ListTenantsResponse = await self.governance.ListTenants(
            governance_pb2.ListTenantsRequest(), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def usage(self) -> governance_pb2.GetUsageResponse:
        reply: governance_pb2.GetUsageResponse = await self.governance.GetUsage(
            governance_pb2.GetUsageRequest(), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def keys(self) -> governance_pb2.ListKeysResponse:
        reply: governance_pb2.ListKeysResponse = await self.governance.ListKeys(
            governance_pb2.ListKeysRequest(), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def issue_key(self, tenant: str, description: str) -> governance_pb2.IssueKeyResponse:
        reply: governance_pb2.IssueKeyResponse = await self.governance.IssueKey(
            governance_pb2.IssueKeyRequest(tenant=tenant, description=description),
            metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def revoke_key(self, key_id: str) -> governance_pb2.RevokeKeyResponse:
        reply: governance_pb2.RevokeKeyResponse = await self.governance.RevokeKey(
            governance_pb2.RevokeKeyRequest(id=key_id), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def task_list(self, limit: int = 200) -> tasks_pb2.ListTasksResponse:
        reply: tasks_pb2.ListTasksResponse = await self.tasks.ListTasks(
            tasks_pb2.ListTasksRequest(limit=limit), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def task_stats(self) -> tasks_pb2.GetTaskStatsResponse:
        reply: tasks_pb2.GetTaskStatsResponse = await self.tasks.GetTaskStats(
            tasks_pb2.GetTaskStatsRequest(), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def task(self, task_id: str) -> tasks_pb2.GetTaskResponse:
        reply: tasks_pb2.GetTaskResponse = await self.tasks.GetTask(
            tasks_pb2.GetTaskRequest(id=task_id), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def cancel_task(self, task_id: str) -> tasks_pb2.CancelTaskResponse:
        reply: tasks_pb2.CancelTaskResponse = await self.tasks.CancelTask(
            tasks_pb2.CancelTaskRequest(id=task_id), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply

    async def replicas(self) -> admin_pb2.ListReplicasResponse:
        reply: admin_pb2.ListReplicasResponse = await self.admin.ListReplicas(
            admin_pb2.ListReplicasRequest(), metadata=self.md, timeout=CALL_TIMEOUT_S)
        return reply


@dataclass(frozen=True)
class Sample:
    at: float  # wall-clock seconds
    success_rate: float  # [0, 1]
    avg_ms: float
    p99_ms: float  # -1 when unknown
    cost_per_hour: float  # USD
    requests: int


class History:
    """Per (service, endpoint) samples over the last `span_s` seconds (at most span_s/interval_s each)."""

    def __init__(self, *, interval_s: float = 2.0, span_s: float = 900.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.interval_s = interval_s
        self.span_s = span_s
        self._clock = clock
        self._series: dict[tuple[str, str], deque[Sample]] = {}
        self._max_points = max(2, int(span_s / interval_s) + 1)

    def add(self, stats: admin_pb2.GetStatsResponse) -> None:
        now = self._clock()
        seen = set()
        for row in stats.stats:
            key = (row.service, row.endpoint)
            seen.add(key)
            series = self._series.setdefault(key, deque(maxlen=self._max_points))
            series.append(Sample(now, row.success_rate, row.avg_response_time_ms, row.p99_response_time_ms,
                                 row.cost_per_hour, row.request_count))
        cutoff = now - self.span_s
        for key in [k for k, s in self._series.items() if k not in seen and (not s or s[-1].at < cutoff)]:
            del self._series[key]  # a target gone from the registry for longer than the span

    def series(self, service: str, endpoint: str) -> list[Sample]:
        cutoff = self._clock() - self.span_s
        return [s for s in self._series.get((service, endpoint), ()) if s.at >= cutoff]

    async def run(self, backend: Backend, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.add(await backend.stats())
            except grpc.aio.AioRpcError as exc:
                log.debug("console history: GetStats failed: %s", exc.code().name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
