"""The container manager's decisions (pure): what a managed spec may say, where a replica goes,
when a managed service scales. The edge that acts on them is container_manager.py.

Placement reuses the task allocator's accounting (tasks.model.Resources, per agent, not per
cluster): a replica needs the cpu, memory and gpu its spec declares, an agent offers the pool it
declared with `--managed-cpu/--managed-memory/--managed-gpu`, and a replica goes to the agent
with the most free cpu among those where it fits (ties: the node id, so placement is stable).

Scaling is the seed's utilisation rule: utilisation = calls in flight on the ready replicas /
(ready replicas x `concurrency`). Above `scale_up_utilization` (0.8) for `scale_up_window_s`
without a break: one more replica (up to max). Below `scale_down_utilization` (0.6) for
`scale_down_window_s`: one fewer (down to min). A decision restarts both windows, so one
sustained condition adds or removes one replica per window, never a burst.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from switchgear.controlplane.model import ManagedSpec
from switchgear.controlplane.tasks.model import Resources


def requirements(spec: ManagedSpec) -> Resources:
    """What one replica takes from its agent's pool."""
    return Resources(cpu=spec.cpu, memory_bytes=float(spec.memory_bytes), gpu=spec.gpu)


def place(need: Resources, pools: Mapping[str, Resources], used: Mapping[str, Resources]) -> str | None:
    """The agent with the most free cpu where `need` fits (ties: node id); None when none fits."""
    best: tuple[float, str] | None = None
    for node in sorted(pools):
        free = pools[node] - used.get(node, Resources())
        if need.fits_in(free) and (best is None or free.cpu > best[0]):
            best = (free.cpu, node)
    return None if best is None else best[1]


def utilisation(in_flight: int, ready: int, concurrency: int) -> float:
    """In-flight calls over the ready replicas' capacity; 0 without capacity."""
    return in_flight / (ready * concurrency) if ready > 0 and concurrency > 0 else 0.0


@dataclass
class Scaler:
    """One managed service's scaling windows. `decide` takes the time (seconds, any monotonic
    clock) and the current figures, and returns +1, -1 or 0 replicas."""

    above_since: float | None = None
    below_since: float | None = None
    history: list[str] = field(default_factory=list)

    def decide(self, spec: ManagedSpec, desired: int, util: float, now: float) -> int:
        if spec.concurrency <= 0 or spec.max_replicas <= spec.min_replicas:
            return 0
        self.above_since = (self.above_since if self.above_since is not None else now) \
            if util > spec.scale_up_utilization else None
        self.below_since = (self.below_since if self.below_since is not None else now) \
            if util < spec.scale_down_utilization else None
        if self.above_since is not None and now - self.above_since >= spec.scale_up_window_s \
                and desired < spec.max_replicas:
            self.above_since = None
            return 1
        if self.below_since is not None and now - self.below_since >= spec.scale_down_window_s \
                and desired > spec.min_replicas:
            self.below_since = None
            return -1
        return 0
