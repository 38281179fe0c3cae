"""Agent process wiring: snapshot client, request path and the Gateway on one gRPC server.

Readiness goes through grpc.health.v1: NOT_SERVING until the first snapshot is applied, then
SERVING for good (a lost control plane does not make a serving agent unready).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.registry import Collector as PromCollector

from switchgear import __version__, reflection, rpc
from switchgear.adapters import builtin_adapters
from switchgear.dataplane import http as http_front_door
from switchgear.dataplane.attempts import Resilience, ResilienceSettings
from switchgear.dataplane.burst_order import BurstOrder
from switchgear.dataplane.cache import MemoryCache
from switchgear.dataplane.cache_shared import ResponseCache
from switchgear.dataplane.client import AGENT_TOKEN_ENV, Applier, SnapshotClient
from switchgear.dataplane.convert import MAX_JSON_DEPTH
from switchgear.dataplane.door_metrics import DEFAULT_MAX_ROUTES, DEFAULT_MAX_TENANTS, DoorMetrics, Edge
from switchgear.dataplane.events import AttemptObserver
from switchgear.dataplane.gateway import GatewayServicer
from switchgear.dataplane.http_door import DoorLimits, door_budget, raise_nofile_limit
from switchgear.dataplane.http_edge import observe
from switchgear.dataplane.invoke import Invoker
from switchgear.dataplane.managed.node import NodeManager, NodeResources, build_node_manager
from switchgear.dataplane.metrics import AgentMetrics, RedisMetrics, serve_metrics
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer, RedisCounters
from switchgear.dataplane.redis_round import RedisRound
from switchgear.dataplane.redis_state import RedisHealth, SharedRedis
from switchgear.dataplane.reporter import LoadAccumulator, ReportClient
from switchgear.dataplane.router import Router
from switchgear.dataplane.sched_slice import BusySlice
from switchgear.dataplane.scheduling.model import candidate_key
from switchgear.dataplane.scheduling.shift import reported_capacity
from switchgear.dataplane.scheduling.stats import LiveStats
from switchgear.dataplane.snapshot import AgentSnapshot, Holder
from switchgear.dataplane.stream import Streamer
from switchgear.dataplane.target_limits import TargetLimits
from switchgear.dataplane.tracing import GatewayInterceptor, Tracing
from switchgear.dataplane.tracing import observers as tracing_observers
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.dataplane.worker import TasksClient, TaskWorker, WorkerOptions
from switchgear.dataplane.worker_metrics import LoopTasks, serve_worker_metrics
from switchgear.rpc.options import grpcio_options
from switchgear.rpc.spread import Group
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
    grpc_limits: rpc.Limits = rpc.Limits()  # the gRPC port's bounds (docs/reference/limits.md)
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
    # Request metrics' label bounds (door_metrics.py): distinct tenants / routes before "other".
    metrics_max_tenants: int = DEFAULT_MAX_TENANTS
    metrics_max_routes: int = DEFAULT_MAX_ROUTES
    # Task worker (worker.py): capacity 0 = this agent runs no tasks.
    worker: WorkerOptions = WorkerOptions()
    # Governance and cache (pipeline.py): client keys required unless explicitly off; Redis
    # shares quota counters and cached responses between agents ("" = this agent only).
    auth_required: bool = True
    # TLS to the control plane (its CA; a client certificate for mutual TLS), and the agent
    # token every call to it carries (None: the client certificate is the credential).
    control_plane_tls: ClientTls | None = None
    control_plane_token: str | None = None
    snapshot_delivery: str = "delta"  # --snapshot-delivery: "delta" or "whole" (client.py DELIVERIES)
    redis_url: str = ""
    redis_probe_interval_s: float = 0.5  # while Redis is degraded, one probe (INFO cluster) per interval at most
    redis_write_behind_bytes: int = 4 << 20  # cache stores queued for Redis (redis_round.py); more are dropped
    sched_slice_us: int = 0  # the loop thread's slice while calls overlap (sched_slice.BusySlice); 0 = the kernel's
    burst_order: int = 0  # HTTP requests at once in their forward leg (burst_order.py); 0 = no gate
    cache_bytes: int = 64 * 1024 * 1024
    max_json_depth: int = MAX_JSON_DEPTH  # both doors refuse request JSON nested deeper (convert.py)
    # Breaker open time, ejection time and the other agent-side resilience tuning (attempts.py).
    resilience: ResilienceSettings = ResilienceSettings()
    # Managed replicas (managed/node.py): what this agent offers them (cpu 0 = it runs none).
    managed: NodeResources = NodeResources()
    managed_log_dir: str = ""
    managed_allow: tuple[str, ...] = ()  # programs it may run (empty: any the config names)
    managed_host: str = "127.0.0.1"  # what ${HOST} becomes (the address other agents reach replicas at)
    managed_docker: str = ""  # the Docker Engine API for backend: docker ("" = none)
    # Set for the processes of `--workers N` (workers.py): the gRPC and HTTP ports are bound with
    # SO_REUSEPORT (the kernel spreads new connections over the workers), and /metrics is served
    # to the supervisor on this Unix socket (in its private directory) instead of metrics_listen.
    reuse_port: bool = False
    metrics_socket: str = ""
    # And with `--worker-spread even`, where the workers meet to spread connections evenly (switchgear.rpc.spread).
    spread: Group | None = None


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


@dataclass(frozen=True)
class Announce:
    """Who is told each bound address once the process is up (None: nobody), in this order:
    the gRPC address, then the front door's, then /metrics'; and `serving` the snapshot
    version once the first snapshot is held (the agent answers calls from then on)."""

    ready: Callable[[str], None] | None = None
    http: Callable[[str], None] | None = None
    metrics: Callable[[str], None] | None = None
    serving: Callable[[str], None] | None = None


async def serve(
    options: Options,
    stop: asyncio.Event,
    on_ready: Callable[[str], None] | None = None,
    on_http_ready: Callable[[str], None] | None = None,
    on_metrics: Callable[[str], None] | None = None,
    on_serving: Callable[[str], None] | None = None,
) -> None:
    """Serve until `stop` is set. Once every port serves, `on_ready` gets the gRPC address, then
    `on_http_ready` the front door's (with `options.http_listen`), then `on_metrics` /metrics';
    `on_serving` gets the first snapshot's version once it is held."""
    await build_agent(options).run(stop, Announce(on_ready, on_http_ready, on_metrics, on_serving))


