"""The container manager (the seed's Container Manager box): managed model servers as endpoints.

Agents are node managers. An agent started with `--managed-cpu N` offers that pool on its
load-report stream; this manager places each replica of every `managed:` service on an agent
where it fits (containers.place), and the load-report servicer sends each agent its own
assignment set. The agent runs them (dataplane/managed) and reports their state with every
report. Here, on every tick:

1. replicas are placed or withdrawn towards each service's desired count (min at first; the
   scaler moves it between min and max by utilisation; a changed `managed:` spec replaces them);
2. the registry's endpoints of each managed service follow its ready replicas: a replica becomes
   an endpoint (`replica-...`) only once its agent says it is
   ready, and stops being one as soon as it is not (crashed, restarting, failed, draining);
3. a replica being stopped is drained first: its endpoint leaves the snapshot, and its
   assignment is withdrawn (the agent stops it) only once every connected agent has applied a
   version without it and no call is in flight on it (or `drain_timeout` passed).

Scaling decisions, placements and withdrawals are audit rows (actor "containers"); endpoint
changes are registry versions with their own audit rows. Replica rows (state, node, restarts,
last log lines of a failed one) are `rows()`, shown by `switchgear admin replicas`.

With several control-plane replicas only a single process's manager is wired (the load-report
relay carries no assignments yet): docs/container-manager.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from switchgear.controlplane.agents import AgentTracker
from switchgear.controlplane.collector import Collector
from switchgear.controlplane.containers import Scaler, place, requirements, utilisation
from switchgear.controlplane.convert import duration
from switchgear.controlplane.model import MANAGED_ENDPOINT_PREFIX, EndpointSpec, ManagedSpec, ServiceSpec
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.snapshot import version_seq
from switchgear.controlplane.store import Change
from switchgear.controlplane.tasks.model import Resources
from switchgear.controlplane.validate import HEALTH_PATHS, ValidationError
from switchgear.v1 import loadreport_pb2
from switchgear.wire.reconnect import RECONNECT_MAX_S

log = logging.getLogger("switchgear.controlplane.containers")

#: Seconds after a restart during which replica endpoints the registry held are kept for their
#: agents to reconnect and report them (their reconnect backoff's cap), on top of two load-report
#: intervals.
RECONNECT_GRACE_S = RECONNECT_MAX_S

ACTOR = "containers"
DEFAULT_URL = "http://${HOST}:${PORT}/v1"
#: Bounds on what one agent's report may make this manager hold.
MAX_REPORTED = 256
MAX_LOG_LINES = 20
MAX_TEXT = 500


@dataclass
class Replica:
    """One replica as the control plane knows it."""

    id: str
    service: str
    node: str
    spec: ManagedSpec
    state: str = "assigned"  # until the agent first reports it
    url: str = ""
    restarts: int = 0
    last_log: tuple[str, ...] = ()
    message: str = ""
    draining_since: float | None = None
    drained_seq: int = 0  # the version that no longer serves it
    pid: int = 0


@dataclass
class _Node:
    pool: Resources
    generation: int = 0
    reported: bool = False  # its first report (what it runs already) was read: it may get more
    # Replicas withdrawn from this node that it still reports (it has not applied the new set
    # yet): never adopted back; forgotten once the node stops reporting them.
    withdrawn: set[str] = field(default_factory=set)


def assignment(replica: Replica) -> loadreport_pb2.ReplicaAssignment:
    """What the agent needs to run `replica`, and nothing else of the registry."""
    spec = replica.spec
    url = spec.url or DEFAULT_URL
    origin = "/".join(url.split("/", 3)[:3])  # scheme://host:port
    readiness = origin + spec.readiness_path if spec.readiness_path else url.rstrip("/") + HEALTH_PATHS["openai"]
    msg = loadreport_pb2.ReplicaAssignment(
        id=replica.id, service=replica.service, command=list(spec.command), env=dict(spec.env),
        inherit_env=list(spec.inherit_env), port=spec.port, url=url, readiness_url=readiness,
        readiness_timeout=duration(spec.readiness_timeout_s), restart_backoff=duration(spec.restart_backoff_s),
        restart_max_backoff=duration(spec.restart_max_backoff_s), max_crashes=spec.max_crashes,
        crash_window=duration(spec.crash_window_s), stop_grace=duration(spec.stop_grace_s),
        log_bytes=spec.log_bytes, backend=spec.backend, image=spec.image, volumes=list(spec.volumes))
    return msg


class ContainerManager:
    """Use from the event loop only (the load-report servicer and `run` call it there)."""

    def __init__(self, registry: Registry, tracker: AgentTracker, collector: Collector, *,
                 report_interval_s: Callable[[], float] = lambda: 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._tracker = tracker
        self._collector = collector
        self._interval = report_interval_s
        self._clock = clock
        self._nodes: dict[str, _Node] = {}
        self._replicas: dict[str, Replica] = {}
        self._desired: dict[str, int] = {}
        self._scalers: dict[str, Scaler] = {}
        self._started = clock()
        self._inherited: set[str] | None = None  # replica endpoints the registry held at start
        self._unplaced: dict[str, str] = {}
        self._wake = asyncio.Event()
        self.decisions: list[str] = []  # scaling decisions, newest last (bounded), for tests and the CLI

    # --- the agents' side (load-report stream) ------------------------------------------------

    def node_offered(self, node: str, offer: loadreport_pb2.NodeResources) -> None:
        memory = float(offer.memory_bytes) if offer.memory_bytes else float("inf")
        self._nodes[node] = _Node(Resources(cpu=offer.cpu, memory_bytes=memory, gpu=offer.gpu,
                                            disk_iops=float("inf"), network_mbps=float("inf")))
        log.info("agent %s offers managed replicas cpu=%g gpu=%g", node, offer.cpu, offer.gpu)
        self._wake.set()

    def node_gone(self, node: str) -> None:
        """The agent's stream ended: its replicas die with it (the agent stops them on its way down)."""
        if self._nodes.pop(node, None) is None:
            return
        for replica in [r for r in self._replicas.values() if r.node == node]:
            del self._replicas[replica.id]
            log.info("replica %s of %s lost with agent %s", replica.id, replica.service, node)
        self._wake.set()

    def node_report(self, node: str, statuses: Iterable[loadreport_pb2.ReplicaStatus]) -> None:
        changed = False
        reported = list(itertools.islice(statuses, MAX_REPORTED))
        slot = self._nodes.get(node)
        if slot is not None:
            slot.withdrawn &= {s.id for s in reported}
            slot.reported = True
        for status in reported:
            replica = self._replicas.get(status.id)
            if replica is None and slot is not None and status.id not in slot.withdrawn:
                replica = self._adopt(node, status)
            if replica is None or replica.node != node:
                continue  # not ours to take from this node
            before = (replica.state, replica.url)
            replica.state = status.state[:32]
            replica.url = status.url if _url_fits(replica.spec, status.url) else ""
            replica.restarts, replica.message, replica.pid = status.restarts, status.message[:MAX_TEXT], status.pid
            replica.last_log = tuple(line[:MAX_TEXT] for line in status.last_log[-MAX_LOG_LINES:])
            changed |= before != (replica.state, replica.url)
        if changed:
            self._wake.set()

    def _adopt(self, node: str, status: loadreport_pb2.ReplicaStatus) -> Replica | None:
        """A replica an agent runs that this manager does not know (it restarted): kept if its
        service is still managed and the agent offers replicas; the reconcile trims extras."""
        spec = self._registry.state.service(status.service)
        if spec is None or spec.managed is None or node not in self._nodes \
                or not status.id.startswith(MANAGED_ENDPOINT_PREFIX):
            return None
        replica = Replica(status.id[:64], spec.name, node, spec.managed)
        self._replicas[replica.id] = replica
        self._nodes[node].generation += 1
        log.info("adopted replica %s of %s on %s", replica.id, spec.name, node)
        return replica

    def assignments(self, node: str) -> tuple[int, list[loadreport_pb2.ReplicaAssignment]] | None:
        """(generation, this node's whole assignment set); None when the node offers nothing."""
        slot = self._nodes.get(node)
        if slot is None:
            return None
        mine = sorted((r for r in self._replicas.values() if r.node == node), key=lambda r: r.id)
        return slot.generation, [assignment(r) for r in mine]

    # --- views --------------------------------------------------------------------------------

    def rows(self) -> list[Replica]:
        return sorted(self._replicas.values(), key=lambda r: (r.service, r.id))

    def desired(self, service: str) -> int:
        return self._desired.get(service, 0)

    # --- the loop -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, tick_s: float = 0.25) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # one bad tick must not end the loop; the next one decides again
                log.exception("container manager tick failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_either(stop, self._wake), tick_s)

    async def tick(self) -> None:
        now = self._clock()
        state = self._registry.state
        managed = {s.name: s for s in state.services if s.managed is not None}
        for replica in list(self._replicas.values()):
            if replica.service not in managed and replica.draining_since is None:
                self._drain(replica, now, "its service is no longer managed")
        for spec in managed.values():
            await self._scale(spec, now)
            self._converge(spec, now)
            self._retire(spec, now)
        await self._sync_endpoints(now)
        await self._finish_drains(now)

    async def _scale(self, spec: ServiceSpec, now: float) -> None:
        assert spec.managed is not None
        m = spec.managed
        desired = min(max(self._desired.get(spec.name, m.min_replicas), m.min_replicas), m.max_replicas)
        ready = [r for r in self._active(spec.name) if r.state == "ready"]
        in_flight = sum(self._collector.sample((spec.name, r.id), 1.0, now)[3] for r in ready)
        util = utilisation(in_flight, len(ready), m.concurrency)
        step = self._scalers.setdefault(spec.name, Scaler()).decide(m, desired, util, now) if ready else 0
        if step:
            what = "scale_out" if step > 0 else "scale_in"
            detail = (f"utilisation {util:.2f} {'above' if step > 0 else 'below'} "
                      f"{m.scale_up_utilization if step > 0 else m.scale_down_utilization:g} for "
                      f"{m.scale_up_window_s if step > 0 else m.scale_down_window_s:g} s: replicas {desired} -> "
                      f"{desired + step}")
            self.decisions = [*self.decisions[-99:], f"{spec.name}: {what}: {detail}"]
            log.info("managed %s: %s: %s", spec.name, what, detail)
            await self._audit(Change(ACTOR, what, spec.name, detail))
            desired += step
        self._desired[spec.name] = desired

    def _active(self, service: str) -> list[Replica]:
        """The service's replicas of its current spec that are not draining."""
        spec = self._registry.state.service(service)
        current = spec.managed if spec is not None else None
        return [r for r in self._replicas.values()
                if r.service == service and r.draining_since is None and r.spec == current]

    def _retire(self, spec: ServiceSpec, now: float) -> None:
        """Replicas of an older spec (the config changed what to run) are drained once the
        current spec's desired replicas are ready: a rollout never leaves the route empty, and a
        new spec that never gets ready leaves the old replicas serving."""
        ready = sum(1 for r in self._active(spec.name) if r.state == "ready")
        if ready < self._desired[spec.name]:
            return
        for replica in self._replicas.values():
            if replica.service == spec.name and replica.spec != spec.managed and replica.draining_since is None:
                self._drain(replica, now, "replaced by a replica of the new spec")

    def _converge(self, spec: ServiceSpec, now: float) -> None:
        """Place missing replicas; drain extra ones (not-ready first, then by id)."""
        assert spec.managed is not None
        active = self._active(spec.name)
        desired = self._desired[spec.name]
        for _ in range(desired - len(active)):
            if not self._place(spec):
                break
        extra = len(active) - desired
        if extra > 0:
            order = sorted(active, key=lambda r: (r.state == "ready", r.id))
            for replica in order[:extra]:
                self._drain(replica, now, "scaled in")

    def _place(self, spec: ServiceSpec) -> bool:
        assert spec.managed is not None
        used: dict[str, Resources] = {}
        for r in self._replicas.values():
            used[r.node] = used.get(r.node, Resources()) + requirements(r.spec)
        pools = {n: s.pool for n, s in self._nodes.items() if s.reported}
        node = place(requirements(spec.managed), pools, used)
        if node is None:
            reason = "no agent offering managed replicas has the free resources" if self._nodes \
                else "no agent offers managed replicas (--managed-cpu)"
            if self._unplaced.get(spec.name) != reason:
                self._unplaced[spec.name] = reason
                log.warning("managed %s: a replica cannot be placed: %s", spec.name, reason)
            return False
        self._unplaced.pop(spec.name, None)
        replica = Replica(f"{MANAGED_ENDPOINT_PREFIX}{secrets.token_hex(4)}", spec.name, node, spec.managed)
        self._replicas[replica.id] = replica
        self._nodes[node].generation += 1
        log.info("managed %s: replica %s placed on %s", spec.name, replica.id, node)
        return True

    def _drain(self, replica: Replica, now: float, why: str) -> None:
        replica.draining_since = now
        log.info("replica %s of %s draining: %s", replica.id, replica.service, why)

    async def _sync_endpoints(self, now: float) -> None:
        """Each managed service's replica endpoints = its ready, not draining replicas."""
        state = self._registry.state
        for spec in state.services:
            if spec.managed is None and not any(e.id.startswith(MANAGED_ENDPOINT_PREFIX) for e in spec.endpoints):
                continue
            wanted = self._serving(spec, now)
            current = tuple(e for e in spec.endpoints if e.id.startswith(MANAGED_ENDPOINT_PREFIX))
            if current != wanted:
                try:
                    await self._set_endpoints(spec.name, wanted)
                except ValidationError as exc:  # one service's problem never blocks the others
                    log.warning("managed %s: replica endpoints refused: %s", spec.name, exc)
        seq = self._registry.snapshot.seq
        for replica in self._replicas.values():
            if replica.draining_since is not None and not replica.drained_seq:
                replica.drained_seq = seq

    def _serving(self, spec: ServiceSpec, now: float) -> tuple[EndpointSpec, ...]:
        ours = [r for r in self._replicas.values()
                if r.service == spec.name and r.draining_since is None and r.state == "ready" and r.url]
        known = {r.id for r in self._replicas.values()}
        if self._inherited is None:
            self._inherited = {e.id for s in self._registry.state.services for e in s.endpoints
                               if e.id.startswith(MANAGED_ENDPOINT_PREFIX)}
        grace = now - self._started < 2 * self._interval() + RECONNECT_GRACE_S
        # Right after a restart, the replica endpoints the registry held are kept a moment: their
        # agents reconnect and report them (adoption) before they are judged stale. An agent
        # that lost its control plane retries with a backoff of up to RECONNECT_MAX_S, so the
        # moment is that long: a shorter one withdrew a replica whose agent came back 3 s after the
        # restart, and re-added it on adoption (two versions for nothing).
        kept = [e for e in spec.endpoints if e.id in self._inherited and e.id not in known] if grace else []
        # No max_concurrency: `concurrency` is the scaling rule's denominator, not an admission cap.
        # A cap would keep a call whose replica just died from failing over to a busy peer (it
        # waits and retries the dead one instead); model servers queue what they cannot run yet.
        built = [EndpointSpec(r.id, r.url) for r in ours]
        return tuple(sorted([*built, *kept], key=lambda e: e.id))

    async def _set_endpoints(self, name: str, wanted: tuple[EndpointSpec, ...]) -> None:
        def change() -> None:
            state = self._registry.state
            spec = state.service(name)
            if spec is None:
                return
            before = {e.id for e in spec.endpoints if e.id.startswith(MANAGED_ENDPOINT_PREFIX)}
            after = {e.id for e in wanted}
            keep = tuple(e for e in spec.endpoints if not e.id.startswith(MANAGED_ENDPOINT_PREFIX))
            new = dataclasses.replace(spec, endpoints=(*keep, *wanted))
            services = tuple(new if s.name == name else s for s in state.services)
            detail = f"ready={sorted(after - before)} withdrawn={sorted(before - after)}"
            self._registry.change(dataclasses.replace(state, services=services),
                                  Change(ACTOR, "replica_endpoints", name, detail))

        await self._registry.retrying_async(change)

    async def _finish_drains(self, now: float) -> None:
        for replica in [r for r in self._replicas.values() if r.draining_since is not None]:
            assert replica.draining_since is not None
            timed_out = now - replica.draining_since >= replica.spec.drain_timeout_s
            if not (timed_out or self._drained(replica, now)):
                continue
            del self._replicas[replica.id]
            slot = self._nodes.get(replica.node)
            if slot is not None:
                slot.generation += 1
                slot.withdrawn.add(replica.id)
            how = "drain timed out" if timed_out and not self._drained(replica, now) else "drained"
            log.info("replica %s of %s %s; stopping it on %s", replica.id, replica.service, how, replica.node)
            detail = f"{replica.id} on {replica.node}: {how}"
            await self._audit(Change(ACTOR, "replica_stopped", replica.service, detail))

    def _drained(self, replica: Replica, now: float) -> bool:
        """Every connected agent applied a version without it, one report interval has passed
        since (their in-flight gauges are fresh), and none has a call in flight on it."""
        assert replica.draining_since is not None
        if not replica.drained_seq or self._registry.snapshot.seq < replica.drained_seq:
            return False
        if any(a.connected and version_seq(a.acked_version) < replica.drained_seq for a in self._tracker.list()):
            return False
        if now - replica.draining_since < self._interval() * 1.5:
            return False
        return self._collector.sample((replica.service, replica.id), 1.0, now)[3] == 0

    async def _audit(self, change: Change) -> None:
        await self._registry.call(lambda: self._registry.record(change))


def _url_fits(spec: ManagedSpec, url: str) -> bool:
    """`url` is the spec's URL with a host and a port filled in: an agent cannot point a route
    anywhere else."""
    host = r"(?:[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])"
    pattern = re.escape(spec.url or DEFAULT_URL).replace(re.escape("${PORT}"), "[0-9]{1,5}") \
        .replace(re.escape("${HOST}"), host)
    return len(url) <= MAX_TEXT and re.fullmatch(pattern, url) is not None


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    waits = {asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
