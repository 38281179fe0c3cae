"""Step 2, read: typed readers turn `Node`s into model fields, collecting every problem.

`Context` carries the reading state of one document (problems, where each model path came
from, what could not be read); `${NAME}` interpolation, the typed leaf readers, the table-
driven sections (`Leaf`) and the settings and monitoring sections live here. The services
section, with its providers, is providers.py.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any, TypeVar

from switchgear.adapters.base import MAX_RESPONSE_LIMIT_BYTES
from switchgear.controlplane.config.parse import (
    MAX_DURATION_S,
    MAX_FLOAT,
    MAX_INT,
    MAX_NUMBER_CHARS,
    MAX_SIZE_BYTES,
    Node,
    shorten,
)
from switchgear.controlplane.model import (
    CACHE_TTL_KINDS,
    AlertRuleSpec,
    CacheSettings,
    Category,
    CategoryPolicy,
    CircuitBreakerSettings,
    FallbackConfig,
    MonitoringSettings,
    ResourceAllocationSettings,
    RetryPolicy,
    SecretRef,
    ServiceDiscoverySettings,
    Settings,
    canonical_strategy,
)
from switchgear.controlplane.validate import Problem

_T = TypeVar("_T")

class _Bad(Exception):
    """A value that cannot be read; the message says what was expected."""


class _MissingEnv(_Bad):
    """An unset environment variable (not an error inside a disabled service)."""


Reader = Callable[["Context", Node], _T]


@dataclass
class Context:
    """Reading state for one document (or one service within it).

    `problems` is shared by a document and its service contexts. `locations` maps a model
    path to the YAML (path, line) that defined it; `poisoned` holds model paths whose value
    was unreadable, so validation does not report their knock-on effects a second time.
    `strict_env` is False inside a disabled service: there an unset variable is no error.
    """

    env: Mapping[str, str]
    problems: list[Problem]
    strict_env: bool = True
    locations: dict[str, tuple[str, int]] = field(default_factory=dict)
    poisoned: set[str] = field(default_factory=set)

    def child(self, strict_env: bool) -> Context:
        return Context(self.env, self.problems, strict_env)

    def problem(self, node: Node, message: str) -> None:
        self.problems.append(Problem(node.path, message, node.line))

    def locate(self, model_path: str, node: Node) -> None:
        self.locations[model_path] = (node.path, node.line)

    def read(self, node: Node, model_path: str, reader: Reader[_T]) -> _T | None:
        """`reader(node)`, recording where `model_path` came from; None (and a problem) if bad."""
        self.locate(model_path, node)
        if isinstance(node.value, list):
            for index, item in enumerate(node.value):
                self.locate(f"{model_path}[{index}]", item)
        try:
            return reader(self, node)
        except _Bad as bad:
            self.poisoned.add(model_path)
            if self.strict_env or not isinstance(bad, _MissingEnv):
                self.problem(node, str(bad))
            return None

    def text(self, node: Node) -> str:
        """A scalar as text, with ${NAME} and ${NAME:-default} filled in from env."""
        if isinstance(node.value, str):
            return _interpolate(node.value, self.env)
        return node.raw

    def to_yaml(self, problem: Problem) -> Problem:
        """A validation problem at the YAML node that defined its model path (or an ancestor)."""
        path = problem.path
        while path:
            where = self.locations.get(path)
            if where is not None:
                message = problem.message if path == problem.path else f"{problem.message} ({problem.path})"
                return Problem(where[0], message, where[1])
            path = _parent(path)
        return problem

    def is_poisoned(self, path: str) -> bool:
        """True when `path` is, contains or lies under a value that could not be read."""
        return any(_related(path, bad) for bad in self.poisoned)


def _parent(path: str) -> str:
    """The parent of a model path: a.b[1] -> a.b -> a; services[gpt-3.5-turbo] -> services."""
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path[: max(path.rfind("."), 0)]


def _related(a: str, b: str) -> bool:
    def under(x: str, y: str) -> bool:
        return x.startswith(y + ".") or x.startswith(y + "[")

    return a == b or under(a, b) or under(b, a)


def join_path(prefix: str, path: str) -> str:
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


_REFERENCE = re.compile(r"\$\{([^{}]*)\}")
_REFERENCE_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.S)


def _interpolate(text: str, env: Mapping[str, str]) -> str:
    """Fill ${NAME} and ${NAME:-default} (default also when NAME is empty, as in sh).

    Raises _MissingEnv for an unset NAME without a default, _Bad for a malformed reference.
    """
    out: list[str] = []
    position = 0
    for match in _REFERENCE.finditer(text):
        out.append(_literal(text[position : match.start()]))
        out.append(_resolve(match.group(1), env))
        position = match.end()
    out.append(_literal(text[position:]))
    return "".join(out)


def _literal(segment: str) -> str:
    if "${" in segment:
        raise _Bad("unterminated ${ reference; use ${NAME} or ${NAME:-default}")
    return segment


def _resolve(body: str, env: Mapping[str, str]) -> str:
    parsed = _REFERENCE_BODY.fullmatch(body)
    if parsed is None:
        raise _Bad(f"invalid reference ${{{body}}}; use ${{NAME}} or ${{NAME:-default}}")
    name, default = parsed.group(1), parsed.group(2)
    value = env.get(name)
    if default is not None and not value:
        return default
    if value is None:
        raise _MissingEnv(f"environment variable {name} is not set (give a default with ${{{name}:-...}})")
    return value


# --- typed readers: (context, node) -> value, raising _Bad ----------------------------------


def shown(node: Node) -> str:
    """How an unreadable value is quoted in a message: as written, shortened."""
    if isinstance(node.value, dict):
        return "a mapping"
    if isinstance(node.value, list):
        return "a list"
    if node.value is None:
        return "nothing (null)"
    text = node.raw
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _number_text(ctx: Context, node: Node) -> str | None:
    """The text of a number written as a string ("${PORT}", "3e-5"), else None; _Bad when it
    is longer than any number we take (int() and float() of it could overflow or be slow)."""
    if not isinstance(node.value, str):
        return None
    text = ctx.text(node).strip()
    if len(text) > MAX_NUMBER_CHARS:
        raise _Bad(f"expected a number of at most {MAX_NUMBER_CHARS} characters, got {shown(node)}")
    return text


def _bounded_int(value: int) -> int:
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise _Bad(f"must be an integer from {-MAX_INT - 1} to {MAX_INT}")
    return value


def _bounded_float(value: float, limit: float = MAX_FLOAT, what: str = "a finite number") -> float:
    if not (math.isfinite(value) and abs(value) <= limit):
        raise _Bad(f"must be {what} of at most {limit:g}")
    return value


_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def read_int(ctx: Context, node: Node) -> int:
    """An integer, or a string that is one."""
    if isinstance(node.value, int) and not isinstance(node.value, bool):
        return _bounded_int(node.value)
    text = _number_text(ctx, node)
    if text is not None and _INT_RE.fullmatch(text):
        return _bounded_int(int(text))
    raise _Bad(f"expected an integer, got {shown(node)}")


def read_float(ctx: Context, node: Node) -> float:
    """A number, or a string that is one (YAML 1.1 reads 3e-5 as a string)."""
    if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return _bounded_float(float(node.value))
    text = _number_text(ctx, node)
    if text is not None and _FLOAT_RE.fullmatch(text):
        return _bounded_float(float(text))
    raise _Bad(f"expected a number, got {shown(node)}")


def read_bool(ctx: Context, node: Node) -> bool:
    """true or false."""
    if isinstance(node.value, bool):
        return node.value
    text = ctx.text(node).strip().lower() if isinstance(node.value, str) else ""
    if text in ("true", "false"):
        return text == "true"
    raise _Bad(f"expected true or false, got {shown(node)}")


def read_str(ctx: Context, node: Node) -> str:
    """A string (numbers are taken as written)."""
    if isinstance(node.value, bool) or node.value is None or isinstance(node.value, (dict, list)):
        raise _Bad(f"expected a string, got {shown(node)}")
    return ctx.text(node)


def read_strategy(ctx: Context, node: Node) -> str:
    """A strategy name; the seed's other names for one (weighted_round_robin, least_connections,
    least_response_time, latency_optimized: model.STRATEGY_ALIASES) become the name they stand
    for. Unknown names are left to validation, which lists the known ones."""
    return canonical_strategy(read_str(ctx, node))


def read_str_tuple(ctx: Context, node: Node) -> tuple[str, ...]:
    """A list of strings."""
    if not isinstance(node.value, list):
        raise _Bad(f"expected a list of strings, got {shown(node)}")
    out: list[str] = []
    for index, item in enumerate(node.value):
        try:
            out.append(read_str(ctx, item))
        except _Bad as bad:
            raise type(bad)(f"item [{index}]: {bad}") from None
    return tuple(out)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = MappingProxyType({"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0})


def read_duration(ctx: Context, node: Node) -> float:
    """Seconds: a plain number, or a string like "300ms", "5s", "2m", "1h", "7d"; at most 366 days."""
    if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        seconds = float(node.value)
    else:
        text = _number_text(ctx, node)
        parsed = _DURATION_RE.fullmatch(text) if text is not None else None
        if parsed is None:
            raise _Bad(
                f"expected a duration in seconds (30) or with a unit (300ms, 5s, 2m, 1h, 7d), got {shown(node)}"
            )
        seconds = float(parsed.group(1)) * _DURATION_UNITS[parsed.group(2)]
    return _bounded_float(seconds, MAX_DURATION_S, "a finite duration in seconds")


def read_set_delay(ctx: Context, node: Node) -> float:
    """A retry delay > 0: leaving the key out is how to ask for the category's default."""
    seconds = read_duration(ctx, node)
    if seconds <= 0:
        raise _Bad("must be > 0 (leave the key out for the call's category's default delay)")
    return seconds


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kKMGTPE])(i?))?B?")
_SIZE_POWERS = MappingProxyType({"k": 1, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6})