@dataclass(frozen=True)
class _Observed:
    """What watches the calls: load reports, metrics, tracing and the routers' live stats."""

    load: LoadAccumulator
    metrics: AgentMetrics
    tracing: Tracing | None
    live_stats: LiveStats
    door: DoorMetrics  # both doors' request families (door_metrics.py)
    edge: Edge
    busy_slice: BusySlice | None = None  # --sched-slice-us
    burst: BurstOrder | None = None  # --burst-order

    @property
    def observers(self) -> list[AttemptObserver]:
        busy = [self.busy_slice] if self.busy_slice is not None else []
        burst = [self.burst] if self.burst is not None else []
        return [self.load, self.metrics, self.door, *tracing_observers(self.tracing), self.live_stats, *busy, *burst]

    def cache_lookup(self, service: str, hit: bool) -> None:
        self.metrics.record_cache(service, hit)
        self.load.record_cache(service, hit)


def _observed(options: Options, holder: Holder, node_id: str) -> _Observed:
    tracing = Tracing.configure(
        holder, otlp_endpoint=options.otlp_endpoint, sample_ratio=options.trace_sample_ratio,
        exporter=options.span_exporter, node_id=node_id,
    )
    door = DoorMetrics(max_tenants=options.metrics_max_tenants, max_routes=options.metrics_max_routes)
    metrics = AgentMetrics(version=lambda: holder.version)
    edge = Edge(door, holder, metrics.record_overhead)
    load, live_stats = LoadAccumulator(), LiveStats()
    load.capacity = metrics.capacity = _capacity(holder, live_stats)
    busy = BusySlice(options.sched_slice_us) if options.sched_slice_us else None
    burst = BurstOrder(options.burst_order) if options.burst_order else None
    return _Observed(load, metrics, tracing, live_stats, door, edge, busy, burst)


def _capacity(holder: Holder, stats: LiveStats) -> Callable[[str, str], int]:
    """The load report's capacity of an endpoint: max_concurrency when the served snapshot sets
    it, else the capacity this agent learned (scheduling/shift.py), 0 when unknown."""
    indexed: list[Any] = [None, {}]  # (the snapshot, its {(service, endpoint): max_concurrency}), per snapshot

    def capacity(service: str, endpoint: str) -> int:
        if indexed[0] is not holder.current:
            current = holder.current
            indexed[:] = [current, {(s.name, e.id): e.max_concurrency for s in current.services.values()
                                    for e in s.endpoints} if current else {}]
        configured = indexed[1].get((service, endpoint), 0)
        return reported_capacity(configured, stats, candidate_key(service, endpoint))

    return capacity


