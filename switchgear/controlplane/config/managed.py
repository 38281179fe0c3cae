"""A service's `managed:` block: the model server Switchgear runs (model.ManagedSpec).

Every key is read into one ManagedSpec field or refused at its line; the rules across keys
(min <= max, thresholds in order, ...) are containers.managed_problems, placed at the key's line
through the model path "managed.<section>.<key>". `${PORT}` and `${HOST}` are left for the agent to
fill with the port it assigns and its `--managed-host`; every other `${NAME}` is interpolated as
anywhere in the file.
"""

from __future__ import annotations

import collections
from typing import Any

from switchgear.controlplane.config.parse import Node
from switchgear.controlplane.config.read import (
    Context,
    Reader,
    read_duration,
    read_float,
    read_int,
    read_members,
    read_metadata,
    read_size,
    read_str,
    read_str_tuple,
    shown,
)
from switchgear.controlplane.model import ManagedSpec

#: (section or "", YAML key, ManagedSpec field, reader). The model path is managed.[section.]key.
_KEYS: tuple[tuple[str, str, str, Reader[Any]], ...] = (
    ("", "backend", "backend", read_str),
    ("", "image", "image", read_str),
    ("", "volumes", "volumes", read_str_tuple),
    ("", "command", "command", read_str_tuple),
    ("", "inherit_env", "inherit_env", read_str_tuple),
    ("", "port", "port", read_int),
    ("", "url", "url", read_str),
    ("", "concurrency", "concurrency", read_int),
    ("", "stop_grace", "stop_grace_s", read_duration),
    ("", "drain_timeout", "drain_timeout_s", read_duration),
    ("", "log_bytes", "log_bytes", read_size),
    ("readiness", "path", "readiness_path", read_str),
    ("readiness", "timeout", "readiness_timeout_s", read_duration),
    ("resources", "cpu", "cpu", read_float),
    ("resources", "memory", "memory_bytes", read_size),
    ("resources", "gpu", "gpu", read_float),
    ("replicas", "min", "min_replicas", read_int),
    ("replicas", "max", "max_replicas", read_int),
    ("scaling", "scale_up_utilization", "scale_up_utilization", read_float),
    ("scaling", "scale_down_utilization", "scale_down_utilization", read_float),
    ("scaling", "scale_up_window", "scale_up_window_s", read_duration),
    ("scaling", "scale_down_window", "scale_down_window_s", read_duration),
    ("restart", "backoff", "restart_backoff_s", read_duration),
    ("restart", "max_backoff", "restart_max_backoff_s", read_duration),
    ("restart", "max_crashes", "max_crashes", read_int),
    ("restart", "crash_window", "crash_window_s", read_duration),
)
_SECTIONS = frozenset(section for section, *_ in _KEYS if section)
_TOP = frozenset(key for section, key, *_ in _KEYS if not section) | _SECTIONS | {"env"}


def read_managed(ctx: Context, node: Node) -> ManagedSpec | None:
    """The block as a ManagedSpec; None (with problems recorded) when it cannot be built."""
    ctx.locate("managed", node)
    if not isinstance(node.value, dict):
        ctx.problem(node, f"expected a mapping describing the server to run, got {shown(node)}")
        return None
    left = {"PORT": "${PORT}", "HOST": "${HOST}"}  # for the agent to fill in
    scope = Context(collections.ChainMap(left, dict(ctx.env)), ctx.problems, ctx.strict_env, ctx.locations,
                    ctx.poisoned)
    top = read_members(scope, node, _TOP)
    fixed = top.get("replicas")
    if fixed is not None and not isinstance(fixed.value, (dict, type(None))):  # replicas: N
        top = {k: v for k, v in top.items() if k != "replicas"}
    sections = {name: read_members(scope, top.get(name), {k for s, k, *_ in _KEYS if s == name})
                for name in _SECTIONS}
    if fixed is not None and "replicas" not in top:
        sections["replicas"] = {"min": fixed, "max": fixed}
    fields: dict[str, Any] = {}
    for section, key, target, reader in _KEYS:
        child = (sections.get(section, {}) if section else top).get(key)
        value = None if child is None else scope.read(child, f"managed.{section + '.' if section else ''}{key}", reader)
        if value is not None:
            fields[target] = value
    if "env" in top:
        env = scope.read(top["env"], "managed.env", read_metadata)
        fields["env"] = tuple(sorted((env or {}).items()))
    if "command" not in fields and "image" not in fields:
        if "command" not in top and "image" not in top:
            ctx.problem(node, "missing required key 'command' (or 'image' with backend: docker)")
        return None
    return ManagedSpec(**fields)