def parse_size(text: str) -> int | None:
    """Bytes from "4Gi" (1024-based), "2G" / "50MB" (1000-based) or "512"; None if not a size
    (or written with more than MAX_NUMBER_CHARS characters). Exact: no float overflow."""
    text = text.strip()
    parsed = _SIZE_RE.fullmatch(text) if len(text) <= MAX_NUMBER_CHARS else None
    if parsed is None:
        return None
    number, unit, binary = parsed.groups()
    base = 1024 if binary else 1000
    multiplier: int = base ** _SIZE_POWERS.get(unit or "", 0)
    return round(Fraction(number) * multiplier)


def size_text(value: int) -> str:
    """Bytes as the largest binary unit that divides them whole: 4Mi, 1536B."""
    for suffix, power in (("Ti", 4), ("Gi", 3), ("Mi", 2), ("Ki", 1)):
        if value and value % 1024**power == 0:
            return f"{value // 1024**power}{suffix}"
    return f"{value}B"


def read_size(ctx: Context, node: Node) -> int:
    """Bytes: a plain integer, or a string like "4Gi", "512Mi", "2G", "50MB"; at most 1 EiB."""
    if isinstance(node.value, int) and not isinstance(node.value, bool):
        size: int | None = node.value
    else:
        size = parse_size(ctx.text(node)) if isinstance(node.value, str) else None
    if size is None:
        raise _Bad(f"expected a size like 4Gi, 512Mi, 2G, 50MB or a number of bytes, got {shown(node)}")
    if not 0 <= size <= MAX_SIZE_BYTES:
        raise _Bad(f"must be a size from 0 to {MAX_SIZE_BYTES} bytes (1Ei), got {shown(node)}")
    return size


