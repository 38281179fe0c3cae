"""Control-plane process wiring: store, registry, discovery and admin on one gRPC server
(switchgear.rpc by default, or grpc.aio: grpc_port.py).

Start-up config rule: `--config FILE` is applied when its content differs from the last file
applied at start-up (the store remembers its hash). Restarting with the same file therefore
keeps changes made through the Admin API since; editing the file and restarting applies it.
An invalid file never replaces a stored registry: with a non-empty store the control plane
logs the problems and serves what it has; with an empty store it refuses to start.

Replicas: with `store_url` (postgresql://...) any number of control planes share one database.
Each serves Admin, Governance, Discovery, load reports and TasksService; one leader (see
leader.py) runs the health monitor, folds every replica's load reports and dispatches tasks
(replicas.py forwards task calls to it). Without it, the SQLite file makes this process its
own leader, as before.

Threading: the event loop never waits on a store. Each store has one thread of its own that
runs its calls in order (offloop.Serial): the registry's store (commits, audit, usage), the
task store, and, with replicas, the coordination connection (relay, fleet view, leader lookup)
and the leader election's session (which the leader's task store and report drain share).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hmac
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psycopg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from switchgear import reflection, rpc
from switchgear.controlplane import codec, grpc_port, pg
from switchgear.controlplane.admin import AdminServicer, config_hash
from switchgear.controlplane.agent_auth import AgentAuthInterceptor, NodeSessions, is_loopback
from switchgear.controlplane.agent_check import agent_problems
from switchgear.controlplane.agents import AgentTracker
from switchgear.controlplane.auth import AdminTokenInterceptor, load_or_create_token
from switchgear.controlplane.collector import Collector
from switchgear.controlplane.config import ConfigError, load_config, read_config_file
from switchgear.controlplane.console import Console, ConsoleOptions, build_console
from switchgear.controlplane.container_manager import ContainerManager
from switchgear.controlplane.discovery import DiscoveryServicer, SnapshotFeed
from switchgear.controlplane.discovery import add_to_server as add_discovery_to_server
from switchgear.controlplane.governance import GovernanceServicer
from switchgear.controlplane.grpc_port import GRPC_LIMITS
from switchgear.controlplane.health import HealthParams
from switchgear.controlplane.leader import LeaderElection
from switchgear.controlplane.loadreport import LoadReportServicer
from switchgear.controlplane.metrics import ControlPlaneMetrics, serve_metrics
from switchgear.controlplane.monitor import Monitor
from switchgear.controlplane.offloop import Serial
from switchgear.controlplane.pg import PgStore
from switchgear.controlplane.probes import Prober
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.replicas import (
    AdminRouter,
    FleetView,
    LeaderLink,
    RegistryFollower,
    ReportRelay,
    StoreOutageInterceptor,
    TasksRouter,
)
from switchgear.controlplane.store import SqliteStore, Store
from switchgear.controlplane.tasks.scheduler import SchedulerOptions
from switchgear.controlplane.tasks.service import SERVICE_NAME as TASKS_SERVICE
from switchgear.controlplane.tasks.service import PurgeTally, TasksRuntime
from switchgear.controlplane.tasks.service import attach as attach_tasks
from switchgear.controlplane.tasks.store_pg import PgTaskStore
from switchgear.controlplane.usage import UsageBook, UsageDelta
from switchgear.controlplane.validate import ValidationError
from switchgear.tls import ClientTls, ServerTls, add_port
from switchgear.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    discovery_pb2,
    governance_pb2,
    governance_pb2_grpc,
    loadreport_pb2,
    loadreport_pb2_grpc,
    tasks_pb2_grpc,
)

log = logging.getLogger("switchgear.controlplane")


#: The cycle collector's young-generation threshold in a control-plane process (CPython's default
#: is 700). Each change to 10,000 agent streams allocates objects that live for the ~1-2 s of the
#: fan-out (pending writes, futures, requests); at 700 they were promoted to the old generations
#: and full collections over the ~1 M objects of the connected streams ran about once a second,
#: ~20 % of the control plane's CPU per change (bench/controlplane/README.md). At 50,000 they die
#: young; the cost is at most that many objects of cyclic garbage waiting for a collection.
GC_YOUNG_THRESHOLD = 50_000


def tune_collector() -> None:
    """For a control-plane process (the CLI calls it; not an in-process server of a test)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class StartupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Options:
    db_path: str
    listen: str = "127.0.0.1:50051"
    config_path: str | None = None
    # A change wakes every stream, which waits this long so a burst goes out as one version;
    # 10 ms coalesces an admin burst while keeping change -> fleet ACK well under 100 ms
    # (bench/controlplane). Health-driven changes are debounced by the monitor on top.
    debounce_s: float = 0.01
    # Health feedback loop and observability (see monitor.py, metrics.py, probes.py).
    metrics_listen: str = ""  # "host:port" for /metrics; "" = off
    monitoring_overrides: tuple[tuple[str, float], ...] = ()  # MonitoringSettings fields, e.g. report_interval_s
    health_blackout_s: float | None = None
    health_min_requests: int | None = None
    active_probes: bool = True
    monitor_tick_s: float | None = None  # None: half the report interval, within 0.1-1 s
    max_concurrent_pushes: int = 256
    delta_history: int = 64  # versions whose changes are kept for delta delivery (discovery.py)
    # Task scheduler (controlplane/tasks): lease TTL and aging interval, seconds.
    task_lease_ttl_s: float = 10.0
    task_aging_interval_s: float = 60.0
    # Operators' RPCs (Admin, Governance) need the admin token unless explicitly off. The
    # token comes from this file; when unset, "<db>.admin-token" (created on first start).
    admin_auth: bool = True
    admin_token_file: str | None = None
    # Agents' calls (snapshots, load reports, the task worker's calls) need the agent token from
    # this file (default "<db>.agent-token", created on first start) or, with tls.client_ca, a
    # client certificate. `agent_auth=False` is for loopback only unless `insecure_agents`.
    agent_auth: bool = True
    agent_token_file: str | None = None
    insecure_agents: bool = False
    tls: ServerTls | None = None
    # Replicas (see the module docstring): the shared database, the address other replicas
    # reach this one at (default: the bound listen address), a name for logs and the leader
    # row (default: host-pid), how often the election is tried and the lead checked, and the
    # TLS other replicas are called with when task calls are forwarded.
    store_url: str = ""
    advertise: str = ""
    replica_id: str = ""
    election_interval_s: float = 0.5
    peer_tls: ClientTls | None = None
    # The operator console (console/): off unless `console.listen` is set.
    console: ConsoleOptions = ConsoleOptions()
    # The gRPC port's server and, on switchgear.rpc, its bounds (grpc_port.py).
    grpc_server: str = "switchgear"
    grpc_limits: rpc.Limits = GRPC_LIMITS


