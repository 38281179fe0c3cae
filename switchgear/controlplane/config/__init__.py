"""The unified YAML config (`config/external_services_unified.yaml`) → `RegistryState`.

Three steps (STYLE item 8):

1. **parse** — `yaml.compose` keeps every node's mark, and `parse.parse_yaml` turns the node tree into
   `Node`s that know their key path ("external_services.services.llm_services.openai") and
   1-based line. Duplicate keys, YAML syntax errors and non-mapping roots become problems.
2. **read + validate** — typed readers turn nodes into model fields, collecting *every*
   problem (unknown keys with a suggestion, wrong types, unset environment variables). While
   reading, `read.Context.locations` remembers which YAML node defined which model path
   ("services[gpt-4].endpoints[0].url"), so `validate.validate_state`'s problems are mapped
   back to a YAML path and line.
3. **default** — fields the file leaves out are simply not passed, so the model's dataclass
   defaults (the one place defaults live) apply. The only defaults here are facts about
   well-known providers: OpenAI's URL and key variable, and so on.

Secrets: an `api_key` is `${NAME}` (kept as `SecretRef(env=NAME)`, never looked up — the
control plane must not hold secret values) or `file:PATH`. Every other string may use
`${NAME}` / `${NAME:-default}` from the `env` mapping the caller passes; this module never
reads `os.environ`. Error messages quote values as written in the file, never after
interpolation, so an environment value cannot leak into one.

Modules: `parse` (YAML, its line map, the bounds on hostile YAML), `read` (the reading
context, typed leaves, settings and monitoring), `providers` (the services section); this
one puts them together. The CLI's summary of a loaded config is `switchgear.cli_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from switchgear.controlplane.config.parse import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_DURATION_S,
    MAX_FLOAT,
    MAX_INT,
    MAX_KEY_CHARS,
    MAX_NODES,
    MAX_NUMBER_CHARS,
    MAX_PROBLEMS,
    MAX_SIZE_BYTES,
    ConfigError,
    Node,
    parse_yaml,
)
from switchgear.controlplane.config.providers import read_services
from switchgear.controlplane.config.read import Context, parse_size, read_members, read_monitoring, read_settings
from switchgear.controlplane.model import RegistryState
from switchgear.controlplane.validate import Problem, validate_state

__all__ = [
    "MAX_DEPTH", "MAX_DOCUMENT_BYTES", "MAX_DURATION_S", "MAX_FLOAT", "MAX_INT", "MAX_KEY_CHARS", "MAX_NODES",
    "MAX_NUMBER_CHARS", "MAX_PROBLEMS", "MAX_SIZE_BYTES", "ConfigError", "load_config", "load_config_file",
    "parse_size", "read_config_file",
]

_TOP_SECTIONS = ("coordination", "communication", "services", "monitoring")


def _read_document(ctx: Context, root: Node) -> RegistryState:
    top = read_members(ctx, root, ("external_services",))
    body = top.get("external_services")
    if body is None:
        ctx.problem(root, "missing required key 'external_services'")
        return RegistryState()
    sections = read_members(ctx, body, _TOP_SECTIONS)
    settings = read_settings(ctx, sections.get("coordination"), sections.get("communication"))
    settings = dataclasses.replace(settings, monitoring=read_monitoring(ctx, sections.get("monitoring")))
    return RegistryState(services=read_services(ctx, sections.get("services")), settings=settings)


# --- public API -----------------------------------------------------------------------------


def load_config(
    text: str, *, source: str = "<config>", env: Mapping[str, str],
    check: Callable[[RegistryState], Iterable[Problem]] | None = None,
) -> RegistryState:
    """Parse, validate and default a config document; raise ConfigError listing every problem.

    `env` supplies ${NAME} values; os.environ is never read here. `check` adds rules on a valid
    state (the agents' own snapshot checks: controlplane/agent_check.py), placed at YAML lines.
    """
    problems: list[Problem] = []
    root = parse_yaml(text, problems)
    if root is None:
        raise ConfigError(source, problems)
    ctx = Context(env, problems)
    state = _read_document(ctx, root)
    problems.extend(ctx.to_yaml(p) for p in validate_state(state) if not ctx.is_poisoned(p.path))
    if not problems and check is not None:
        problems.extend(ctx.to_yaml(p) for p in check(state))
    if problems:
        unique = sorted(dict.fromkeys(problems), key=lambda p: p.line or 0)  # a provider's bad key shows once
        if len(unique) > MAX_PROBLEMS:
            more = Problem("", f"and {len(unique) - MAX_PROBLEMS} more problems not listed")
            unique = [*unique[:MAX_PROBLEMS], more]
        raise ConfigError(source, unique)
    return state


def read_config_file(path: str | Path) -> str:
    """A config file's text (UTF-8); ConfigError when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [Problem("", f"cannot read the file: {exc}")]) from exc


def load_config_file(
    path: str | Path, env: Mapping[str, str], check: Callable[[RegistryState], Iterable[Problem]] | None = None
) -> RegistryState:
    """load_config on a file (UTF-8); an unreadable file is a ConfigError too."""
    return load_config(read_config_file(path), source=str(path), env=env, check=check)