_SECRET_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LITERAL_SECRET = "literal secrets are not allowed; use ${VAR} or file:PATH"


def read_secret(ctx: Context, node: Node) -> SecretRef:
    """ "${NAME}" -> SecretRef(env=NAME), never looked up; "file:PATH" -> SecretRef(file=PATH).

    Anything else is a literal secret and an error whose message never repeats the value.
    PATH is kept as written, not interpolated: the agent reads it on its own host.
    """
    text = node.value if isinstance(node.value, str) else ""
    env_ref = _SECRET_ENV_RE.fullmatch(text.strip())
    if env_ref is not None:
        return SecretRef(env=env_ref.group(1))
    if text.startswith("file:") and len(text) > len("file:"):
        return SecretRef(file=text[len("file:") :])
    raise _Bad(_LITERAL_SECRET)


def read_response_limit(ctx: Context, node: Node) -> int:
    """A per-service cap on an upstream answer: a size from 1 byte to MAX_RESPONSE_LIMIT_BYTES."""
    size = read_size(ctx, node)
    if not 1 <= size <= MAX_RESPONSE_LIMIT_BYTES:
        raise _Bad(f"must be a size from 1 byte to {size_text(MAX_RESPONSE_LIMIT_BYTES)}, got {shown(node)}")
    return size


