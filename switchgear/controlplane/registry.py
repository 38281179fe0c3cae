"""The registry: the one owner of the control plane's state.

Every mutation is validated as a whole new state, committed to the store with its version in
one transaction, and only then published as the current snapshot. A rejected change leaves
the running state, the store and the published snapshot untouched.

Several control-plane replicas may share one store (PostgreSQL). Each commit names the
version it was based on; when another replica committed first the store refuses it
(`StaleVersion`), the registry reloads what the store holds and recomputes the change on it,
so concurrent admin calls on different replicas serialise instead of overwriting each other.
`refresh()` adopts what another replica committed (called on the store's change notification
and by a slow poll); versions stay unique and monotonic because the store hands out `seq`.

Threading: once the control plane serves, every method that touches the store runs on the
store's one thread (`store.serial`), submitted from the event loop with `call` (or
`retrying_async`, which does). Changes are therefore made one at a time, in order, each as one
read-decide-commit with no other change in between, while the loop keeps serving: `snapshot`
and `state` are one reference each, read from any thread. Listeners subscribed on a loop are
called on that loop, in publish order. The synchronous methods are the same code, for start-up
(nothing else runs yet) and tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from switchgear.controlplane import codec
from switchgear.controlplane import snapshot as snap
from switchgear.controlplane.agent_check import introduced_problems, left_by
from switchgear.controlplane.model import MANAGED_ENDPOINT_PREFIX, RegistryState, ServiceSpec
from switchgear.controlplane.offloop import call_on
from switchgear.controlplane.store import REFUSED, AuditEntry, Change, StaleVersion, Store, Stored
from switchgear.controlplane.validate import Problem, ValidationError, validate_state

Listener = Callable[[snap.Snapshot], None]
T = TypeVar("T")

log = logging.getLogger("switchgear.controlplane.registry")

#: Attempts at a change that keeps meeting a newer version from another replica: at once
#: (start-up, tests), and from servicers with a jittered pause between attempts.
MAX_ATTEMPTS = 8
ASYNC_ATTEMPTS = 30
#: Refused changes kept in the audit trail (the newest; older refusals are pruned as new ones land).
MAX_REFUSED_ROWS = 200
#: Characters of a refusal's message kept in its audit row.
MAX_REFUSAL_DETAIL = 1000


class NotFound(KeyError):
    pass


class Contended(RuntimeError):
    """A change lost the race to other replicas' commits MAX_ATTEMPTS times in a row."""


