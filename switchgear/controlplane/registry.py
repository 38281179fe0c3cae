"""The registry: the one owner of the control plane's state.

Every mutation is validated as a whole new state, committed to the store with its version in
one transaction, and only then published as the current snapshot. A rejected change leaves
the running state, the store and the published snapshot untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from switchgear.controlplane import codec
from switchgear.controlplane import snapshot as snap
from switchgear.controlplane.model import RegistryState, ServiceSpec
from switchgear.controlplane.store import AuditEntry, Change, Store
from switchgear.controlplane.validate import Problem, ValidationError, validate_state

Listener = Callable[[snap.Snapshot], None]


class NotFound(KeyError):
    pass


class Registry:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._listeners: list[Listener] = []
        stored = store.load()
        self._config_hash = stored.config_hash
        digest = snap.content_hash(stored.state)
        if digest == stored.content_hash:
            self._snapshot = snap.build(stored.state, stored.seq, digest)
        else:  # a new store, or a build whose model hashes differently: a new version
            self._snapshot = self._commit_version(
                stored.state, stored.seq + 1, digest, Change("controlplane", "start", "*"), None
            )

    @property
    def snapshot(self) -> snap.Snapshot:
        return self._snapshot

    @property
    def state(self) -> RegistryState:
        return self._snapshot.state

    @property
    def config_hash(self) -> str:
        """Hash of the last config file applied at start-up ("" when none)."""
        return self._config_hash

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def register(self, spec: ServiceSpec, actor: str) -> snap.Snapshot:
        before = self.state.service(spec.name)
        others = tuple(s for s in self.state.services if s.name != spec.name)
        services = tuple(sorted((*others, spec), key=lambda s: s.name))
        action = "update_service" if before is not None else "register_service"
        change = Change(actor, action, spec.name, before=codec.dumps(before) if before else "", after=codec.dumps(spec))
        return self._apply(dataclasses.replace(self.state, services=services), change)

    def deregister(self, name: str, actor: str) -> snap.Snapshot:
        before = self.state.service(name)
        if before is None:
            raise NotFound(name)
        services = tuple(s for s in self.state.services if s.name != name)
        change = Change(actor, "deregister_service", name, before=codec.dumps(before))
        return self._apply(dataclasses.replace(self.state, services=services), change)

    def replace(
        self, state: RegistryState, actor: str, source: str, config_hash: str | None = None
    ) -> tuple[snap.Snapshot, snap.Diff]:
        # A config file owns services and settings; tenants and keys are governed apart.
        state = dataclasses.replace(state, tenants=self.state.tenants, keys=self.state.keys)
        change = snap.diff(self.state, state)
        detail = f"added={list(change.added)} changed={list(change.changed)} removed={list(change.removed)}"
        applied = self._apply(state, Change(actor, "apply_config", source, detail), config_hash)
        return applied, change

    def change(self, state: RegistryState, change: Change) -> snap.Snapshot:
        """Apply a whole new state (validated; a new version only if it differs)."""
        return self._apply(state, change)

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        return self._store.audit(limit)

    def _apply(
        self, state: RegistryState, change: Change, config_hash: str | None = None
    ) -> snap.Snapshot:
        problems: list[Problem] = validate_state(state)
        if problems:
            raise ValidationError(problems)
        overlay = self._snapshot.overlay.pruned(state)
        digest = snap.content_hash(state, overlay)
        if digest == self._snapshot.content_hash and config_hash in (None, self._config_hash):
            return self._snapshot  # nothing changed: no new version
        seq = self._snapshot.seq + (digest != self._snapshot.content_hash)
        self._snapshot = self._commit_version(state, seq, digest, change, config_hash, overlay)
        self._publish()
        return self._snapshot

    def set_overlay(self, overlay: snap.Overlay, changes: Sequence[Change]) -> snap.Snapshot:
        """Serve `overlay` (health, weights, alert actions) over the current state.

        A new version only when the overlay really differs; the store gets the version counter
        and one audit row per change (the registry state itself is untouched).
        """
        overlay = overlay.pruned(self.state)
        if overlay == self._snapshot.overlay:
            return self._snapshot
        digest = snap.content_hash(self.state, overlay)
        seq = self._snapshot.seq + 1
        first, *rest = changes or [Change("controlplane", "overlay", "*")]
        self._snapshot = self._commit_version(self.state, seq, digest, first, None, overlay)
        for change in rest:
            self._store.commit(self.state, seq, digest, self._snapshot.version, change)
        self._publish()
        return self._snapshot

    def record(self, change: Change) -> None:
        """An audit row against the current version, for an event that changed nothing served."""
        snapshot = self._snapshot
        self._store.commit(snapshot.state, snapshot.seq, snapshot.content_hash, snapshot.version, change)

    def _publish(self) -> None:
        for listener in self._listeners:
            listener(self._snapshot)

    def _commit_version(
        self, state: RegistryState, seq: int, digest: str, change: Change, config_hash: str | None,
        overlay: snap.Overlay = snap.EMPTY_OVERLAY,
    ) -> snap.Snapshot:
        built = snap.build(state, seq, digest, overlay)
        self._store.commit(state, seq, digest, built.version, change, config_hash)
        if config_hash is not None:
            self._config_hash = config_hash
        return built