def _plain(ctx: Context, node: Node) -> Any:
    """A node as plain JSON-able data, strings interpolated; _Bad for inf/nan (JSON has none)."""
    if isinstance(node.value, dict):
        return {key: _plain(ctx, child) for key, child in node.value.items()}
    if isinstance(node.value, list):
        return [_plain(ctx, item) for item in node.value]
    if isinstance(node.value, float) and not math.isfinite(node.value):
        raise _Bad(f"{node.path}: {shown(node)} is not a finite number")
    return ctx.text(node) if isinstance(node.value, str) else node.value


def read_options(ctx: Context, node: Node) -> dict[str, Any]:
    """A mapping of adapter options (any JSON-able values)."""
    if not isinstance(node.value, dict):
        raise _Bad(f"expected a mapping of options, got {shown(node)}")
    options: dict[str, Any] = _plain(ctx, node)
    return options


def _metadata_text(ctx: Context, node: Node) -> str:
    """A metadata value as a string; lists are joined with ","."""
    if isinstance(node.value, list):
        return ",".join(_metadata_text(ctx, item) for item in node.value)
    if isinstance(node.value, dict):
        raise _Bad(f"expected a string or a list of strings, got {shown(node)}")
    if isinstance(node.value, bool):
        return "true" if node.value else "false"
    return "" if node.value is None else ctx.text(node)


def read_metadata(ctx: Context, node: Node) -> dict[str, str]:
    """A mapping of descriptive facts; values become strings."""
    if not isinstance(node.value, dict):
        raise _Bad(f"expected a mapping, got {shown(node)}")
    return {key: _metadata_text(ctx, child) for key, child in node.value.items()}


# --- mappings and tables of keys ------------------------------------------------------------


def _unknown_key(key: str, allowed: Collection[str]) -> str:
    """'unknown key' with the closest known key, or the list of known keys."""
    close = difflib.get_close_matches(key, sorted(allowed), n=1) if len(key) <= 64 else []
    if close:
        return f"unknown key {shorten(key, 60)!r}; did you mean {close[0]!r}?"
    return f"unknown key {shorten(key, 60)!r}; expected one of: {', '.join(sorted(allowed))}"


