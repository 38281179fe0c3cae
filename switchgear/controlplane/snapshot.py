"""Snapshot building: what the control plane serves to agents, decided apart from how.

Pure. A snapshot is the registry state plus a version. Versions are `"<seq>.<hash12>"`:
`seq` is a counter persisted with the state (so versions grow across restarts on the same
store) and `hash12` is the start of the state's content hash (so two control planes, or one
that lost its store, never give one version string to different content).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections import deque
from collections.abc import Container, Mapping
from dataclasses import dataclass
from functools import cached_property

from switchgear.controlplane import codec
from switchgear.controlplane.model import RegistryState, ServiceSpec


@dataclass(frozen=True)
class EndpointOverride:
    """What the health monitor decided for one endpoint: wire weight and health state."""

    weight: int
    health: str  # "healthy", "degraded", "ejected" or "draining"


@dataclass(frozen=True)
class ServiceOverride:
    """Policy the alert actions put over a service's own ("" / None / () = the service's own).

    `prefer`: endpoint ids (route targets) served one priority above the service's highest
    endpoint priority, so that the "priority" strategy sends the route's traffic to them, and
    spills to the others only when they have no healthy capacity or are blocked (the switch
    alert actions, alerts.py)."""

    strategy: str = ""
    fallbacks: tuple[str, ...] | None = None
    prefer: tuple[str, ...] = ()


@dataclass(frozen=True)
class Overlay:
    """Runtime adjustments the control plane derives (health, weights, alert actions).

    Soft state: served in snapshots and part of their content hash, never written over the
    operator's registry (Admin ListServices shows what was configured; GetSnapshot what is
    served). Keys are "service/endpoint" and service names, sorted.
    """

    endpoints: tuple[tuple[str, EndpointOverride], ...] = ()
    services: tuple[tuple[str, ServiceOverride], ...] = ()
    breaker_failure_threshold: int = 0  # 0 = the settings' own

    @cached_property
    def _endpoint_map(self) -> dict[str, EndpointOverride]:
        return dict(self.endpoints)

    @cached_property
    def _service_map(self) -> dict[str, ServiceOverride]:
        return dict(self.services)

    def endpoint(self, service: str, endpoint: str) -> EndpointOverride | None:
        return self._endpoint_map.get(f"{service}/{endpoint}")

    def service(self, name: str) -> ServiceOverride | None:
        return self._service_map.get(name)

    def pruned(self, state: RegistryState) -> Overlay:
        """This overlay without entries for services or endpoints `state` no longer has."""
        names = {s.name for s in state.services}
        live = {f"{s.name}/{e.id}" for s in state.services for e in s.endpoints}
        services = tuple(
            (n, ServiceOverride(o.strategy, None if o.fallbacks is None else
                                tuple(f for f in o.fallbacks if f in names and f != n),
                                tuple(e for e in o.prefer if f"{n}/{e}" in live)))
            for n, o in self.services if n in names
        )
        return Overlay(tuple((k, v) for k, v in self.endpoints if k in live), services,
                       self.breaker_failure_threshold)


EMPTY_OVERLAY = Overlay()


@dataclass(frozen=True)
class Snapshot:
    version: str
    seq: int
    content_hash: str
    state: RegistryState
    overlay: Overlay = EMPTY_OVERLAY


def content_hash(state: RegistryState, overlay: Overlay = EMPTY_OVERLAY) -> str:
    """The state's hash; with a non-empty overlay, a hash of both (so a state served without
    adjustments keeps the hash it always had).

    The state's hash is a hash of its fields' canonical hashes, where a tuple field (services,
    tenants, ...) contributes one memoised hash per item: a new version re-hashes only what
    changed (10,000 endpoints: ~120 ms cold, a few ms warm; see bench/controlplane).
    """
    parts = []
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        items = value if isinstance(value, tuple) else (value,)
        parts.append(f"{f.name}:{isinstance(value, tuple)}:" + ",".join(_item_hash(v) for v in items))
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    if overlay == EMPTY_OVERLAY:
        return digest
    return hashlib.sha256(f"{digest}:{_overlay_hash(overlay)}".encode()).hexdigest()


def _item_hash(item: object) -> str:
    try:
        return _cached_item_hash(item)
    except TypeError:  # an unhashable item: hash it every time
        return codec.canonical_hash(item)


@functools.lru_cache(maxsize=65536)
def _cached_item_hash(item: object) -> str:
    return codec.canonical_hash(item)


def _overlay_hash(overlay: Overlay) -> str:
    """Canonical and fast: the overlay's few field types, flattened without reflection."""
    body = (
        [[k, o.weight, o.health] for k, o in overlay.endpoints],
        [[k, o.strategy, None if o.fallbacks is None else list(o.fallbacks), *([list(o.prefer)] if o.prefer else [])]
         for k, o in overlay.services],
        overlay.breaker_failure_threshold,
    )
    return hashlib.sha256(repr(body).encode()).hexdigest()