def apply_startup_config(registry: Registry, path: str, env: Mapping[str, str]) -> None:
    try:
        text = read_config_file(path)
        state = load_config(text, source=path, env=env, check=agent_problems)
    except ConfigError as exc:
        _refuse(registry, path, exc)
        return
    # What the file means in this environment, not just its text: the same file with another
    # ${PORT} or ${URL} is a different config and is applied.
    digest = config_hash(text + "\0" + codec.canonical_hash(state))
    if digest == registry.config_hash:
        log.info("config %s unchanged since it was last applied; serving the stored registry", path)
        return
    try:
        snapshot, change = registry.replace(state, "controlplane", path, config_hash=digest, validated=True)
    except ValidationError as exc:
        _refuse(registry, path, exc)
        return
    # All zero when another replica applied the same file a moment before this one.
    log.info(
        "config %s: serving version %s (added %d, changed %d, removed %d)",
        path, snapshot.version, len(change.added), len(change.changed), len(change.removed),
    )


def _refuse(registry: Registry, path: str, exc: Exception) -> None:
    if not registry.state.services:
        raise StartupError(f"invalid config, and no stored registry to serve:\n{exc}") from exc
    log.error("invalid config %s ignored; serving the stored registry:\n%s", path, exc)


async def serve(
    options: Options,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    on_metrics: Callable[[str], None] | None = None,
    on_console: Callable[[str], None] | None = None,
) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT when `stop` is None).

    Once every port serves, `on_ready` receives the address actually listened on (the port is
    chosen when it is 0), then `on_metrics` the /metrics address when `metrics_listen` is set,
    then `on_console` the console's address when `console.listen` is set.
    """
    plane = build_control_plane(options)
    await plane.run(stop or _signal_event(), on_ready, on_metrics, on_console)


SERVICE_NAMES = (  # every service this server answers: health reports SERVING for each, and ""
    discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    loadreport_pb2.DESCRIPTOR.services_by_name["LoadReportingService"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.V1ALPHA,
    reflection.V1,
    TASKS_SERVICE,
    governance_pb2.DESCRIPTOR.services_by_name["GovernanceService"].full_name,
)


@dataclass(frozen=True)
class _Parts:
    """The registry and what feeds on it or reports to it, before any RPC is served."""

    store: Store
    shared: _Shared | None
    registry: Registry
    feed: SnapshotFeed
    tracker: AgentTracker
    probe_client: httpx.AsyncClient
    monitor: Monitor
    usage: _UsageHolder
    sessions: NodeSessions
    loadreports: LoadReportServicer
    containers: ContainerManager


def _parts(options: Options) -> _Parts:
    shared = _open_shared(options) if options.store_url else None
    store: Store = shared.store if shared else SqliteStore(options.db_path)
    registry = Registry(store)
    if options.config_path:
        apply_startup_config(registry, options.config_path, os.environ)
    feed = SnapshotFeed(registry.snapshot, options.delta_history)
    registry.subscribe(feed.publish)
    collector = Collector()
    probe_client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
    prober = Prober(probe_client, collector.last_success_at) if options.active_probes else None
    monitor = Monitor(registry, collector, prober=prober, params=_health_params(options),
                      overrides=dict(options.monitoring_overrides))
    usage, sessions, tracker = _UsageHolder(store, live=shared is None), NodeSessions(), AgentTracker()
    containers = ContainerManager(registry, tracker, collector,
                                  report_interval_s=lambda: monitor.settings.report_interval_s)
    loadreports = LoadReportServicer(collector, lambda: monitor.settings.report_interval_s,
                                     on_tenants=usage.add, relay=shared.relay if shared else None, sessions=sessions,
                                     containers=None if shared else containers)
    return _Parts(store, shared, registry, feed, tracker, probe_client, monitor, usage, sessions, loadreports,
                  containers)


@dataclass(frozen=True)
class ControlPlane:
    """A control plane built by `build_control_plane` and not started: its port is bound,
    nothing runs. `run` starts the parts in `_start`'s order and stops them in the reverse order."""

    options: Options
    parts: _Parts
    server: grpc.aio.Server
    address: str
    health: health.aio.HealthServicer
    tasks: TasksRuntime | None  # this process's task scheduler (without replicas)
    replica: _Replica | None
    console: Console | None = None

    async def run(self, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None,
                  on_metrics: Callable[[str], None] | None = None,
                  on_console: Callable[[str], None] | None = None) -> None:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(log.info, "control plane stopped")
            metrics_address = await self._start(stack)
            console_address = await self._start_console(stack)
            log.info("control plane listening on %s, serving version %s", self.address,
                     self.parts.registry.snapshot.version)
            _announce(on_ready, self.address)
            _announce(on_metrics, metrics_address)
            _announce(on_console, console_address)
            await stop.wait()

    async def _start_console(self, stack: contextlib.AsyncExitStack) -> str | None:
        if self.console is None:
            return None
        address = await self.console.start()
        stack.push_async_callback(self.console.close)  # before the gRPC server it calls stops
        log.info("console on http://%s/", address)
        return address

    async def _start(self, stack: contextlib.AsyncExitStack) -> str | None:
        self._close_stores(stack)
        stack.push_async_callback(self.parts.probe_client.aclose)
        if self.tasks is not None:
            stack.push_async_callback(self.tasks.close)
        await self.server.start()
        stack.push_async_callback(self.server.stop, 1.0)
        metrics_address = self._start_metrics(stack)
        self._start_background(stack)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        stack.push_async_callback(self.health.enter_graceful_shutdown)  # first thing on the way down
        return metrics_address

    def _close_stores(self, stack: contextlib.AsyncExitStack) -> None:
        store, shared = self.parts.store, self.parts.shared
        stack.callback(store.serial.close)
        if shared is not None:
            stack.push_async_callback(shared.close)
        stack.push_async_callback(store.serial.run, store.close)  # after every write still queued on it

    def _start_metrics(self, stack: contextlib.AsyncExitStack) -> str | None:
        if not self.options.metrics_listen:
            return None
        parts, replica = self.parts, self.replica
        prom = ControlPlaneMetrics(
            parts.monitor, seq=lambda: parts.registry.snapshot.seq,
            agents=lambda: sum(1 for a in parts.tracker.list() if a.connected),
            reports=lambda: parts.loadreports.reports,
            leader=(lambda: replica.election.epoch) if replica else (lambda: 1),
            purged=replica.purged.by_kind if replica else (self.tasks.tally.by_kind if self.tasks else dict),
        )
        server, address = serve_metrics(prom, self.options.metrics_listen)
        stack.callback(server.shutdown)
        log.info("metrics on http://%s/metrics", address)
        return address

    def _start_background(self, stack: contextlib.AsyncExitStack) -> None:
        """The replica's loops, or the task scheduler and the monitor; stopped before the server."""
        stop = asyncio.Event()
        if self.replica is not None:
            task = asyncio.ensure_future(self.replica.run(stop))
        else:
            assert self.tasks is not None
            self.tasks.start()
            task = asyncio.ensure_future(self.parts.monitor.run(stop, self.options.monitor_tick_s))
            stack.push_async_callback(_stopped, stop, asyncio.ensure_future(self.parts.containers.run(stop)))
        stack.push_async_callback(_stopped, stop, task)