def read_members(ctx: Context, node: Node | None, allowed: Collection[str] | None) -> dict[str, Node]:
    """A mapping node's children, reporting unknown keys (any key goes when allowed is None).

    A missing or empty (null) section is an empty mapping.
    """
    if node is None or node.value is None:
        return {}
    if not isinstance(node.value, dict):
        ctx.problem(node, f"expected a mapping, got {shown(node)}")
        return {}
    if allowed is None:
        return dict(node.value)
    for key, child in node.value.items():
        if key not in allowed:
            ctx.problem(child, _unknown_key(key, allowed))
    return {key: child for key, child in node.value.items() if key in allowed}


@dataclass(frozen=True)
class Leaf:
    """One YAML key read into one model field (`target` is the model path under a prefix)."""

    key: str
    target: str
    read: Reader[Any]


def read_leaves(
    ctx: Context, node: Node | None, leaves: tuple[Leaf, ...], prefix: str, also: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Node]]:
    """Read a mapping's leaves into {target: value}; `also` names allowed non-leaf keys."""
    members = read_members(ctx, node, [leaf.key for leaf in leaves] + list(also))
    values: dict[str, Any] = {}
    for leaf in leaves:
        child = members.get(leaf.key)
        if child is not None:
            value = ctx.read(child, prefix + leaf.target, leaf.read)
            if value is not None:
                values[leaf.target] = value
    return values, members


# --- settings -------------------------------------------------------------------------------

_SERVICE_DISCOVERY = (
    Leaf("cache_ttl", "service_discovery.cache_ttl_s", read_duration),
    Leaf("health_check_interval", "service_discovery.health_check_interval_s", read_duration),
    Leaf("failover_threshold", "service_discovery.failover_threshold", read_int),
)
_RESOURCE_ALLOCATION = (
    Leaf("default_cpu", "resource_allocation.default_cpu", read_float),
    Leaf("default_memory", "resource_allocation.default_memory_bytes", read_size),
    Leaf("max_concurrent_tasks", "resource_allocation.max_concurrent_tasks", read_int),
    Leaf("task_retention", "resource_allocation.task_retention_s", read_duration),
    Leaf("max_tasks_per_tenant", "resource_allocation.max_tasks_per_tenant", read_int),
    Leaf("max_blobs_per_tenant", "resource_allocation.max_blobs_per_tenant", read_int),
    Leaf("max_blob_bytes_per_tenant", "resource_allocation.max_blob_bytes_per_tenant", read_size),
    Leaf("max_finished_tasks_per_tenant", "resource_allocation.max_finished_tasks_per_tenant", read_int),
)
_LOAD_BALANCING = (
    Leaf("default_strategy", "default_strategy", read_strategy),
    Leaf("health_check_timeout", "health_check_timeout_s", read_duration),
    Leaf("circuit_breaker_threshold", "circuit_breaker.failure_threshold", read_int),
)
_RETRY_POLICY = (
    Leaf("max_retries", "retry_policy.max_retries", read_int),
    Leaf("backoff_strategy", "retry_policy.backoff_strategy", read_str),
    Leaf("base_delay", "retry_policy.base_delay_s", read_set_delay),
    Leaf("max_delay", "retry_policy.max_delay_s", read_set_delay),
)
_CACHING = (Leaf("enabled", "cache.enabled", read_bool),)
_COMMUNICATION = (Leaf("default_timeout", "default_timeout_s", read_duration),)
_POLICY = (
    Leaf("strategy", "strategy", read_strategy),
    Leaf("max_cost_per_request", "max_cost_per_request", read_float),
    Leaf("min_success_rate", "min_success_rate", read_float),
    Leaf("max_queue_size", "max_queue_size", read_int),
    Leaf("timeout", "timeout_s", read_duration),
    Leaf("attempt_timeout_floor", "attempt_timeout_floor_s", read_duration),
    Leaf("attempt_timeout_ceiling", "attempt_timeout_ceiling_s", read_duration),
    Leaf("attempt_timeout_factor", "attempt_timeout_factor", read_float),
    Leaf("hedge_min_priority", "hedge_min_priority", read_int),
    Leaf("overload_threshold", "overload_threshold", read_float),
    Leaf("underload_threshold", "underload_threshold", read_float),
    Leaf("stream_upstream", "stream_upstream", read_bool),
)

