"""Snapshot building: what the control plane serves to agents, decided apart from how.

Pure. A snapshot is the registry state plus a version. Versions are `"<seq>.<hash12>"`:
`seq` is a counter persisted with the state (so versions grow across restarts on the same
store) and `hash12` is the start of the state's content hash (so two control planes, or one
that lost its store, never give one version string to different content).
"""

from __future__ import annotations

from dataclasses import dataclass

from switchgear.controlplane import codec
from switchgear.controlplane.model import RegistryState


@dataclass(frozen=True)
class Snapshot:
    version: str
    seq: int
    content_hash: str
    state: RegistryState


def content_hash(state: RegistryState) -> str:
    return codec.canonical_hash(state)


def build(state: RegistryState, seq: int, digest: str | None = None) -> Snapshot:
    digest = digest or content_hash(state)
    return Snapshot(version=format_version(seq, digest), seq=seq, content_hash=digest, state=state)


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
