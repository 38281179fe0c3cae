"""Agent process wiring: snapshot client, request path and the Gateway on one gRPC server.

Readiness goes through grpc.health.v1: NOT_SERVING until the first snapshot is applied, then
SERVING for good (a lost control plane does not make a serving agent unready).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from switchgear import __version__, rpc
from switchgear.adapters import builtin_adapters
from switchgear.dataplane import http as http_front_door
from switchgear.dataplane.attempts import Resilience, ResilienceSettings
from switchgear.dataplane.cache import MemoryCache
from switchgear.dataplane.cache_shared import ResponseCache
from switchgear.dataplane.client import AGENT_TOKEN_ENV, Applier, SnapshotClient
from switchgear.dataplane.convert import MAX_JSON_DEPTH
from switchgear.dataplane.events import AttemptObserver
from switchgear.dataplane.gateway import GatewayServicer
from switchgear.dataplane.http_door import DoorLimits, door_budget, raise_nofile_limit
from switchgear.dataplane.invoke import Invoker
from switchgear.dataplane.metrics import AgentMetrics, RedisMetrics, serve_metrics
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer, RedisCounters
from switchgear.dataplane.redis_state import RedisHealth, SharedRedis
from switchgear.dataplane.reporter import LoadAccumulator, ReportClient
from switchgear.dataplane.router import Router
from switchgear.dataplane.scheduling.stats import LiveStats
from switchgear.dataplane.snapshot import AgentSnapshot, Holder
from switchgear.dataplane.stream import Streamer
from switchgear.dataplane.tracing import GatewayInterceptor, Tracing
from switchgear.dataplane.tracing import observers as tracing_observers
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.dataplane.worker import TasksClient, TaskWorker, WorkerOptions
from switchgear.rpc.options import grpcio_options
from switchgear.tls import ClientTls, ServerTls, add_port
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
    http_limits: DoorLimits = DoorLimits()  # its connection cap, timeouts and size limits (http_door.py)
    # The gRPC port's server: "switchgear" (switchgear.rpc, HTTP/2 on the event loop: ~4x less
    # CPU per call) or "grpcio" (grpc.aio; kept for A/B runs and as a fallback).
    grpc_server: str = "switchgear"
    grpc_limits: rpc.Limits = rpc.Limits()  # the gRPC port's bounds (README: Limits on the agent's gRPC port)
    # TLS on the application-facing ports (gRPC and the HTTP front door); with `client_ca`,
    # callers must present a certificate it signed. None = plaintext, as on loopback.
    serve_tls: ServerTls | None = None
    # Observability (metrics.py, tracing.py): /metrics address ("" = off); OTLP/HTTP traces
    # endpoint ("" = tracing off, nothing instrumented); ratio of new traces sampled;
    # `span_exporter` (an OpenTelemetry SpanExporter) is for in-process tests.
    metrics_listen: str = ""
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    span_exporter: Any = None
    # Task worker (worker.py): capacity 0 = this agent runs no tasks.
    worker: WorkerOptions = WorkerOptions()
    # Governance and cache (pipeline.py): client keys required unless explicitly off; Redis
    # shares quota counters and cached responses between agents ("" = this agent only).
    auth_required: bool = True
    # TLS to the control plane (its CA; a client certificate for mutual TLS), and the agent
    # token every call to it carries (None: the client certificate is the credential).
    control_plane_tls: ClientTls | None = None
    control_plane_token: str | None = None
    redis_url: str = ""
    redis_probe_interval_s: float = 0.5  # while Redis is degraded, one PING per interval at most
    cache_bytes: int = 64 * 1024 * 1024
    max_json_depth: int = MAX_JSON_DEPTH  # both doors refuse request JSON nested deeper (convert.py)
    # Breaker open time, ejection time and the other agent-side resilience tuning (attempts.py).
    resilience: ResilienceSettings = ResilienceSettings()


def agent_token(path: str | None, env: Mapping[str, str]) -> str | None:
    """The agent token: from `path` (--agent-token-file), else $SWITCHGEAR_AGENT_TOKEN; None
    without either. ValueError names the file when it cannot be read or is empty."""
    if path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"--agent-token-file {path}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"--agent-token-file {path} is empty")
        return token
    return env.get(AGENT_TOKEN_ENV, "").strip() or None


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
    raise_nofile_limit()  # soft to hard: both doors and the upstream pool share it (http_door.py)
    adapters = builtin_adapters()
    holder = Holder()
    pool = ClientPool()
    health_servicer = health.aio.HealthServicer()
    background: set[asyncio.Task[None]] = set()

    def applied(snapshot: AgentSnapshot) -> None:
        router.retain(snapshot.services.values())  # stats of endpoints that persist are kept
        resilience.apply(snapshot)  # breakers, ejection, admission limits and queue bounds
        task = asyncio.ensure_future(_after_apply(snapshot, pool, health_servicer))
        background.add(task)
        task.add_done_callback(background.discard)

    node = discovery_pb2.Node(
        id=options.node_id or default_node_id(), zone=options.zone,
        build_version=__version__, protocols=sorted(adapters),
    )
    client = SnapshotClient(options.control_planes, node, holder, Applier(holder, adapters, applied),
                            tls=options.control_plane_tls, token=options.control_plane_token)
    observers: list[AttemptObserver] = []  # live stats, load reports, metrics subscribe here
    load = LoadAccumulator()  # per-endpoint deltas for the load-report stream
    agent_metrics = AgentMetrics(version=lambda: holder.version)
    tracing = Tracing.configure(
        holder, otlp_endpoint=options.otlp_endpoint, sample_ratio=options.trace_sample_ratio,
        exporter=options.span_exporter, node_id=node.id,
    )
    observers.extend((load, agent_metrics, *tracing_observers(tracing)))
    call_adapters = tracing.wrap_adapters(adapters) if tracing is not None else adapters
    reporter = ReportClient(options.control_planes, node, load, version=lambda: holder.version,
                            tenants=lambda: pipeline.quotas.drain_usage(),
                            restore=lambda tallies: pipeline.quotas.restore_usage(tallies), snapshots=client)
    reporter.tls, reporter.token = options.control_plane_tls, options.control_plane_token
    live_stats = LiveStats()  # per-endpoint in-flight, peak-EWMA latency, success window
    observers.append(live_stats)
    # Breakers, outlier ejection, retry budgets, admission and fallbacks (attempts.py): one per
    # agent, shared by unary and streamed calls; trips and queue lengths feed metrics and load reports.
    resilience = Resilience(options.resilience, sinks=(agent_metrics, load), stats=live_stats)
    agent_metrics.set_decisions(resilience.counters)
    router = Router(live_stats, unavailable=resilience.gate.unavailable, holder=holder)
    secrets = SecretResolver()
    # TasksService client (lazy): the task worker's, and `tasks_client.defer` for the document fallback.
    tasks_client = TasksClient(options.control_planes, options.control_plane_tls, options.control_plane_token)
    invoker = Invoker(call_adapters, pool, secrets, router, observers=observers, resilience=resilience,
                      defer=tasks_client.defer)
    streamer = Streamer(call_adapters, pool, secrets, router.pick, observers=observers, resilience=resilience)

    def cache_lookup(service: str, hit: bool) -> None:
        agent_metrics.record_cache(service, hit)
        load.record_cache(service, hit)

    pipeline, redis = _pipeline(options, invoker.invoke, cache_lookup)
    if pipeline.cache is not None:
        cache_counters = pipeline.cache.local.counters
        agent_metrics.set_cache(lambda: cache_counters)

    server = _grpc_server(options.grpc_server, (GatewayInterceptor(tracing, agent_metrics.measure),),
                          options.grpc_limits)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(holder, invoker, streamer, pipeline), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (GATEWAY, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    for name in ("", GATEWAY):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = add_port(server, options.listen, options.serve_tls)
    await server.start()
    address = f"{options.listen.rsplit(':', 1)[0]}:{port}"
    log.info("agent %s listening on %s; control plane(s) %s", node.id, address, ", ".join(options.control_planes))
    if on_ready is not None:
        on_ready(address)
    http_runner = None
    if options.http_listen:
        http_runner, http_address = await http_front_door.start(
            holder, invoker, streamer, options.http_listen, pipeline,
            tls=options.serve_tls.ssl_context(["http/1.1"]) if options.serve_tls else None,
            limits=options.http_limits)
        log.info("agent %s serving the OpenAI-compatible API on http://%s", node.id, http_address)
        if on_http_ready is not None:
            on_http_ready(http_address)
    metrics_server = None
    if options.metrics_listen:
        redis_metrics = (RedisMetrics(redis.health),) if redis is not None else ()
        metrics_server, metrics_address = serve_metrics(agent_metrics, options.metrics_listen, *redis_metrics)
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
        if redis is not None:
            await redis.aclose()
        log.info("agent stopped")


GRPC_SERVERS = ("switchgear", "grpcio")


def _grpc_server(kind: str, interceptors: Sequence[grpc.aio.ServerInterceptor], limits: rpc.Limits
                 ) -> grpc.aio.Server:
    # Connections to this port stay within the process's per-door fd budget (http_door.py), so
    # sockets held open against it cannot take the descriptors the HTTP door and the pool need.
    budget = door_budget(raise_nofile_limit())
    if kind == "switchgear":
        if limits.max_connections > budget:
            log.warning("--grpc-max-connections lowered to %d by the open-file limit", budget)
            limits = dataclasses.replace(limits, max_connections=budget)
        return rpc.Server(interceptors, limits=limits)
    if kind == "grpcio":
        return grpc.aio.server(interceptors=interceptors, options=(
            ("grpc.keepalive_permit_without_calls", 1), *grpcio_options(limits),
            ("grpc.max_allowed_incoming_connections", budget)))
    raise ValueError(f"grpc_server: {kind!r} is not one of {', '.join(GRPC_SERVERS)}")


def _pipeline(options: Options, invoke: Any, on_cache: Callable[[str, bool], None]
              ) -> tuple[Pipeline, SharedRedis | None]:
    """Governance and cache around the invoke step, with Redis when configured."""
    redis = None
    if options.redis_url:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # One immediate retry (a pooled connection a restarted Redis has closed), no backoff: the
        # client's default retries for seconds, which would turn a refused connection into a full
        # timeout on every call; redis_state decides when to try again.
        client = aioredis.from_url(options.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                   retry=Retry(NoBackoff(), 1))
        redis = SharedRedis(client, RedisHealth(probe_interval_s=options.redis_probe_interval_s))
        # Generous bounds: a Redis answer slower than this is treated as Redis being down, and
        # the local fallback then admits on this agent's counts alone (inexact across agents).
        counters: LocalCounters | RedisCounters = RedisCounters(redis, LocalCounters(), timeout_s=0.5)
        log.info("quota counters and response cache shared through %s", options.redis_url.split("@")[-1])
    else:
        counters = LocalCounters()
    if not options.auth_required:
        log.warning("AUTH IS OFF (--auth none): every request is accepted as an anonymous user and no "
                    "quota applies. Local development only.")
    cache = ResponseCache(MemoryCache(options.cache_bytes), redis, timeout_s=0.2)
    pipeline = Pipeline(invoke, auth_required=options.auth_required, quotas=QuotaEnforcer(counters), cache=cache,
                        on_cache=on_cache, max_json_depth=options.max_json_depth)
    return pipeline, redis


async def _after_apply(snapshot: AgentSnapshot, pool: ClientPool, health_servicer: health.aio.HealthServicer) -> None:
    for name in ("", GATEWAY):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await pool.retain(snapshot)