#: scheduling_policies keys (the seed's names) -> Category values.
_POLICY_GROUPS = MappingProxyType(
    {
        "llm_services": Category.LLM.value,
        "document_processing": Category.DOCUMENT.value,
        "knowledge_graph": Category.KNOWLEDGE_GRAPH.value,
        "vector_databases": Category.VECTOR_DB.value,
        "embedding_services": Category.EMBEDDING.value,
    }
)
_SETTINGS = "settings."


def _read_policies(ctx: Context, node: Node | None) -> dict[str, CategoryPolicy]:
    """coordination.scheduling_policies: one CategoryPolicy per category."""
    policies: dict[str, CategoryPolicy] = {}
    for key, child in read_members(ctx, node, tuple(_POLICY_GROUPS)).items():
        prefix = f"{_SETTINGS}category_policies[{_POLICY_GROUPS[key]}]"
        ctx.locate(prefix, child)
        values, _ = read_leaves(ctx, child, _POLICY, prefix + ".")
        policies[_POLICY_GROUPS[key]] = CategoryPolicy(**values)
    return policies


def _read_ttl(ctx: Context, node: Node | None) -> dict[str, float]:
    """communication.caching.ttl: {kind: seconds}, kind one of CACHE_TTL_KINDS."""
    ttl: dict[str, float] = {}
    for kind, child in read_members(ctx, node, CACHE_TTL_KINDS).items():
        value = ctx.read(child, f"{_SETTINGS}cache.ttl_s[{kind}]", read_duration)
        if value is not None:
            ttl[kind] = value
    return ttl


def _read_coordination(ctx: Context, node: Node | None) -> tuple[dict[str, Any], dict[str, CategoryPolicy]]:
    sections = read_members(ctx, node, ("service_discovery", "resource_allocation", "scheduling_policies"))
    flat, _ = read_leaves(ctx, sections.get("service_discovery"), _SERVICE_DISCOVERY, _SETTINGS)
    flat |= read_leaves(ctx, sections.get("resource_allocation"), _RESOURCE_ALLOCATION, _SETTINGS)[0]
    return flat, _read_policies(ctx, sections.get("scheduling_policies"))


def _read_presets(ctx: Context, node: Node | None) -> dict[str, str] | None:
    """communication.fallback.preset_responses: {category: answer text}; None when absent."""
    fallback = read_members(ctx, node, ("preset_responses",))
    presets_node = fallback.get("preset_responses")
    if presets_node is None:
        return None
    presets: dict[str, str] = {}
    for category, child in read_members(ctx, presets_node, tuple(c.value for c in Category)).items():
        text = ctx.read(child, f"{_SETTINGS}fallback.preset_responses[{category}]", read_str)
        if text is not None:
            presets[category] = text
    return presets


def _read_communication(
    ctx: Context, node: Node | None
) -> tuple[dict[str, Any], dict[str, float], dict[str, str] | None]:
    flat, sections = read_leaves(
        ctx, node, _COMMUNICATION, _SETTINGS, also=("load_balancing", "caching", "retry_policy", "fallback")
    )
    flat |= read_leaves(ctx, sections.get("load_balancing"), _LOAD_BALANCING, _SETTINGS)[0]
    flat |= read_leaves(ctx, sections.get("retry_policy"), _RETRY_POLICY, _SETTINGS)[0]
    cache, caching = read_leaves(ctx, sections.get("caching"), _CACHING, _SETTINGS, also=("ttl",))
    return flat | cache, _read_ttl(ctx, caching.get("ttl")), _read_presets(ctx, sections.get("fallback"))


