"""The agent as a node manager: keeps the replicas the control plane assigned it running.

The control plane sends this agent's whole assignment set on the load-report stream
(loadreport.proto ReplicaAssignment; only this node's, never another's); `apply` starts what is
new and stops what was withdrawn (the control plane has drained it first). Every report carries
`statuses()`. When the agent stops, every replica it runs is stopped with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchgear.dataplane.managed.backend import Backend, ReplicaSpec, ReplicaStatus
from switchgear.dataplane.managed.process import ProcessBackend
from switchgear.v1 import loadreport_pb2

log = logging.getLogger("switchgear.dataplane.managed")

#: Bounds on what one assignment message may make this agent run (the control plane is trusted,
#: but a bug there must not fork-bomb the host).
MAX_ASSIGNMENTS = 64


@dataclass(frozen=True)
class NodeResources:
    """What this agent offers managed replicas (`--managed-cpu` etc.); cpu 0 = it runs none."""

    cpu: float = 0.0
    memory_bytes: int = 0  # 0 = not limited
    gpu: float = 0.0


def spec_from_proto(msg: loadreport_pb2.ReplicaAssignment) -> ReplicaSpec:
    def seconds(field: str, default: float) -> float:
        return msg.__getattribute__(field).ToNanoseconds() / 1e9 if msg.HasField(field) else default

    return ReplicaSpec(
        id=msg.id, service=msg.service, command=tuple(msg.command), env=tuple(sorted(msg.env.items())),
        inherit_env=tuple(msg.inherit_env), port=msg.port, url=msg.url, readiness_url=msg.readiness_url,
        readiness_timeout_s=seconds("readiness_timeout", 60.0), restart_backoff_s=seconds("restart_backoff", 1.0),
        restart_max_backoff_s=seconds("restart_max_backoff", 30.0), max_crashes=msg.max_crashes or 5,
        crash_window_s=seconds("crash_window", 300.0), stop_grace_s=seconds("stop_grace", 10.0),
        log_bytes=msg.log_bytes or 1024 * 1024, backend=msg.backend or "process", image=msg.image,
        volumes=tuple(msg.volumes),
    )


def status_to_proto(status: ReplicaStatus) -> loadreport_pb2.ReplicaStatus:
    return loadreport_pb2.ReplicaStatus(
        id=status.id, service=status.service, state=status.state.value, url=status.url, restarts=status.restarts,
        last_log=list(status.last_log), message=status.message, pid=status.pid)


class NodeManager:
    """`allowed`: the programs this agent may run (`--managed-allow`); empty = any the control
    plane names (its config, changed with the admin token, decides what runs on this host)."""

    def __init__(self, resources: NodeResources, backend: Backend, allowed: Sequence[str] = (),
                 host: str = "127.0.0.1", *, others: Mapping[str, Backend] | None = None) -> None:
        self.resources = resources
        self.host = host
        self.backends = {"process": backend, **(others or {})}  # by the assignment's `backend`
        self.allowed = frozenset(allowed)
        self._refused: dict[str, str] = {}
        self._specs: dict[str, ReplicaSpec] = {}
        self.changed = asyncio.Event()  # a replica changed state: worth a report now
        for each in self.backends.values():
            each.on_change = self.changed.set
        self._lock = asyncio.Lock()

    def offer(self) -> loadreport_pb2.NodeResources | None:
        if self.resources.cpu <= 0:
            return None
        r = self.resources
        return loadreport_pb2.NodeResources(cpu=r.cpu, memory_bytes=r.memory_bytes, gpu=r.gpu)

    async def apply(self, assignments: Sequence[loadreport_pb2.ReplicaAssignment]) -> None:
        """Run exactly these replicas (the first MAX_ASSIGNMENTS; backends this agent lacks are
        reported failed rather than started)."""
        if self.resources.cpu <= 0:
            return
        wanted = {msg.id: dataclasses.replace(spec_from_proto(msg), host=self.host)
                  for msg in list(assignments)[:MAX_ASSIGNMENTS] if msg.id}
        async with self._lock:
            for replica_id in [i for i in self._specs if i not in wanted or wanted[i] != self._specs[i]]:
                spec = self._specs.pop(replica_id)
                if spec.backend in self.backends:
                    await self.backends[spec.backend].stop(replica_id)
            for replica_id, spec in wanted.items():
                if replica_id not in self._specs:
                    self._specs[replica_id] = spec
                    refusal = self._refusal(spec)
                    if refusal is None:
                        await self.backends[spec.backend].start(spec)
                    else:
                        self._refused[replica_id] = refusal
                        log.warning("replica %s of %s not started: %s", replica_id, spec.service, refusal)
            self._refused = {i: m for i, m in self._refused.items() if i in self._specs}

    def _refusal(self, spec: ReplicaSpec) -> str | None:
        if spec.backend not in self.backends:
            hint = " (--managed-docker)" if spec.backend == "docker" else ""
            return f"backend {spec.backend!r} is not run here{hint}"
        kind, program = ("image", spec.image) if spec.backend == "docker" else \
            ("program", spec.command[0] if spec.command else "")
        if self.allowed and program not in self.allowed:
            return f"{kind} {program!r} is not in this agent's --managed-allow"
        return None

    def statuses(self) -> list[loadreport_pb2.ReplicaStatus]:
        out = []
        for replica_id, spec in sorted(self._specs.items()):
            backend = self.backends.get(spec.backend)
            status = None if backend is None else backend.status(replica_id)
            if status is None:
                message = self._refused.get(replica_id, "not running")
                out.append(loadreport_pb2.ReplicaStatus(id=replica_id, service=spec.service, state="failed",
                                                        message=message))
            else:
                out.append(status_to_proto(status))
        return out

    async def close(self) -> None:
        async with self._lock:
            self._specs.clear()
            for backend in self.backends.values():
                await backend.close()


def add_managed_arguments(parser: Any) -> None:
    """The agent's node-manager flags (docs/container-manager.md)."""
    group = parser.add_argument_group("managed replicas (container manager; --managed-cpu 0 = run none)")
    group.add_argument("--managed-cpu", type=float, default=0.0,
                       help="CPUs this agent offers to managed model servers (default 0: it runs none)")
    group.add_argument("--managed-memory", type=_size, default=0, metavar="SIZE",
                       help="memory offered to them, e.g. 16Gi (default 0: not limited)")
    group.add_argument("--managed-gpu", type=float, default=0.0, help="GPUs offered to them (default 0: none)")
    group.add_argument("--managed-log-dir", default="", metavar="DIR",
                       help="where replicas' rotated logs go (default: a new temporary directory)")
    group.add_argument("--managed-host", default="127.0.0.1", metavar="HOST",
                       help="what ${HOST} becomes in a replica's command, env and url: the address other "
                            "agents reach this host's replicas at (default: %(default)s, one machine)")
    group.add_argument("--managed-allow", action="append", default=[], metavar="PROGRAM",
                       help="a program (argv[0] exactly as the config names it), or an image for the docker "
                            "backend, this agent may run; repeatable (default: any the control plane's config names)")
    group.add_argument("--managed-docker", default="", metavar="URL",
                       help="the Docker Engine API (e.g. unix:///run/podman/podman.sock) for replicas with "
                            "backend: docker (default: none; such replicas are reported failed)")


def managed_resources(args: Any) -> NodeResources:
    for flag, value in (("--managed-cpu", args.managed_cpu), ("--managed-gpu", args.managed_gpu)):
        if not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"switchgear agent: {flag} must be a finite number >= 0")
    return NodeResources(args.managed_cpu, args.managed_memory, args.managed_gpu)


def _size(text: str) -> int:
    from switchgear.dataplane.worker import _size as worker_size

    return worker_size(text)


def build_node_manager(resources: NodeResources, log_dir: str, allowed: Sequence[str] = (),
                       host: str = "127.0.0.1", docker_url: str = "") -> NodeManager | None:
    if resources.cpu <= 0:
        return None
    directory = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="switchgear-replicas-"))
    others: dict[str, Backend] = {}
    if docker_url:
        from switchgear.dataplane.managed.docker import DockerBackend  # the docker package: only when asked for

        others["docker"] = DockerBackend(directory, docker_url)
    return NodeManager(resources, ProcessBackend(directory), allowed, host, others=others)
