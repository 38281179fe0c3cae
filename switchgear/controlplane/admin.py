"""The Admin service: operators register services, apply configs and watch agents.

Thin: it converts, calls the registry, and maps failures to gRPC codes. A rejected change
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION) leaves the running state untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import NoReturn

import grpc

from switchgear.controlplane import convert
from switchgear.controlplane.agent_check import agent_problems
from switchgear.controlplane.agents import AgentStatus, AgentTracker
from switchgear.controlplane.alerts import Alert
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.container_manager import ContainerManager
from switchgear.controlplane.model import Category
from switchgear.controlplane.monitor import EndpointRow, Monitor
from switchgear.controlplane.registry import Contended, NotFound, Registry
from switchgear.controlplane.snapshot import diff
from switchgear.controlplane.validate import ValidationError
from switchgear.v1 import admin_pb2, admin_pb2_grpc


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


def _actor(context: grpc.aio.ServicerContext) -> str:
    return f"admin@{context.peer()}"


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self, registry: Registry, tracker: AgentTracker, env: Mapping[str, str], *, monitor: Monitor | None = None,
        fleet: Callable[[], Awaitable[list[AgentStatus]]] | None = None,
        containers: ContainerManager | None = None,
    ) -> None:
        self._containers = containers
        self._registry = registry
        self._tracker = tracker
        self._fleet = fleet or self._local_agents  # replicas: every replica's agents (read off the loop)
        self._env = env
        self._monitor = monitor

    async def _refused(self, context: grpc.aio.ServicerContext, operation: str, subject: str, message: str) -> None:
        """Audit a refused change; values from the environment configs interpolate are redacted."""
        await self._registry.record_refusal(_actor(context), operation, subject, message, tuple(self._env.values()))

    async def _local_agents(self) -> list[AgentStatus]:
        return self._tracker.list()

    async def GetStats(  # noqa: N802
        self, request: admin_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetStatsResponse:
        if self._monitor is None:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "this control plane runs no monitor")
        if request.service and self._registry.state.service(request.service) is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"service: no service named {request.service!r}")
        window = self._monitor.settings.alert_window_s
        return admin_pb2.GetStatsResponse(
            window=convert.duration(window),
            stats=[_stats_to_proto(row) for row in self._monitor.rows(window, request.service)],
            reporting_agents=self._monitor.reporting_agents(window),
            agents=[admin_pb2.AgentLoad(node_id=node, in_flight=flight, queue_length=queue,
                                        last_report=convert.timestamp(at))
                    for node, (flight, queue, at) in sorted(self._monitor.agent_loads().items())],
        )

    async def ListAlerts(  # noqa: N802
        self, request: admin_pb2.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAlertsResponse:
        if self._monitor is None:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "this control plane runs no monitor")
        evaluator = self._monitor.evaluator
        return admin_pb2.ListAlertsResponse(
            firing=[_alert_to_proto(a) for a in evaluator.firing()],
            recovered=[_alert_to_proto(a) for a in evaluator.recovered(request.recovered_limit)],
        )

    async def RegisterService(  # noqa: N802
        self, request: admin_pb2.RegisterServiceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RegisterServiceResponse:
        if not request.HasField("service"):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "service: required")
        try:
            spec = convert.service_from_proto(request.service)
            snapshot = await self._registry.retrying_async(lambda: self._registry.register_once(spec, _actor(context)))
        except (convert.ConvertError, ValidationError) as exc:
            message = _prefixed(exc, spec_name=request.service.name)
            await self._refused(context, "register_service", request.service.name, message)
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, message)
        except Contended as exc:
            await _abort(context, grpc.StatusCode.ABORTED, str(exc))
        stored = snapshot.state.service(spec.name)
        assert stored is not None
        return admin_pb2.RegisterServiceResponse(
            service=convert.service_to_proto(stored), version=snapshot.version
        )

    async def DeregisterService(  # noqa: N802
        self, request: admin_pb2.DeregisterServiceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeregisterServiceResponse:
        if not request.name:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "name: required")
        try:
            snapshot = await self._registry.retrying_async(
                lambda: self._registry.deregister_once(request.name, _actor(context)))
        except NotFound:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"name: no service named {request.name!r}")
        except ValidationError as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Contended as exc:
            await _abort(context, grpc.StatusCode.ABORTED, str(exc))
        return admin_pb2.DeregisterServiceResponse(version=snapshot.version)

    async def ListServices(  # noqa: N802
        self, request: admin_pb2.ListServicesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListServicesResponse:
        wanted: Category | None = None
        if request.category:
            try:
                wanted = convert.category_from_proto(request.category)
            except convert.ConvertError as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        specs = [s for s in self._registry.state.services if wanted is None or s.category == wanted]
        names = {s.name for s in specs}
        rejections = [
            admin_pb2.AgentRejection(
                node_id=a.node.id, version=a.acked_version, rejection=convert.rejection_to_proto(r))
            for a in await self._fleet() if a.connected for r in a.rejections if r.service in names
        ]
        return admin_pb2.ListServicesResponse(
            services=[convert.service_to_proto(s) for s in specs], rejections=rejections)

    async def GetService(  # noqa: N802
        self, request: admin_pb2.GetServiceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetServiceResponse:
        spec = self._registry.state.service(request.name)
        if spec is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"name: no service named {request.name!r}")
        return admin_pb2.GetServiceResponse(service=convert.service_to_proto(spec))

    async def ApplyConfig(  # noqa: N802
        self, request: admin_pb2.ApplyConfigRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ApplyConfigResponse:
        source = request.source or "<admin>"
        try:
            state = load_config(request.yaml, source=source, env=self._env, check=agent_problems)
            if request.dry_run:
                change = diff(self._registry.state, state)
                version = self._registry.snapshot.version
            else:
                snapshot, change = await self._registry.retrying_async(
                    lambda: self._registry.replace_once(state, _actor(context), source, validated=True))
                version = snapshot.version
        except (ConfigError, ValidationError) as exc:
            if not request.dry_run:
                await self._refused(context, "apply_config", source, str(exc))
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Contended as exc:
            await _abort(context, grpc.StatusCode.ABORTED, str(exc))
        return admin_pb2.ApplyConfigResponse(
            version=version, added=change.added, changed=change.changed, removed=change.removed
        )

    async def ListAgents(  # noqa: N802
        self, request: admin_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAgentsResponse:
        return admin_pb2.ListAgentsResponse(
            agents=[convert.agent_to_proto(a) for a in await self._fleet()],
            current_version=self._registry.snapshot.version,
        )

    async def ListReplicas(  # noqa: N802
        self, request: admin_pb2.ListReplicasRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListReplicasResponse:
        if self._containers is None:
            return admin_pb2.ListReplicasResponse()
        serving = {(s.name, e.id) for s in self._registry.state.services for e in s.endpoints}
        rows = [r for r in self._containers.rows() if not request.service or r.service == request.service]
        return admin_pb2.ListReplicasResponse(
            replicas=[admin_pb2.ManagedReplica(
                id=r.id, service=r.service, node=r.node, state=r.state, url=r.url, restarts=r.restarts,
                last_log=list(r.last_log), message=r.message, draining=r.draining_since is not None,
                serving=(r.service, r.id) in serving, pid=r.pid) for r in rows],
            decisions=self._containers.decisions)

    async def GetSnapshot(  # noqa: N802
        self, request: admin_pb2.GetSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetSnapshotResponse:
        return admin_pb2.GetSnapshotResponse(snapshot=convert.snapshot_to_proto(self._registry.snapshot))


def _prefixed(exc: Exception, spec_name: str) -> str:
    """Name wire paths from the request's root: "service.endpoints[0].url: ..."."""
    if isinstance(exc, ValidationError):
        lines = []
        for p in exc.problems:
            path = p.path.removeprefix(f"services[{spec_name}].")
            lines.append(f"service.{path}: {p.message}" if not path.startswith("services[") else f"{path}: {p.message}")
        return "; ".join(lines)
    return str(exc)