async def _stopped(stop: asyncio.Event, task: asyncio.Future[None]) -> None:
    stop.set()
    await task


def _announce(call: Callable[[str], None] | None, address: str | None) -> None:
    if call is not None and address is not None:
        call(address)


def build_control_plane(options: Options) -> ControlPlane:
    """Every part of a control plane, each built after what it uses, and its port bound (call it
    on the event loop). StartupError for settings or a config it refuses."""
    _check_agent_auth(options)
    _check_console(options)
    try:
        grpc_port.check(options.grpc_server, options.grpc_limits)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    parts = _parts(options)
    server = grpc_port.server(options.grpc_server, options.grpc_limits, _interceptors(options, parts))
    governance_pb2_grpc.add_GovernanceServiceServicer_to_server(
        GovernanceServicer(parts.registry, parts.usage.book, usage_source=parts.usage.current), server)
    add_discovery_to_server(
        DiscoveryServicer(parts.feed, parts.tracker, debounce_s=options.debounce_s,
                          max_concurrent_pushes=options.max_concurrent_pushes, sessions=parts.sessions), server)
    loadreport_pb2_grpc.add_LoadReportingServiceServicer_to_server(parts.loadreports, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(SERVICE_NAMES, server)
    port = add_port(server, options.listen, options.tls)
    address = f"{options.listen.rsplit(':', 1)[0]}:{port}"
    tasks, replica = _serve_tasks_and_admin(options, parts, server, address)
    return ControlPlane(options, parts, server, address, health_servicer, tasks, replica,
                        _console(options, address))


def _check_console(options: Options) -> None:
    """Refuse console settings that would do nothing or expose it (before anything is opened)."""
    if not options.console.listen:
        if options.console != ConsoleOptions():
            raise StartupError("--console-* settings given without --console-listen: the console is off, so they "
                               "would do nothing")
        return
    if not options.admin_auth:
        raise StartupError("--console-listen needs admin authentication (--admin-auth token): the console "
                           "logs operators in with the admin token")
    if options.tls is not None:
        raise StartupError("--console-listen is not supported with --tls-cert yet: the console calls the "
                           "control plane's own port without TLS")
    if not is_loopback(options.console.listen) and not options.console.allow_remote:
        raise StartupError(f"--console-listen {options.console.listen} is not a loopback address and the console "
                           "speaks plain HTTP: the admin token and session cookie would cross the network in the "
                           "clear. Reach it through an SSH tunnel or a TLS proxy on this machine, or pass "
                           "--console-insecure-remote to accept that")


def _console(options: Options, address: str) -> Console | None:
    """The console, calling this control plane's own gRPC port with the admin token."""
    if not options.console.listen:
        return None
    tokens = {"admin": load_or_create_token(_admin_token_path(options))}
    if options.console.viewer_token_file:
        try:
            tokens["viewer"] = load_or_create_token(Path(options.console.viewer_token_file), "viewer")
        except (OSError, ValueError) as exc:
            raise StartupError(f"--console-viewer-token-file: {exc}") from None
        if hmac.compare_digest(tokens["viewer"].encode(), tokens["admin"].encode()):
            raise StartupError("the console's viewer token is the admin token: give viewers a token of their own")
    return build_console(options.console, address, tokens)


def _admin_token_path(options: Options) -> Path:
    return Path(options.admin_token_file or f"{options.db_path}.admin-token")


def _interceptors(options: Options, parts: _Parts) -> list[grpc.aio.ServerInterceptor]:
    interceptors: list[grpc.aio.ServerInterceptor] = []
    admin_token = ""
    if options.admin_auth:
        token_path = _admin_token_path(options)
        admin_token = load_or_create_token(token_path)
        registry = parts.registry
        interceptors.append(AdminTokenInterceptor(admin_token, state=lambda: registry.state))
        log.info("admin RPCs need the token in %s", token_path)
    else:
        log.warning("ADMIN AUTH IS OFF: anyone who reaches %s can change the registry (development only)",
                    options.listen)
    interceptors.extend(_agent_interceptors(options, admin_token))
    if parts.shared is not None:
        interceptors.append(StoreOutageInterceptor())
    return interceptors


def _serve_tasks_and_admin(options: Options, parts: _Parts, server: grpc.aio.Server, address: str
                           ) -> tuple[TasksRuntime | None, _Replica | None]:
    """TasksService and AdminService: served here without replicas, routed to the leader with them."""
    registry, shared = parts.registry, parts.shared
    scheduling = SchedulerOptions(lease_ttl_s=options.task_lease_ttl_s, aging_interval_s=options.task_aging_interval_s)
    if shared is None:
        tasks = attach_tasks(server, options.db_path, lambda: registry.state, scheduling)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(registry, parts.tracker, os.environ, monitor=parts.monitor, containers=parts.containers),
            server)
        return tasks, None
    replica_id = options.replica_id or f"{socket.gethostname()}-{os.getpid()}"
    advertised = options.advertise or address
    fleet = FleetView(shared.coord, replica_id, advertised, parts.tracker, serial=shared.coord_serial)
    admin = AdminServicer(registry, parts.tracker, os.environ, monitor=parts.monitor, fleet=fleet.agents_async)
    replica = _Replica(shared, options, replica_id, advertised, registry, parts.monitor, parts.loadreports,
                       parts.usage, scheduling, fleet)
    tasks_pb2_grpc.add_TasksServiceServicer_to_server(replica.tasks, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(replica.admin_router(admin), server)
    return None, replica


def _check_agent_auth(options: Options) -> None:
    """Refuse agent settings that would leave agents' calls open where others can reach them."""
    if options.insecure_agents and options.agent_auth:
        raise StartupError("--insecure-agents goes with --agent-auth none (agent authentication is on)")
    if not options.agent_auth and not is_loopback(options.listen) and not options.insecure_agents:
        raise StartupError(
            f"--agent-auth none on {options.listen}, which is not a loopback address: anyone who reaches it "
            "could lease and complete every tenant's tasks and feed false load reports. Keep agent "
            "authentication on (the agent token, or --tls-client-ca), or pass --insecure-agents to accept that")


def _agent_interceptors(options: Options, admin_token: str) -> list[grpc.aio.ServerInterceptor]:
    if not options.agent_auth:
        log.warning("AGENT AUTH IS OFF%s: anyone who reaches %s can subscribe to snapshots, report load and "
                    "lease, read and complete every tenant's tasks", " (--insecure-agents)"
                    if options.insecure_agents else " (loopback development only)", options.listen)
        return []
    token_path = Path(options.agent_token_file or f"{options.db_path}.agent-token")
    try:
        token = load_or_create_token(token_path, "agent")
    except (OSError, ValueError) as exc:
        raise StartupError(f"--agent-token-file: {exc}") from None
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        raise StartupError(f"the agent token in {token_path} is the admin token: give agents a token of their own")
    mtls = options.tls is not None and options.tls.client_ca is not None
    what = f"the agent token in {token_path}"
    log.info("agents' calls need %s", f"a client certificate from --tls-client-ca or {what}" if mtls else what)
    return [AgentAuthInterceptor(token, mtls=mtls)]


@dataclass
class _Shared:
    """A replica's database connections: the store's, and the one the relay, fleet view and
    leader lookups share (`coord`, on `coord_serial`), so none of them waits behind a commit
    that waits on a lock. Both reconnect after PostgreSQL restarts or fails over."""

    dsn: str
    conn: pg.Keeper  # the store's: used on store.serial only
    store: PgStore
    coord: pg.Keeper
    coord_serial: Serial
    relay: ReportRelay

    async def close(self) -> None:
        await self.store.serial.run(self.conn.close)
        await self.coord_serial.run(self.coord.close)
        self.coord_serial.close()


def _open_shared(options: Options) -> _Shared:
    if options.admin_auth and not options.admin_token_file:
        raise StartupError("--admin-token-file is required with a shared store: every replica must "
                           "accept the same admin token")
    if options.agent_auth and not options.agent_token_file:
        raise StartupError("--agent-token-file is required with a shared store: every replica must accept the "
                           "same agent token")
    keeper = pg.Keeper(options.store_url)
    try:
        pg.migrate(keeper())
    except psycopg.Error as exc:
        raise StartupError(f"cannot open the shared store {pg.describe(options.store_url)}: {exc}") from exc
    coord, coord_serial = pg.Keeper(options.store_url), Serial("coordination")
    return _Shared(options.store_url, keeper, PgStore(keeper), coord, coord_serial,
                   ReportRelay(coord, serial=coord_serial))


class _UsageHolder:
    """The tenants' usage book. The process that folds load reports (the leader, or the only
    control plane) keeps it live and saves it; any other replica reads the saved one.

    The book lives on the loop; the store is read and written on its thread. Saves are queued
    behind the store's other calls without waiting for them, and coalesce while one is queued
    (at most one row per tenant waits), so a slow store costs memory bounded by the tenants."""

    def __init__(self, store: Store, *, live: bool) -> None:
        self._store = store
        self.live = live  # replicas: set while this one leads
        self.book = _filled(store.load_usage())  # start-up: nothing else runs yet
        self._unsaved: dict[str, str] = {}
        self._lock = threading.Lock()  # _unsaved: filled on the loop, taken on the store's thread

    async def take_over(self) -> None:
        self.book = _filled(await self._store.serial.run(self._store.load_usage))
        self.live = True

    async def current(self) -> UsageBook:
        if self.live:
            return self.book
        return _filled(await self._store.serial.run(self._store.load_usage))

    def add(self, deltas: list[UsageDelta]) -> None:
        now = time.time()
        for delta in deltas:
            self.book.add(delta, now)
        rows = {d.tenant: self.book.dump(d.tenant) for d in deltas}
        with self._lock:
            queued = bool(self._unsaved)
            self._unsaved.update(rows)
        if not queued:
            self._store.serial.submit(self._save)

    def _save(self) -> None:
        with self._lock:
            rows, self._unsaved = self._unsaved, {}
        if rows:
            self._store.save_usage(rows)


def _filled(rows: dict[str, str]) -> UsageBook:
    book = UsageBook()
    for tenant, body in rows.items():
        book.load(tenant, body)
    return book


class _Replica:
    """One replica's part: follow the registry, relay reports, route task calls, and do the
    leader's work while elected."""

    def __init__(self, shared: _Shared, options: Options, replica_id: str, address: str, registry: Registry,
                 monitor: Monitor, loadreports: LoadReportServicer, usage: _UsageHolder, scheduling: SchedulerOptions,
                 fleet: FleetView) -> None:
        self._fleet = fleet
        self._shared = shared
        self._options = options
        self._registry = registry
        self._monitor = monitor
        self._loadreports = loadreports
        self._usage = usage
        self._scheduling = scheduling
        self.link = LeaderLink(shared.coord, address, options.peer_tls, serial=shared.coord_serial)
        self.tasks = TasksRouter(self.link)
        self._admin: AdminRouter | None = None
        self._admin_servicer: AdminServicer | None = None
        self.follower = RegistryFollower(shared.dsn, registry)
        self.election = LeaderElection(
            lambda: pg.connect(shared.dsn), replica_id, address,
            on_elected=self._elected, on_deposed=self._deposed, interval_s=options.election_interval_s)
        self._reign: list[asyncio.Future[None]] = []
        self._reign_stop = asyncio.Event()
        self._tasks: TasksRuntime | None = None
        self.purged = PurgeTally()  # over every reign of this replica

    def admin_router(self, servicer: AdminServicer) -> AdminRouter:
        self._admin, self._admin_servicer = AdminRouter(self.link, servicer), servicer
        return self._admin

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(self.follower.run(stop), self._shared.relay.run(stop), self.election.run(stop),
                             self._fleet.run(stop))
        await self.link.close()

    async def _elected(self, conn: psycopg.Connection, epoch: int) -> None:
        await self._registry.call(self._registry.refresh)
        await self._usage.take_over()
        # Writes through the lock's own session (if the lead is lost, so is the session), on
        # the election's thread, which is the one that session is used on.
        serial = self.election.serial
        self._tasks = await serial.run(lambda: TasksRuntime(PgTaskStore(conn, serial=serial),
                                                            lambda: self._registry.state, self._scheduling,
                                                            tally=self.purged))
        self._tasks.start()
        self.tasks.local = self._tasks.servicer
        if self._admin is not None:
            self._admin.local = self._admin_servicer
        resumed = self._monitor.resume_alerts(await self._registry.call(lambda: self._registry.audit(1000)))
        if resumed:
            log.info("took over %d firing alert(s) from the last leader", resumed)
        # Hold the overlay as published until every agent has reported a few times to us.
        self._monitor.hold(max(2.0, 3 * self._monitor.settings.report_interval_s))
        self._reign_stop = asyncio.Event()
        self._reign = [asyncio.ensure_future(self._monitor.run(self._reign_stop, self._options.monitor_tick_s)),
                       asyncio.ensure_future(self._fold_reports(conn, self._reign_stop))]

    async def _deposed(self) -> None:
        self.tasks.local = None
        if self._admin is not None:
            self._admin.local = None
        self._usage.live = False
        self._reign_stop.set()
        await asyncio.gather(*self._reign, return_exceptions=True)
        self._reign = []
        if self._tasks is not None:
            await self._tasks.close()
            self._tasks = None

    async def _fold_reports(self, conn: psycopg.Connection, stop: asyncio.Event) -> None:
        relay = self._shared.relay
        while not stop.is_set():
            try:
                for node, request in await self.election.serial.run(relay.drain, conn):
                    if request is None:
                        self._loadreports.apply_gone(node)
                    else:
                        self._loadreports.apply(node, request)
            except psycopg.Error as exc:  # the election notices a lost session; keep trying meanwhile
                log.warning("draining load reports failed: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=relay.flush_s)


def _health_params(options: Options) -> HealthParams:
    params = HealthParams()
    if options.health_blackout_s is not None:
        params = dataclasses.replace(params, blackout_s=options.health_blackout_s)
    if options.health_min_requests is not None:
        params = dataclasses.replace(params, min_requests=options.health_min_requests)
    return params


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