class Registry:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._listeners: list[tuple[Listener, asyncio.AbstractEventLoop | None]] = []
        for _ in range(MAX_ATTEMPTS):
            stored = store.load()
            self._config_hash = stored.config_hash
            overlay = _overlay(stored).pruned(stored.state)
            digest = snap.content_hash(stored.state, overlay)
            if digest == stored.content_hash:
                self._snapshot = snap.build(stored.state, stored.seq, digest, overlay)
                return
            # A new store, or a build whose model hashes differently: a new version.
            self._snapshot = snap.build(stored.state, stored.seq, stored.content_hash, overlay)
            try:
                self._snapshot = self._commit_version(
                    stored.state, stored.seq + 1, digest, Change("controlplane", "start", "*"), None, overlay)
                return
            except StaleVersion:
                continue  # another replica started at the same moment and wrote first
        raise Contended("could not settle a start-up version against other replicas")

    @property
    def snapshot(self) -> snap.Snapshot:
        return self._snapshot

    @property
    def state(self) -> RegistryState:
        return self._snapshot.state

    @property
    def seq(self) -> int:
        return self._snapshot.seq

    @property
    def config_hash(self) -> str:
        """Hash of the last config file applied at start-up ("" when none)."""
        return self._config_hash

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with each new snapshot: on the loop subscribing, when there is one."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._listeners.append((listener, loop))

    async def call(self, operation: Callable[[], T]) -> T:
        """Run `operation` (a read of the store, or a change: `register`, `change`, `refresh`,
        `set_overlay`, `audit`, ...) on the store's thread, after every call made before it."""
        return await self._store.serial.run(operation)

    def refresh(self) -> bool:
        """Adopt a newer version from the store (committed by another replica); publishes it.
        Cheap when there is none: one query of the version head, no load."""
        if self._store.head()[0] <= self._snapshot.seq:
            return False
        stored = self._store.load()
        if stored.seq <= self._snapshot.seq:
            return False
        self._config_hash = stored.config_hash
        self._snapshot = snap.build(stored.state, stored.seq, stored.content_hash, _overlay(stored))
        self._publish()
        return True

    def retrying(self, operation: Callable[[], T]) -> T:
        """Run `operation` (which reads `self.state` and commits a change) until it is not
        pre-empted by another replica's commit; each retry sees the newer state."""
        for _ in range(MAX_ATTEMPTS):
            try:
                return operation()
            except StaleVersion:
                self.refresh()
        raise Contended(f"gave up after {MAX_ATTEMPTS} attempts: other replicas kept changing the registry")

    async def retrying_async(self, operation: Callable[[], T], attempts: int = ASYNC_ATTEMPTS) -> T:
        """`retrying` for servicers: each attempt runs on the store's thread (`call`), and between
        attempts a jittered, growing pause (without blocking the loop), so writers on several
        replicas stop pre-empting each other in lockstep."""
        for attempt in range(attempts):
            try:
                return await self.call(operation)
            except StaleVersion:
                await self.call(self.refresh)
            await asyncio.sleep(random.uniform(0.0, min(0.1, 0.002 * 2**attempt)))
        raise Contended(f"gave up after {attempts} attempts: other replicas kept changing the registry")

    def register(self, spec: ServiceSpec, actor: str) -> snap.Snapshot:
        return self.retrying(lambda: self.register_once(spec, actor))

    def deregister(self, name: str, actor: str) -> snap.Snapshot:
        return self.retrying(lambda: self.deregister_once(name, actor))

    def replace(
        self, state: RegistryState, actor: str, source: str, config_hash: str | None = None, *, validated: bool = False
    ) -> tuple[snap.Snapshot, snap.Diff]:
        return self.retrying(lambda: self.replace_once(state, actor, source, config_hash, validated=validated))

    # One attempt each (StaleVersion when another replica committed first): for `retrying*`.

    def register_once(self, spec: ServiceSpec, actor: str) -> snap.Snapshot:
        before = self.state.service(spec.name)
        others = tuple(s for s in self.state.services if s.name != spec.name)
        services = tuple(sorted((*others, spec), key=lambda s: s.name))
        action = "update_service" if before is not None else "register_service"
        change = Change(actor, action, spec.name, before=codec.dumps(before) if before else "",
                        after=codec.dumps(spec))
        return self._apply(dataclasses.replace(self.state, services=services), change)

    def deregister_once(self, name: str, actor: str) -> snap.Snapshot:
        before = self.state.service(name)
        if before is None:
            raise NotFound(name)
        services = tuple(s for s in self.state.services if s.name != name)
        change = Change(actor, "deregister_service", name, before=codec.dumps(before))
        return self._apply(dataclasses.replace(self.state, services=services), change)

    def replace_once(
        self, state: RegistryState, actor: str, source: str, config_hash: str | None = None, *, validated: bool = False
    ) -> tuple[snap.Snapshot, snap.Diff]:
        """`validated`: `state` comes from config.load_config, which ran validate_state on it.
        Then it is not run again: the state applied is `state`'s services and settings with
        this registry's tenants and keys, which passed it when they were committed, and no
        rule of validate_state looks across governance and the rest."""
        # A config file owns services and settings; tenants and keys are governed apart.
        new = dataclasses.replace(state, tenants=self.state.tenants, keys=self.state.keys)
        new = _keep_replicas(self.state, new)
        change = snap.diff(self.state, new)
        detail = f"added={list(change.added)} changed={list(change.changed)} removed={list(change.removed)}"
        applied = self._apply(new, Change(actor, "apply_config", source, detail), config_hash, validated=validated)
        return applied, change

    def change(self, state: RegistryState, change: Change) -> snap.Snapshot:
        """Apply a whole new state (validated; a new version only if it differs).

        Raises StaleVersion when `state` was derived from a version another replica has since
        replaced: wrap the derivation and this call in `retrying`."""
        return self._apply(state, change)

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        return self._store.audit(limit)

    def _apply(
        self, state: RegistryState, change: Change, config_hash: str | None = None, *, validated: bool = False
    ) -> snap.Snapshot:
        overlay = self._snapshot.overlay.pruned(state)
        # Then what agents would reject (their own checks): refused here, never committed.
        problems: list[Problem] = [] if validated else validate_state(state)
        if problems:  # (the registry's own rules, as the agents' below: only what this change brings)
            problems = left_by(problems, validate_state(self._snapshot.state), state, self._snapshot.state)
        problems = problems or introduced_problems(self._snapshot, state, overlay)
        if problems:
            raise ValidationError(problems)
        digest = snap.content_hash(state, overlay)
        if digest == self._snapshot.content_hash and config_hash in (None, self._config_hash):
            return self._snapshot  # nothing changed: no new version
        seq = self._snapshot.seq + (digest != self._snapshot.content_hash)  # a config-hash-only change keeps it
        self._snapshot = self._commit_version(state, seq, digest, change, config_hash, overlay)
        self._publish()
        return self._snapshot

    def set_overlay(self, overlay: snap.Overlay, changes: Sequence[Change]) -> snap.Snapshot | None:
        """Serve `overlay` (health, weights, alert actions) over the current state.

        A new version only when the overlay really differs; the store gets the version counter,
        the overlay and one audit row per change (the registry state itself is untouched).
        Returns None when another replica committed first: the registry then holds the newer
        version and the caller decides again on its next evaluation.
        """
        overlay = overlay.pruned(self.state)
        if overlay == self._snapshot.overlay:
            return self._snapshot
        digest = snap.content_hash(self.state, overlay)
        first, *rest = changes or [Change("controlplane", "overlay", "*")]
        try:
            self._snapshot = self._commit_version(self.state, self._snapshot.seq + 1, digest, first, None, overlay)
        except StaleVersion:
            self.refresh()
            return None
        for change in rest:
            self._store.append_audit(self._snapshot.version, change)
        self._publish()
        return self._snapshot

    def record(self, change: Change) -> None:
        """An audit row against the current version, for an event that changed nothing served."""
        self._store.append_audit(self._snapshot.version, change)

    def refuse(self, change: Change) -> None:
        """An audit row (action "refused") for a change refused before it was committed; only the
        newest MAX_REFUSED_ROWS such rows are kept."""
        self._store.append_refused(self._snapshot.version, change, MAX_REFUSED_ROWS)

    async def record_refusal(self, actor: str, operation: str, subject: str, message: str,
                             secrets: Sequence[str] = ()) -> None:
        """`refuse` on the store's thread, for a servicer that has just refused a change: the row
        says who, what (`operation subject`) and why (`message`, bounded, with any of `secrets`
        replaced). A store that fails here is logged, never turned into the caller's error."""
        change = refusal(actor, operation, subject, message, secrets)
        try:
            await self.call(lambda: self.refuse(change))
        except Exception as exc:  # the refusal itself stands; its record is best effort
            log.warning("could not record a refused %s: %s", operation, type(exc).__name__)

    def _publish(self) -> None:
        for listener, loop in self._listeners:
            call_on(loop, listener, self._snapshot)

    def _commit_version(
        self, state: RegistryState, seq: int, digest: str, change: Change, config_hash: str | None,
        overlay: snap.Overlay = snap.EMPTY_OVERLAY,
    ) -> snap.Snapshot:
        built = snap.build(state, seq, digest, overlay)
        self._store.commit(state, seq, digest, built.version, change, config_hash,
                           overlay=codec.dumps(overlay), expected_seq=self._snapshot.seq)
        if config_hash is not None:
            self._config_hash = config_hash
        return built