def _stats_to_proto(row: EndpointRow) -> admin_pb2.EndpointStats:
    st = row.stats
    p99, p50 = st.quantile_s(0.99), st.quantile_s(0.5)
    return admin_pb2.EndpointStats(
        service=row.service, endpoint=row.endpoint, category=row.category,
        request_count=st.issued, success_rate=st.success_rate, error_rate=st.error_rate,
        avg_response_time_ms=st.avg_latency_s * 1e3, p99_response_time_ms=p99 * 1e3 if p99 != float("inf") else -1.0,
        cost_per_hour=st.cost_per_hour, cache_hit_rate=st.cache_hit_rate,
        circuit_breaker_trips=st.breaker_trips, failover_count=st.failovers, queue_length=st.queue_length,
        resource_utilization=row.utilization or 0.0, capacity=row.capacity, in_flight=st.in_flight,
        health=convert.health_to_proto(row.health) if row.health else 0,  # type: ignore[arg-type]
        weight=row.weight, input_tokens=st.input_tokens, output_tokens=st.output_tokens, errors=dict(st.errors),
        p50_response_time_ms=p50 * 1e3 if p50 != float("inf") else -1.0,
    )


def _alert_to_proto(alert: Alert) -> admin_pb2.Alert:
    msg = admin_pb2.Alert(
        rule=alert.rule.name, service=alert.service, severity=alert.rule.severity,
        condition=alert.rule.condition, value=alert.value, action=alert.rule.action,
        action_detail=alert.action_detail, fired_at=convert.timestamp(alert.fired_at),
        fired_version=alert.fired_version, recovered_version=alert.recovered_version,
    )
    if alert.recovered_at is not None:
        msg.recovered_at.CopyFrom(convert.timestamp(alert.recovered_at))
    return msg
