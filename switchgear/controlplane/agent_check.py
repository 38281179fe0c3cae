"""Refuse a change that agents would reject, before it is committed.

The registry runs `introduced_problems` on every change (register, apply config, governance),
after its own validation: it turns the state the change would serve into the snapshot's wire
form and runs on it the checks agents run on every snapshot (`switchgear.wire.checks`, with the
adapters this build ships, so their option schemas are the agents'). Each problem names the
field path inside the snapshot ("services[chat].options_json.chat_pth"); the servicers answer
INVALID_ARGUMENT with it, and nothing is committed.

A change is refused only for problems it introduces: a registry stored by an older build may
already hold something agents reject (they report it per service and serve everything else),
and that must not block every unrelated change until someone finds it.

Per-service results are memoised on the immutable spec, so a change re-checks only the
services it touched (bench/controlplane registers into 10,000 endpoints).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from switchgear.adapters import builtin_adapters
from switchgear.adapters.base import Adapter, OptionsError
from switchgear.controlplane import convert
from switchgear.controlplane import snapshot as snap
from switchgear.controlplane.convert_governance import governance_for_snapshot
from switchgear.controlplane.model import RegistryState, ServiceSpec
from switchgear.controlplane.validate import Problem
from switchgear.wire import checks


@functools.cache
def _parsers() -> Mapping[str, Adapter]:
    """The adapters an agent of this build has: their `parse_options` are the option schemas."""
    return builtin_adapters()


@functools.lru_cache(maxsize=65536)  # above any registry's service count: a warm check is ~2 µs a service
def _service_problem(spec: ServiceSpec) -> Problem | None:
    """What an agent would reject in one service as `convert` serves it (fallbacks aside)."""
    rejected = checks.check_services([convert.service_to_proto(spec)], _parsers()).rejected
    return next((Problem(e.path, e.message) for e in rejected.values()), None)


def agent_problems(state: RegistryState, overlay: snap.Overlay = snap.EMPTY_OVERLAY) -> list[Problem]:
    """Everything an agent of this build would reject in the snapshot of `state` + `overlay`."""
    served = tuple(s for s in state.services if s.endpoints)  # as convert.snapshot_to_proto serves them
    problems = [p for p in map(_service_problem, served) if p is not None]
    bad = {p.path.split("]", 1)[0].removeprefix("services[") for p in problems}
    known = {s.name for s in state.services} - bad
    for spec in served:
        served_as = overlay.service(spec.name)
        fallbacks = served_as.fallbacks if served_as is not None and served_as.fallbacks is not None \
            else spec.fallbacks
        problem = None if spec.name in bad else checks.fallback_problem(spec.name, fallbacks, known)
        if problem is not None:
            missing = fallbacks[int(problem.path.rsplit("[", 1)[1].rstrip("]"))]
            message = f"falls back to {missing!r}, which agents reject" if missing in bad else problem.message
            problems.append(Problem(problem.path, message))
    problems += _scope_collisions(state, bad)
    try:
        checks.check_settings(convert.settings_to_proto(state.settings))
    except checks.SnapshotError as exc:
        problems.append(Problem(exc.path, exc.message))
    try:
        checks.check_governance(*governance_for_snapshot(state))
    except checks.SnapshotError as exc:
        problems.append(Problem(exc.path, exc.message))
    return problems


def _scope_collisions(state: RegistryState, bad: set[str]) -> list[Problem]:
    """A vector service scoped per tenant (`database_scope` / `namespace_scope: tenant`) whose
    derived name for some tenant is the one calls without a tenant reach: that tenant would read
    and write the operator's data there (scope_prefix "default_" and a tenant named "database"
    give Chroma's "default_database")."""
    tenants = [t.id for t in state.tenants]
    if not tenants:
        return []
    problems: list[Problem] = []
    for spec in state.services:
        if spec.name in bad or spec.protocol not in ("chroma", "pinecone"):
            continue
        for path, options in _scoped_options(spec):
            shared, what = ((options.database, "database") if spec.protocol == "chroma"
                            else (options.namespace, "namespace"))
            derive = options.database_for if spec.protocol == "chroma" else options.namespace_for
            clash = next((t for t in tenants if derive(t) == shared), None)
            if clash is not None:
                problems.append(Problem(
                    f"services[{spec.name}].{path}scope_prefix",
                    f"tenant {clash!r} would reach {what} {shared!r}, the one calls without a tenant reach: "
                    f"change scope_prefix or the {what}"))
                break
    return problems


@functools.lru_cache(maxsize=4096)
def _scoped_options(spec: ServiceSpec) -> tuple[tuple[str, Any], ...]:
    """(path prefix, parsed options) of a vector service and of each target with options of its
    own, those scoped per tenant only (memoised on the immutable spec, as _service_problem)."""
    parser = _parsers()[spec.protocol]
    found = []
    for path, text in (("options_json.", spec.options_json),
                       *((f"endpoints[{i}].options_json.", e.options_json)
                         for i, e in enumerate(spec.endpoints) if e.options_json)):
        try:
            options = parser.parse_options(json.loads(text or "{}"))
        except (ValueError, OptionsError):  # (malformed: the per-service check's problem, reported already)
            continue
        if getattr(options, "tenant_scoped", False):
            found.append((path, options))
    return tuple(found)


def introduced_problems(current: snap.Snapshot, state: RegistryState, overlay: snap.Overlay) -> list[Problem]:
    """The problems of `state` except those the `current` snapshot already has in a part (a
    service, the settings, the tenants and keys) that the change leaves as it was."""
    problems = agent_problems(state, overlay)
    if not problems:
        return problems
    return left_by(problems, agent_problems(current.state, current.overlay), state, current.state)


def left_by(problems: list[Problem], before: list[Problem], state: RegistryState,
            current: RegistryState) -> list[Problem]:
    """`problems` of `state` except those `current` already had (`before`) in a part the change
    leaves as it was: a value an older build accepted (or an older rule let through) blocks a
    change to its own part, never an unrelated one."""
    had = set(before)
    return [p for p in problems if p not in had or _part(state, p.path) != _part(current, p.path)]


def _part(state: RegistryState, path: str) -> object:
    """The part of `state` a snapshot path lies in."""
    if path.startswith("services["):
        return state.service(path.removeprefix("services[").split("]", 1)[0])
    if path.startswith("settings"):
        return state.settings
    return (state.tenants, state.keys)
