"""The task scheduler's data: frozen dataclasses only. Times are wall-clock epoch seconds
(they are persisted and must survive a control-plane restart); units are in field names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


class TaskState(str, Enum):
    QUEUED = "queued"
    LEASED = "leased"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD_LETTERED = "dead_lettered"

    @property
    def final(self) -> bool:
        return self in _FINAL

    @property
    def holds_lease(self) -> bool:
        return self in (TaskState.LEASED, TaskState.RUNNING)


_FINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.DEAD_LETTERED})

#: The resources the allocator accounts, in the order reports list them.
RESOURCE_NAMES = ("cpu", "memory_bytes", "gpu", "disk_iops", "network_mbps")


@dataclass(frozen=True)
class Resources:
    """A task's requirements, or a pool. In a pool `math.inf` means "not limited"."""

    cpu: float = 0.0
    memory_bytes: float = 0.0
    gpu: float = 0.0
    disk_iops: float = 0.0
    network_mbps: float = 0.0

    def values(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in RESOURCE_NAMES)

    def __add__(self, other: Resources) -> Resources:
        return Resources(*(a + b for a, b in zip(self.values(), other.values(), strict=True)))

    def __sub__(self, other: Resources) -> Resources:
        return Resources(*(a - b for a, b in zip(self.values(), other.values(), strict=True)))

    def fits_in(self, pool: Resources) -> bool:
        """Every resource at most the pool's (a small epsilon absorbs float sums like 0.1 * 3)."""
        return all(need <= have + 1e-9 for need, have in zip(self.values(), pool.values(), strict=True))

    def shortfall(self, pool: Resources) -> list[str]:
        """Human-readable "cpu 4 > 2" for each resource that does not fit."""
        return [
            f"{name} {_num(need)} > {_num(have)}"
            for name, need, have in zip(RESOURCE_NAMES, self.values(), pool.values(), strict=True)
            if need > have + 1e-9
        ]


ZERO = Resources()


def _num(x: float) -> str:
    if math.isinf(x):
        return "unlimited"
    return f"{x:g}" if x < 1e6 else f"{x / 1024**3:g}Gi"


@dataclass(frozen=True)
class TaskError:
    kind: str
    message: str


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    estimated: bool = False


@dataclass(frozen=True)
class Task:
    """One task as stored. `lease_*` are set while LEASED or RUNNING (and kept after, for
    the record); `submitted_at` is what aging counts from, so a retried task keeps its age."""

    id: str
    tenant: str
    service: str
    category: str
    method: str
    priority: int
    requirements: Resources
    submitted_at: float
    payload: bytes = b""
    payload_blob_id: str = ""
    timeout_s: float = 0.0
    idempotency_key: str = ""
    request_hash: str = ""
    max_attempts: int = 3
    origin: str = "submit"
    state: TaskState = TaskState.QUEUED
    attempts: int = 0
    not_before: float = 0.0
    lease_id: str = ""
    agent: str = ""
    lease_expires_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    updated_at: float = 0.0
    progress: float = 0.0
    progress_message: str = ""
    result: bytes = b""
    endpoint: str = ""
    usage: Usage = field(default_factory=Usage)
    error: TaskError | None = None


@dataclass(frozen=True)
class AgentOffer:
    """What an agent asks for in one lease call: its slots, its pool as declared (zeros mean
    unlimited: see allocator.agent_pool), the services it
    runs and how many tasks it takes now."""

    agent: str
    capacity: int
    pool: Resources
    services: frozenset[str]
    max_tasks: int


@dataclass(frozen=True)
class Holding:
    """What an agent holds now, by the control plane's own record of its leases."""

    tasks: int = 0
    resources: Resources = ZERO