class _Readiness:
    """After each applied snapshot: routing state kept for the endpoints that persist, the
    resilience settings applied, the agent SERVING (for good) and the pool trimmed."""

    def __init__(self, router: Router, resilience: Resilience, pool: ClientPool,
                 health_servicer: health.aio.HealthServicer) -> None:
        self._router, self._resilience, self._pool, self._health = router, resilience, pool, health_servicer
        self._background: set[asyncio.Task[None]] = set()
        self.on_serving: Callable[[str], None] | None = None  # told the first snapshot's version, once

    def applied(self, snapshot: AgentSnapshot) -> None:
        if self.on_serving is not None:
            on_serving, self.on_serving = self.on_serving, None
            on_serving(snapshot.version)
        self._router.retain(snapshot.services.values())  # stats of endpoints that persist are kept
        self._resilience.apply(snapshot)  # breakers, ejection, admission limits and queue bounds
        task = asyncio.ensure_future(_after_apply(snapshot, self._pool, self._health))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


@dataclass(frozen=True)
class Agent:
    """An agent built by `build_agent` and not started: its gRPC port is bound, nothing runs.
    `run` starts the parts in `_start`'s order and stops them in the reverse order."""

    options: Options
    core: _Core
    address: str  # the gRPC port's, bound
    redis: SharedRedis | None
    tasks_client: TasksClient
    invoker: Invoker
    streamer: Streamer
    pipeline: Pipeline
    client: SnapshotClient
    reporter: ReportClient
    worker: TaskWorker | None
    server: grpc.aio.Server
    nodes: NodeManager | None = None

    async def run(self, stop: asyncio.Event, announce: Announce = Announce()) -> None:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(log.info, "agent stopped")
            await self._start(stack, stop, announce)
            await stop.wait()

    async def _start(self, stack: contextlib.AsyncExitStack, stop: asyncio.Event, announce: Announce) -> None:
        if self.redis is not None:
            stack.push_async_callback(self.redis.aclose)
            stack.push_async_callback(self.pipeline.quotas.aclose)  # its last accounting, before the client closes
            await self.redis.check()  # a Redis Cluster node is refused before any request meets it
        stack.push_async_callback(self.core.pool.close)
        if self.core.observed.tracing is not None:
            stack.callback(self.core.observed.tracing.shutdown)  # after the doors: the last calls' spans go out
        await self._start_grpc(stack)
        http_address = await self._start_http(stack)
        metrics_address = self._start_metrics(stack)
        if self.options.metrics_socket:
            stack.push_async_callback(await serve_worker_metrics(self._metrics_collectors(),
                                                                 self.options.metrics_socket))
        stack.push_async_callback(self.tasks_client.close)
        if self.core.readiness is not None:  # set before the snapshot client runs: no first snapshot is missed
            self.core.readiness.on_serving = announce.serving
        if self.nodes is not None:
            stack.push_async_callback(self.nodes.close)  # after the reporter: its replicas go with the agent
        _run_until(stack, stop, self.client.run, self.reporter.run,
                   *((self.worker.run,) if self.worker is not None else ()))
        stack.push_async_callback(self.core.health.enter_graceful_shutdown)  # first thing on the way down
        stack.callback(stop.set)  # a start that failed part-way still ends the loops above
        # Everything built so far (modules, the snapshot, the request path) lives as long as the
        # process: out of the collector's way, a full collection scans only what calls allocate
        # instead of the whole start-up heap, which held 1 % of calls ~15 ms at c=16.
        gc.collect()
        gc.freeze()
        _announce(announce, self.address, http_address, metrics_address)

    async def _start_grpc(self, stack: contextlib.AsyncExitStack) -> None:
        for name in ("", GATEWAY):
            await self.core.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        stack.push_async_callback(self.server.stop, 1.0)
        log.info("agent %s listening on %s; control plane(s) %s", self.core.node.id, self.address,
                 ", ".join(self.options.control_planes))

    async def _start_http(self, stack: contextlib.AsyncExitStack) -> str | None:
        if not self.options.http_listen:
            return None
        tls = self.options.serve_tls
        runner, address = await http_front_door.start(
            self.core.holder, self.invoker, self.streamer, self.options.http_listen, self.pipeline,
            tls=tls.ssl_context(["http/1.1"]) if tls else None, limits=self.options.http_limits,
            observe=observe(self.core.observed.edge, self.core.observed.tracing), order=self.core.observed.burst,
            reuse_port=self.options.reuse_port, spread=self.options.spread)
        stack.push_async_callback(runner.cleanup)
        log.info("agent %s serving the OpenAI-compatible API on http://%s", self.core.node.id, address)
        return address

    def _metrics_collectors(self) -> tuple[PromCollector, ...]:
        cache = self.pipeline.cache
        rounds = cache.rounds if cache is not None else None
        redis_metrics = (RedisMetrics(self.redis.health, rounds),) if self.redis is not None else ()
        observed = self.core.observed
        return (observed.metrics, observed.door, *redis_metrics, LoopTasks(asyncio.get_running_loop()))

    def _start_metrics(self, stack: contextlib.AsyncExitStack) -> str | None:
        if not self.options.metrics_listen:
            return None
        first, *more = self._metrics_collectors()
        server, address = serve_metrics(first, self.options.metrics_listen, *more)
        stack.callback(server.shutdown)
        log.info("agent %s metrics on http://%s/metrics", self.core.node.id, address)
        return address


