"""Resource allocator (pure): what a task needs, what an agent offers, whether it fits.

Requirements per category are the seed's `_calculate_resource_requirements`:

| category | cpu | memory | gpu | disk IOPS | network Mbps |
| --- | --- | --- | --- | --- | --- |
| llm | 2 | 4 GiB | 0.5 | – | 100 |
| document | 4 | 8 GiB | – | 1000 | 200 |
| every other | `default_cpu` (1) | `default_memory` (2 GiB) | – | – | 50 |

`resource_allocation.default_cpu` / `default_memory` are a *per-task request*: the seed's
`else` branch (what a task of a category without a row of its own asks for). They are not an
agent's capacity: the seed's own values (2 CPUs, 4Gi) read as a capacity could never hold a
document task (4 CPUs, 8 GiB), so its "queued for later" fallback could never queue.

A service overrides any of them with metadata keys named after the seed's fields:
`resources.cpu`, `resources.memory` (bytes, or a size such as "8Gi"/"512Mi"),
`resources.gpu`, `resources.disk_io` (IOPS) and `resources.network_bandwidth` (Mbps).

Pools are per agent, not per cluster: a task runs on one agent, so free CPU scattered over
many agents cannot hold it; accounting per agent is what makes "fits" true where it runs.
Each worker agent declares its pool when it asks for work (`switchgear agent --task-cpu ...`);
what it leaves unset is unlimited: an agent that declares nothing is bounded by its task slots
(`--task-slots`) alone. `max_concurrent_tasks` caps leased plus running tasks over the whole
cluster.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from switchgear.controlplane.model import ResourceAllocationSettings
from switchgear.controlplane.tasks.model import RESOURCE_NAMES, Resources

GIB = 1024**3

DEFAULT_REQUIREMENTS: Mapping[str, Resources] = {
    "llm": Resources(cpu=2.0, memory_bytes=4 * GIB, gpu=0.5, network_mbps=100.0),
    "document": Resources(cpu=4.0, memory_bytes=8 * GIB, disk_iops=1000.0, network_mbps=200.0),
}
OTHER_REQUIREMENTS = Resources(cpu=1.0, memory_bytes=2 * GIB, network_mbps=50.0)

#: Service metadata key -> Resources field.
OVERRIDE_KEYS: Mapping[str, str] = {
    "resources.cpu": "cpu",
    "resources.memory": "memory_bytes",
    "resources.gpu": "gpu",
    "resources.disk_io": "disk_iops",
    "resources.network_bandwidth": "network_mbps",
}

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


class AllocationError(ValueError):
    """Requirements cannot be computed (a bad override) or can never be met."""


def parse_size(text: str) -> float:
    """"8Gi" -> 8 * 2**30, "500M" -> 5e8, "1024" -> 1024; ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 8Gi, 512Mi, 1073741824)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return float(match.group(1)) * _UNITS[unit]


def other_requirements(settings: ResourceAllocationSettings) -> Resources:
    """What a task of a category without a row of its own asks for: resource_allocation's defaults."""
    return Resources(cpu=settings.default_cpu, memory_bytes=float(settings.default_memory_bytes),
                     network_mbps=OTHER_REQUIREMENTS.network_mbps)


def requirements(category: str, metadata: Mapping[str, str],
                 settings: ResourceAllocationSettings | None = None) -> Resources:
    """The seed's requirements for `category`, with the service's metadata overrides applied.
    `settings` gives the other categories' request (the table's last row); None: the seed's 1 CPU, 2 GiB."""
    other = OTHER_REQUIREMENTS if settings is None else other_requirements(settings)
    base = DEFAULT_REQUIREMENTS.get(category, other)
    values = dict(zip(RESOURCE_NAMES, base.values(), strict=True))
    for key, name in OVERRIDE_KEYS.items():
        if key not in metadata:
            continue
        raw = metadata[key]
        try:
            value = parse_size(raw) if name == "memory_bytes" else float(raw)
        except ValueError as exc:
            raise AllocationError(f"metadata {key}: {exc}") from None
        if not math.isfinite(value) or value < 0:
            raise AllocationError(f"metadata {key}: must be a finite number >= 0, got {raw!r}")
        values[name] = value
    return Resources(**values)


def agent_pool(declared: Resources) -> Resources:
    """An agent's pool: what it declared, each zero unlimited."""
    return Resources(
        cpu=declared.cpu or math.inf,
        memory_bytes=declared.memory_bytes or math.inf,
        gpu=declared.gpu or math.inf,
        disk_iops=declared.disk_iops or math.inf,
        network_mbps=declared.network_mbps or math.inf,
    )


def never_fits(need: Resources, category: str, pools: Iterable[Resources]) -> str | None:
    """Why `need` fits none of `pools` (the default pool and every known agent's), or None."""
    pools = list(pools)
    if any(need.fits_in(pool) for pool in pools):
        return None
    largest = max(pools, key=lambda p: sum(1 for v in p.values() if math.isinf(v)) + p.cpu) if pools else Resources()
    short = ", ".join(need.shortfall(largest))
    return (
        f"Resource allocation failed: a {category} task needs {short} per agent; "
        "no agent that declares a pool can ever hold it (an agent that declares none could)"
    )


def utilisation(used: Resources, capacity: Resources) -> dict[str, float]:
    """used / capacity per resource, in [0, 1] when within capacity; 0 for unlimited or
    zero capacity (nothing to be utilised)."""
    out: dict[str, float] = {}
    for name, u, c in zip(RESOURCE_NAMES, used.values(), capacity.values(), strict=True):
        out[name] = 0.0 if math.isinf(c) or c <= 0 else u / c
    return out