def refusal(actor: str, operation: str, subject: str, message: str, secrets: Sequence[str] = ()) -> Change:
    """The audit row of a refused change. The message names fields and is cut to
    MAX_REFUSAL_DETAIL characters; values in `secrets` (at least 8 characters: the environment a
    config interpolates) are replaced, so no secret reaches the store."""
    for secret in sorted((s for s in secrets if len(s) >= 8), key=len, reverse=True):
        message = message.replace(secret, "[redacted]")
    if len(message) > MAX_REFUSAL_DETAIL:
        message = message[: MAX_REFUSAL_DETAIL - 1] + "…"
    target = f"{operation} {subject}".strip()[:200]
    return Change(actor, REFUSED, target, detail=message)


def _keep_replicas(old: RegistryState, new: RegistryState) -> RegistryState:
    """`new` with the replica endpoints `old` serves for services that stay managed: they belong
    to the container manager, which adds and drains them, not to the config file."""
    services = []
    for spec in new.services:
        before = old.service(spec.name)
        replicas = () if spec.managed is None or before is None else tuple(
            e for e in before.endpoints if e.id.startswith(MANAGED_ENDPOINT_PREFIX))
        services.append(dataclasses.replace(spec, endpoints=(*spec.endpoints, *replicas)) if replicas else spec)
    return dataclasses.replace(new, services=tuple(services))


def _overlay(stored: Stored) -> snap.Overlay:
    if not stored.overlay:
        return snap.EMPTY_OVERLAY
    try:
        return codec.loads(snap.Overlay, stored.overlay)
    except (ValueError, TypeError, KeyError) as exc:  # soft state: a bad one is dropped, not fatal
        log.warning("stored overlay unreadable (%s); serving none until the monitor decides again", exc)
        return snap.EMPTY_OVERLAY
