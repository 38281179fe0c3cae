"""The registry: the one owner of the control plane's state.

Every mutation is validated as a whole new state, committed to the store with its version in
one transaction, and only then published as the current snapshot. A rejected change leaves
the running state, the store and the published snapshot untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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
        others = tuple(s for s in self.state.services if s.name != spec.name)
        services = tuple(sorted((*others, spec), key=lambda s: s.name))
        action = "update_service" if len(others) < len(self.state.services) else "register_service"
        return self._apply(dataclasses.replace(self.state, services=services),
                           Change(actor, action, spec.name))

    def deregister(self, name: str, actor: str) -> snap.Snapshot:
        if self.state.service(name) is None:
            raise NotFound(name)
        services = tuple(s for s in self.state.services if s.name != name)
        return self._apply(dataclasses.replace(self.state, services=services),
                           Change(actor, "deregister_service", name))

    def replace(
        self, state: RegistryState, actor: str, source: str, config_hash: str | None = None
    ) -> tuple[snap.Snapshot, snap.Diff]:
        change = snap.diff(self.state, state)
        detail = f"added={list(change.added)} changed={list(change.changed)} removed={list(change.removed)}"
        applied = self._apply(state, Change(actor, "apply_config", source, detail), config_hash)
        return applied, change

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        return self._store.audit(limit)

    def _apply(
        self, state: RegistryState, change: Change, config_hash: str | None = None
    ) -> snap.Snapshot:
        problems: list[Problem] = validate_state(state)
        if problems:
            raise ValidationError(problems)
        digest = snap.content_hash(state)
        if digest == self._snapshot.content_hash and config_hash in (None, self._config_hash):
            return self._snapshot  # nothing changed: no new version
        seq = self._snapshot.seq + (digest != self._snapshot.content_hash)
        self._snapshot = self._commit_version(state, seq, digest, change, config_hash)
        for listener in self._listeners:
            listener(self._snapshot)
        return self._snapshot

    def _commit_version(
        self, state: RegistryState, seq: int, digest: str, change: Change, config_hash: str | None
    ) -> snap.Snapshot:
        built = snap.build(state, seq, digest)
        self._store.commit(state, seq, digest, built.version, change, config_hash)
        if config_hash is not None:
            self._config_hash = config_hash
        return built
