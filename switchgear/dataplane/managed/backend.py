"""The small interface every replica backend implements, and the data it speaks.

A backend runs one replica per `start` and supervises it itself (restarts with backoff, failure
after repeated crashes); `status` and `logs` are cheap reads; `stop` drains nothing (the control
plane drains calls before it withdraws an assignment) and returns once the replica is gone.
The `process` backend is process.py; a Docker or Kubernetes backend maps onto the same four
calls (docs/container-manager.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

PORT_REFERENCE = "${PORT}"
HOST_REFERENCE = "${HOST}"


class State(str, Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ReplicaSpec:
    """One assignment, as the agent runs it (loadreport.proto ReplicaAssignment). Seconds, bytes."""

    id: str
    service: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    inherit_env: tuple[str, ...] = ()
    port: int = 0
    url: str = ""
    readiness_url: str = ""
    readiness_timeout_s: float = 60.0
    restart_backoff_s: float = 1.0
    restart_max_backoff_s: float = 30.0
    max_crashes: int = 5
    crash_window_s: float = 300.0
    stop_grace_s: float = 10.0
    log_bytes: int = 1024 * 1024
    backend: str = "process"
    host: str = "127.0.0.1"  # the agent's --managed-host: what "${HOST}" becomes
    image: str = ""
    volumes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplicaStatus:
    id: str
    service: str
    state: State
    url: str = ""
    restarts: int = 0
    last_log: tuple[str, ...] = ()
    message: str = ""
    pid: int = 0


class Backend(Protocol):
    on_change: Callable[[], None]  # called whenever a replica's state changes

    async def start(self, spec: ReplicaSpec) -> None: ...

    async def stop(self, replica_id: str) -> None: ...

    def status(self, replica_id: str) -> ReplicaStatus | None: ...

    def logs(self, replica_id: str) -> tuple[str, ...]: ...

    async def close(self) -> None: ...


def fill_port(text: str, port: int, host: str = "127.0.0.1") -> str:
    """`text` with "${PORT}" and "${HOST}" filled in."""
    return text.replace(PORT_REFERENCE, str(port)).replace(HOST_REFERENCE, host)
