"""Agent process wiring: snapshot client, request path and the Gateway on one gRPC server.

Readiness goes through grpc.health.v1: NOT_SERVING until the first snapshot is applied, then
SERVING for good (a lost control plane does not make a serving agent unready).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from switchgear import __version__
from switchgear.adapters import builtin_adapters
from switchgear.dataplane.client import Applier, SnapshotClient
from switchgear.dataplane.events import AttemptObserver
from switchgear.dataplane import http as http_front_door
from switchgear.dataplane.gateway import GatewayServicer
from switchgear.dataplane.invoke import Invoker
from switchgear.dataplane.metrics import AgentMetrics, serve_metrics
from switchgear.dataplane.reporter import LoadAccumulator, ReportClient
from switchgear.dataplane.tracing import GatewayInterceptor, Tracing
from switchgear.dataplane.tracing import observers as tracing_observers
from switchgear.dataplane.router import Router
from switchgear.dataplane.scheduling.stats import LiveStats
from switchgear.dataplane.snapshot import AgentSnapshot, Holder
from switchgear.dataplane.stream import Streamer
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.dataplane.worker import TasksClient, TaskWorker, WorkerOptions
from switchgear.v1 import discovery_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("switchgear.dataplane")

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


@dataclass(frozen=True)
class Options:
    control_planes: Sequence[str]
    listen: str = "127.0.0.1:50061"
    node_id: str = ""
    zone: str = ""
    http_listen: str = ""  # the OpenAI-compatible front door ("" = off; port 0 picks one)
    # Observability (metrics.py, tracing.py): /metrics address ("" = off); OTLP/HTTP traces
    # endpoint ("" = tracing off, nothing instrumented); ratio of new traces sampled;
    # `span_exporter` (an OpenTelemetry SpanExporter) is for in-process tests.
    metrics_listen: str = ""
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    span_exporter: Any = None
    # Task worker (worker.py): capacity 0 = this agent runs no tasks.
    worker: WorkerOptions = WorkerOptions()


def default_node_id() -> str:
    return f"agent-{socket.gethostname()}-{os.getpid()}"


async def serve(
    options: Options,
    stop: asyncio.Event,
    on_ready: Callable[[str], None] | None = None,
    on_http_ready: Callable[[str], None] | None = None,
    on_metrics: Callable[[str], None] | None = None,
) -> None:
    """Serve until `stop` is set. `on_ready` gets the gRPC address once the port is bound, then
    `on_http_ready` the front door's address (when `options.http_listen` is set)."""
    adapters = builtin_adapters()
    holder = Holder()
    pool = ClientPool()
    health_servicer = health.aio.HealthServicer()
    background: set[asyncio.Task[None]] = set()

    def applied(snapshot: AgentSnapshot) -> None:
        router.retain(snapshot.services.values())  # stats of endpoints that persist are kept
        task = asyncio.ensure_future(_after_apply(snapshot, pool, health_servicer))
        background.add(task)
        task.add_done_callback(background.discard)

    node = discovery_pb2.Node(
        id=options.node_id or default_node_id(), zone=options.zone,
        build_version=__version__, protocols=sorted(adapters),
    )
    client = SnapshotClient(options.control_planes, node, holder, Applier(holder, adapters, applied))
    observers: list[AttemptObserver] = []  # live stats, load reports, metrics subscribe here
    load = LoadAccumulator()  # per-endpoint deltas for the load-report stream
    agent_metrics = AgentMetrics(version=lambda: holder.version)
    tracing = Tracing.configure(
        holder, otlp_endpoint=options.otlp_endpoint, sample_ratio=options.trace_sample_ratio,
        exporter=options.span_exporter, node_id=node.id,
    )
    observers.extend((load, agent_metrics, *tracing_observers(tracing)))
    call_adapters = tracing.wrap_adapters(adapters) if tracing is not None else adapters
    reporter = ReportClient(options.control_planes, node, load, version=lambda: holder.version)
    live_stats = LiveStats()  # per-endpoint in-flight, peak-EWMA latency, success window
    observers.append(live_stats)
    router = Router(live_stats, holder=holder)
    secrets = SecretResolver()
    # TasksService client (lazy): the task worker's, and `tasks_client.defer` for the document fallback.
    tasks_client = TasksClient(options.control_planes)
    invoker = Invoker(call_adapters, pool, secrets, router, observers=observers)
    streamer = Streamer(call_adapters, pool, secrets, router.pick, observers=observers)

    server = grpc.aio.server(
        interceptors=(GatewayInterceptor(tracing, agent_metrics.measure),),
        options=(("grpc.keepalive_permit_without_calls", 1),),
    )
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(holder, invoker, streamer), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (GATEWAY, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    for name in ("", GATEWAY):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(options.listen)
    await server.start()
    address = f"{options.listen.rsplit(':', 1)[0]}:{port}"
    log.info("agent %s listening on %s; control plane(s) %s", node.id, address, ", ".join(options.control_planes))
    if on_ready is not None:
        on_ready(address)
    http_runner = None
    if options.http_listen:
        http_runner, http_address = await http_front_door.start(holder, invoker, streamer, options.http_listen)
        log.info("agent %s serving the OpenAI-compatible API on http://%s", node.id, http_address)
        if on_http_ready is not None:
            on_http_ready(http_address)
    metrics_server = None
    if options.metrics_listen:
        metrics_server, metrics_address = serve_metrics(agent_metrics, options.metrics_listen)
        log.info("agent %s metrics on http://%s/metrics", node.id, metrics_address)
        if on_metrics is not None:
            on_metrics(metrics_address)
    subscription = asyncio.ensure_future(client.run(stop))
    reporting = asyncio.ensure_future(reporter.run(stop))
    worker = TaskWorker(tasks_client, node.id, holder, invoker, options.worker) if options.worker.capacity else None
    working = asyncio.ensure_future(worker.run(stop)) if worker is not None else None
    try:
        await stop.wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await reporting
        if working is not None:
            await working  # drains running tasks, gives the rest back
        await tasks_client.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        if tracing is not None:
            tracing.shutdown()
        if http_runner is not None:
            await http_runner.cleanup()
        await server.stop(grace=1.0)
        await subscription
        await pool.close()
        log.info("agent stopped")


async def _after_apply(snapshot: AgentSnapshot, pool: ClientPool, health_servicer: health.aio.HealthServicer) -> None:
    for name in ("", GATEWAY):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await pool.retain(snapshot)