def build(
    state: RegistryState, seq: int, digest: str | None = None, overlay: Overlay = EMPTY_OVERLAY
) -> Snapshot:
    digest = digest or content_hash(state, overlay)
    return Snapshot(version=format_version(seq, digest), seq=seq, content_hash=digest, state=state, overlay=overlay)


def format_version(seq: int, digest: str) -> str:
    return f"{seq}.{digest[:12]}"


def version_seq(version: str) -> int:
    """The counter part of a version string; -1 when it is not one of ours (or empty)."""
    head, _, _ = version.partition(".")
    return int(head) if head.isdigit() else -1


@dataclass(frozen=True)
class Diff:
    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]


def diff(old: RegistryState, new: RegistryState) -> Diff:
    """Service names added, changed and removed between two states (sorted)."""
    before = {s.name: s for s in old.services}
    after = {s.name: s for s in new.services}
    return Diff(
        added=tuple(sorted(after.keys() - before.keys())),
        changed=tuple(sorted(n for n in after.keys() & before.keys() if after[n] != before[n])),
        removed=tuple(sorted(before.keys() - after.keys())),
    )


@dataclass(frozen=True)
class Changes:
    """What agents see change between two versions: services (by name) added or changed in what
    they are served (spec, health, weights, alert actions), services no longer served, and
    whether the settings or the tenants-and-keys changed (each one whole resource)."""

    changed: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    settings: bool = False
    governance: bool = False

    def then(self, later: Changes, served: Container[str]) -> Changes:
        """These changes followed by `later`, sorted out against what is `served` at the end: a
        name touched by either is changed when served now, else removed."""
        touched = self.changed | self.removed | later.changed | later.removed
        return Changes(frozenset(n for n in touched if n in served), frozenset(n for n in touched if n not in served),
                       self.settings or later.settings, self.governance or later.governance)


def served_specs(snapshot: Snapshot) -> dict[str, ServiceSpec]:
    """The services agents are sent (a managed service with no ready replica has no endpoint
    and is not served until it has), by name."""
    return {s.name: s for s in snapshot.state.services if s.endpoints}


def served_changes(old: Snapshot, new: Snapshot, before: Mapping[str, ServiceSpec] | None = None,
                   after: Mapping[str, ServiceSpec] | None = None) -> Changes:
    """What changed for agents from `old` to `new` (`before` / `after`: their served_specs, when
    the caller has them). A service changes when its spec does or when the overlay's entries for
    it (its endpoints' weights and health, its alert actions) do; unchanged specs are usually the
    same objects, so the common case costs one identity test per service."""
    before = served_specs(old) if before is None else before
    after = served_specs(new) if after is None else after
    same_overlay = old.overlay is new.overlay or old.overlay == new.overlay
    changed = frozenset(
        name for name, spec in after.items()
        if (prev := before.get(name)) is None or (prev is not spec and prev != spec)
        or (not same_overlay and _overlaid(old.overlay, prev) != _overlaid(new.overlay, spec))
    )
    return Changes(
        changed=changed,
        removed=frozenset(before.keys() - after.keys()),
        settings=old.state.settings != new.state.settings
        or old.overlay.breaker_failure_threshold != new.overlay.breaker_failure_threshold,
        governance=old.state.tenants != new.state.tenants or old.state.keys != new.state.keys,
    )


def _overlaid(overlay: Overlay, spec: ServiceSpec) -> tuple[object, ...]:
    """The overlay's entries that bear on one service as served."""
    return (overlay.service(spec.name), *(overlay.endpoint(spec.name, e.id) for e in spec.endpoints))


class ChangeLog:
    """The last `capacity` version steps and what changed in each: enough to tell an agent at a
    recent version what changed since, with no state per agent. Bounded: the oldest step goes
    when a new one comes. Not thread-safe (the event loop's feed owns it)."""

    def __init__(self, capacity: int) -> None:
        self._steps: deque[tuple[str, Changes]] = deque(maxlen=max(0, capacity))  # (from version, changes)

    def record(self, base: str, changes: Changes) -> None:
        self._steps.append((base, changes))

    def since(self, version: str, served: Container[str]) -> Changes | None:
        """Everything that changed after `version` up to the newest step (sorted out against
        what is `served` now); None when `version` is not a step's start (too old, unknown)."""
        total: Changes | None = None
        for base, changes in reversed(self._steps):
            total = changes if total is None else changes.then(total, served)
            if base == version:
                return total.then(Changes(), served)
        return None