def section(flat: dict[str, Any], name: str) -> dict[str, Any]:
    """The fields of one nested settings object, from flat "name.field" keys."""
    return {key.split(".", 1)[1]: value for key, value in flat.items() if key.startswith(name + ".")}


def _assemble_settings(
    flat: dict[str, Any], ttl: dict[str, float], policies: dict[str, CategoryPolicy],
    presets: dict[str, str] | None = None,
) -> Settings:
    """Settings from the values the file gave; the model supplies every other default.

    TTLs and preset responses given in the file are merged over the defaults rather than
    replacing them (a preset of "" turns a category's default off).
    """
    cache = section(flat, "cache")
    if ttl:
        cache["ttl_s"] = tuple(sorted({**dict(CacheSettings().ttl_s), **ttl}.items()))
    fallback = FallbackConfig()
    if presets:
        fallback = FallbackConfig(tuple(sorted({**dict(fallback.preset_responses), **presets}.items())))
    return Settings(
        fallback=fallback,
        **{key: value for key, value in flat.items() if "." not in key},
        retry_policy=RetryPolicy(**section(flat, "retry_policy")),
        circuit_breaker=CircuitBreakerSettings(**section(flat, "circuit_breaker")),
        cache=CacheSettings(**cache),
        category_policies=tuple(sorted(policies.items())),
        service_discovery=ServiceDiscoverySettings(**section(flat, "service_discovery")),
        resource_allocation=ResourceAllocationSettings(**section(flat, "resource_allocation")),
    )


def read_settings(ctx: Context, coordination: Node | None, communication: Node | None) -> Settings:
    flat, policies = _read_coordination(ctx, coordination)
    more, ttl, presets = _read_communication(ctx, communication)
    return _assemble_settings(flat | more, ttl, policies, presets)


# --- monitoring (external_services.monitoring) ----------------------------------------------

_MONITORING = (
    Leaf("report_interval", "report_interval_s", read_duration),
    Leaf("health_window", "health_window_s", read_duration),
    Leaf("alert_window", "alert_window_s", read_duration),
    Leaf("health_debounce", "health_debounce_s", read_duration),
    Leaf("breaker_threshold", "breaker_threshold", read_int),
)
_ALERT_RULE = (
    Leaf("condition", "condition", read_str),
    Leaf("severity", "severity", read_str),
    Leaf("action", "action", read_str),
    Leaf("for", "for_s", read_duration),
    Leaf("clear_for", "clear_for_s", read_duration),
    Leaf("hysteresis", "hysteresis", read_float),
    Leaf("min_requests", "min_requests", read_int),
)
_MONITORING_PREFIX = _SETTINGS + "monitoring."


def read_monitoring(ctx: Context, node: Node | None) -> MonitoringSettings:
    """monitoring: intervals and windows, and alert_rules (name -> rule; the seed's four when
    the key is absent, exactly the rules given when present)."""
    from switchgear.controlplane.alerts import RuleError, check_rule, rules_from_settings

    flat, sections = read_leaves(ctx, node, _MONITORING, _MONITORING_PREFIX, also=("alert_rules",))
    rules_node = sections.get("alert_rules")
    if rules_node is None:
        return MonitoringSettings(**flat)
    rules: list[AlertRuleSpec] = []
    for name, child in read_members(ctx, rules_node, None).items():
        prefix = f"{_MONITORING_PREFIX}alert_rules[{name}]"
        values, members = read_leaves(ctx, child, _ALERT_RULE, prefix + ".")
        if "condition" not in values:
            if "condition" not in members:
                ctx.problem(child, "missing required key 'condition'")
            continue
        spec = AlertRuleSpec(name=name, **values)
        try:
            check_rule(rules_from_settings([spec])[0])
        except RuleError as exc:
            ctx.problem(members.get(exc.path, child), exc.message)
            continue
        rules.append(spec)
    return MonitoringSettings(**flat, alert_rules=tuple(rules))


# --- services -------------------------------------------------------------------------------