def _run_until(stack: contextlib.AsyncExitStack, stop: asyncio.Event,
               *loops: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Start each loop; on the way down each is awaited (after `stop`) in the reverse order."""
    for loop in loops:
        stack.push_async_callback(_awaited, asyncio.ensure_future(loop(stop)))


async def _awaited(task: asyncio.Future[None]) -> None:
    await task


def _announce(announce: Announce, address: str, http_address: str | None, metrics_address: str | None) -> None:
    for call, value in ((announce.ready, address), (announce.http, http_address), (announce.metrics, metrics_address)):
        if call is not None and value is not None:
            call(value)


def build_agent(options: Options) -> Agent:
    """Every part of an agent, each built after what it uses (call it on the event loop)."""
    raise_nofile_limit()  # soft to hard: both doors and the upstream pool share it (http_door.py)
    adapters = builtin_adapters()
    holder = Holder()
    node = discovery_pb2.Node(id=options.node_id or default_node_id(), zone=options.zone,
                              build_version=__version__, protocols=sorted(adapters))
    observed = _observed(options, holder, node.id)
    # Breakers, outlier ejection, retry budgets, admission and fallbacks (attempts.py): one per
    # agent, shared by unary and streamed calls; trips and queue lengths feed metrics and load reports.
    resilience = Resilience(options.resilience, sinks=(observed.metrics, observed.load), stats=observed.live_stats)
    observed.metrics.set_decisions(resilience.counters)
    router = Router(observed.live_stats, unavailable=resilience.gate.unavailable, holder=holder)
    pool, health_servicer = ClientPool(), health.aio.HealthServicer()
    readiness = _Readiness(router, resilience, pool, health_servicer)
    client = SnapshotClient(options.control_planes, node, holder, Applier(holder, adapters, readiness.applied),
                            tls=options.control_plane_tls, token=options.control_plane_token,
                            delivery=options.snapshot_delivery)
    return _build_calls(options, _Core(node, holder, observed, health_servicer, pool, client, router, resilience,
                                       readiness), adapters)


@dataclass(frozen=True)
class _Core:
    """What the request path is built on (build_agent), in the order it was built."""

    node: discovery_pb2.Node
    holder: Holder
    observed: _Observed
    health: health.aio.HealthServicer
    pool: ClientPool
    client: SnapshotClient
    router: Router
    resilience: Resilience
    readiness: _Readiness | None = None  # told each applied snapshot; says SERVING once


def _build_calls(options: Options, core: _Core, adapters: Any) -> Agent:
    """The request path (invoker, streamer, pipeline) and what serves or reports it."""
    observed, router, resilience, pool = core.observed, core.router, core.resilience, core.pool
    call_adapters = observed.tracing.wrap_adapters(adapters) if observed.tracing is not None else adapters
    secrets, limits = SecretResolver(), TargetLimits()  # one count of each target's rpm/tpm per agent
    # TasksService client (lazy): the task worker's, and `tasks_client.defer` for the document fallback.
    tasks_client = TasksClient(options.control_planes, options.control_plane_tls, options.control_plane_token)
    invoker = Invoker(call_adapters, pool, secrets, router, observers=observed.observers, resilience=resilience,
                      defer=tasks_client.defer, limits=limits)
    streamer = Streamer(call_adapters, pool, secrets, router.pick, observers=observed.observers,
                        resilience=resilience, limits=limits, defer=tasks_client.defer)
    pipeline, redis = _pipeline(options, invoker.invoke, observed.cache_lookup)
    if pipeline.cache is not None:
        cache_counters = pipeline.cache.local.counters
        observed.metrics.set_cache(lambda: cache_counters)
    nodes = build_node_manager(options.managed, options.managed_log_dir, options.managed_allow,
                               options.managed_host, options.managed_docker)
    reporter = _reporter(options, core, pipeline, nodes)
    worker = TaskWorker(tasks_client, core.node.id, core.holder, invoker, options.worker) \
        if options.worker.capacity else None
    server, address = _gateway_server(options, observed, core.health,
                                      GatewayServicer(core.holder, invoker, streamer, pipeline))
    return Agent(options, core, address, redis, tasks_client, invoker, streamer, pipeline, core.client, reporter,
                 worker, server, nodes)


def _reporter(options: Options, core: _Core, pipeline: Pipeline, nodes: NodeManager | None) -> ReportClient:
    holder = core.holder
    reporter = ReportClient(options.control_planes, core.node, core.observed.load, version=lambda: holder.version,
                            tenants=pipeline.quotas.drain_usage, restore=pipeline.quotas.restore_usage,
                            snapshots=core.client, nodes=nodes)
    reporter.tls, reporter.token = options.control_plane_tls, options.control_plane_token
    return reporter


def _gateway_server(options: Options, observed: _Observed, health_servicer: health.aio.HealthServicer,
                    gateway: GatewayServicer) -> tuple[grpc.aio.Server, str]:
    """The gRPC port with the Gateway, health and reflection on it, bound and not started."""
    server = _grpc_server(options.grpc_server,
                          (GatewayInterceptor(observed.tracing, None, observed.edge),),  # the edge meters overhead
                          options.grpc_limits, reuse_port=options.reuse_port, spread=options.spread)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable((GATEWAY, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    port = add_port(server, options.listen, options.serve_tls)
    return server, f"{options.listen.rsplit(':', 1)[0]}:{port}"


GRPC_SERVERS = ("switchgear", "grpcio")


def _grpc_server(kind: str, interceptors: Sequence[grpc.aio.ServerInterceptor], limits: rpc.Limits,
                 reuse_port: bool = False, spread: Group | None = None) -> grpc.aio.Server:
    # Connections to this port stay within the process's per-door fd budget (http_door.py), so
    # sockets held open against it cannot take the descriptors the HTTP door and the pool need.
    budget = door_budget(raise_nofile_limit())
    if kind == "switchgear":
        if limits.max_connections > budget:
            log.warning("--grpc-max-connections lowered to %d by the open-file limit", budget)
            limits = dataclasses.replace(limits, max_connections=budget)
        return rpc.Server(interceptors, limits=limits, reuse_port=reuse_port, spread=spread)
    if kind == "grpcio":
        return grpc.aio.server(interceptors=interceptors, options=(
            ("grpc.keepalive_permit_without_calls", 1), *grpcio_options(limits),
            # grpc core shares a port by default: only the workers of one agent may (a second
            # agent started on a taken port fails instead of silently getting half the calls).
            ("grpc.so_reuseport", int(reuse_port)),
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
        # No socket timeout: every command is bounded by its caller's timeout (SharedRedis.call, the
        # probe's own), and the library's per-read timer and per-write task cost more than the command.
        client = aioredis.from_url(options.redis_url, socket_timeout=None, socket_connect_timeout=0.5,
                                   retry=Retry(NoBackoff(), 1))
        redis = SharedRedis(client, RedisHealth(probe_interval_s=options.redis_probe_interval_s))
        # Generous bounds: a Redis answer slower than this is treated as Redis being down, and
        # the local fallback then admits on this agent's counts alone (inexact across agents).
        shared = RedisCounters(redis, LocalCounters(), timeout_s=0.5, rounds=RedisRound(
            redis, flush_timeout_s=0.5, max_store_bytes=options.redis_write_behind_bytes))
        counters: LocalCounters | RedisCounters = shared
        rounds: RedisRound | None = shared.rounds  # the cache's reads and stores ride on the quota's round trips
        log.info("quota counters and response cache shared through %s", options.redis_url.split("@")[-1])
    else:
        counters, rounds = LocalCounters(), None
    if not options.auth_required:
        log.warning("AUTH IS OFF (--auth none): every request is accepted as an anonymous user and no "
                    "quota applies. Local development only.")
    cache = ResponseCache(MemoryCache(options.cache_bytes), redis, timeout_s=0.2, rounds=rounds)
    pipeline = Pipeline(invoke, auth_required=options.auth_required, quotas=QuotaEnforcer(counters), cache=cache,
                        on_cache=on_cache, max_json_depth=options.max_json_depth)
    return pipeline, redis


async def _after_apply(snapshot: AgentSnapshot, pool: ClientPool, health_servicer: health.aio.HealthServicer) -> None:
    for name in ("", GATEWAY):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await pool.retain(snapshot)
