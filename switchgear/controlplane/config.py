"""The unified YAML config (`config/external_services_unified.yaml`) → `RegistryState`.

Three steps (STYLE item 8):

1. **parse** — `yaml.compose` keeps every node's mark, and `_parse` turns the node tree into
   `_Node`s that know their key path ("external_services.services.llm_services.openai") and
   1-based line. Duplicate keys, YAML syntax errors and non-mapping roots become problems.
2. **read + validate** — typed readers turn nodes into model fields, collecting *every*
   problem (unknown keys with a suggestion, wrong types, unset environment variables). While
   reading, `_Context.locations` remembers which YAML node defined which model path
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
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import orjson
import yaml
from yaml.constructor import SafeConstructor

from switchgear.adapters.base import MAX_RESPONSE_LIMIT_BYTES, RESPONSE_LIMIT_OPTIONS
from switchgear.controlplane.model import (
    AlertRuleSpec,
    CacheSettings,
    Category,
    CategoryPolicy,
    CircuitBreakerSettings,
    EndpointSpec,
    MonitoringSettings,
    Pricing,
    RegistryState,
    ResourceAllocationSettings,
    RetryPolicy,
    SecretRef,
    ServiceDiscoverySettings,
    ServiceSpec,
    Settings,
)
from switchgear.controlplane.validate import Problem, validate_state
from switchgear.wire.attempt_policy import NEVER, hedging_for, timeouts_for

_T = TypeVar("_T")

#: A YAML document may not expand (through aliases and merge keys) into more values than this.
MAX_NODES = 100_000
#: Bounds on what a document may hold (README "Config loader bounds"). Deeper nesting, longer
#: keys or numbers, and larger values are refused with a problem naming the key path and line,
#: never a traceback (yaml's composer and our readers recurse; int() and float() overflow).
MAX_DEPTH = 64  # nested mappings/lists, counted after aliases are expanded
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # ApplyConfig's own message limit
MAX_KEY_CHARS = 256
MAX_NUMBER_CHARS = 40  # digits, sign, point and exponent of one number as written
MAX_INT = 2**31 - 1  # every integer field is a 32-bit one on the wire
MAX_FLOAT = 1e15  # prices, rates, CPUs: finite and at most this
MAX_DURATION_S = 366 * 86400.0
MAX_SIZE_BYTES = 2**60  # 1 EiB
MAX_PROBLEMS = 100  # listed in one error; the rest are counted


class ConfigError(ValueError):
    """A config that cannot be loaded. `problems` carry YAML key paths and lines."""

    def __init__(self, source: str, problems: Iterable[Problem]) -> None:
        self.source = source
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(f"{source}: {problem}" for problem in self.problems))


# --- step 1: parse --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    """A YAML value with its key path and 1-based line (the key's line for mapping values).

    `raw` is a scalar's text exactly as written (before interpolation); "" for collections.
    """

    value: str | int | float | bool | dict[str, _Node] | list[_Node] | None
    path: str
    line: int
    raw: str = ""


class _TooLarge(Exception):
    """The document expands to more than MAX_NODES values."""


class _TooDeep(Exception):
    """Nesting deeper than MAX_DEPTH: `path` and `line` say where it went over."""

    def __init__(self, path: str, line: int | None) -> None:
        super().__init__(path)
        self.path = path
        self.line = line


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # yaml has no type information
    """yaml's safe loader whose (recursive) composer stops at MAX_DEPTH levels, naming the key
    path where it did: without it a few hundred nested brackets end in a RecursionError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if isinstance(index, int):
            segment = f"[{index}]"
        else:
            segment = f".{_shorten(str(index.value), 40)}" if isinstance(index, yaml.ScalarNode) else ""
        self._path.append(segment)
        try:
            if len(self._path) > MAX_DEPTH:
                raise _TooDeep(_shorten("".join(self._path).lstrip(".")), self.peek_event().start_mark.line + 1)
            node: yaml.Node = super().compose_node(parent, index)
            return node
        finally:
            self._path.pop()


def _measure(node: yaml.Node, path: str, depth: int, seen: dict[int, tuple[int, int]], active: set[int]) -> int:
    """The height of `node` once aliases and merge keys are expanded (memoised per node, so an
    alias bomb is measured in time linear in the document); raises _TooDeep past MAX_DEPTH and
    _TooLarge past MAX_NODES. An alias to a containing node counts as one (reported later)."""
    key = id(node)
    if key in active:
        return 1
    if key in seen:
        height, _ = seen[key]
        if depth + height - 1 > MAX_DEPTH:
            raise _TooDeep(_shorten(path), _line(node))
        return height
    if depth > MAX_DEPTH:
        raise _TooDeep(_shorten(path), _line(node))
    active.add(key)
    height, size = 1, 1
    for child_path, child in _children(node, path):
        height = max(height, 1 + _measure(child, child_path, depth + 1, seen, active))
        size += seen[id(child)][1] if id(child) in seen else 1
        if size > MAX_NODES:
            raise _TooLarge
    active.discard(key)
    seen[key] = (height, size)
    return height


def _children(node: yaml.Node, path: str) -> Iterator[tuple[str, yaml.Node]]:
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield f"{path}[{index}]", item
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = _shorten(str(key.value), 40) if isinstance(key, yaml.ScalarNode) else "?"
            yield path, key
            yield (f"{path}.{name}" if path else name), value


class _Converter:
    """Turns yaml's composed nodes into `_Node`s, reporting what yaml itself lets through."""

    def __init__(self, problems: list[Problem]) -> None:
        self._problems = problems
        self._constructor = SafeConstructor()
        self._budget = MAX_NODES

    def convert(self, node: yaml.Node, path: str, line: int, ancestors: frozenset[int]) -> _Node:
        self._budget -= 1
        if self._budget < 0:
            raise _TooLarge
        if id(node) in ancestors:
            self._problems.append(Problem(path, "an alias refers to the value that contains it", line))
            return _Node(None, path, line)
        inner = ancestors | {id(node)}
        if isinstance(node, yaml.MappingNode):
            return _Node(self._mapping(node, path, inner), path, line)
        if isinstance(node, yaml.SequenceNode):
            items = [
                self.convert(item, f"{path}[{i}]", _line(item), inner) for i, item in enumerate(node.value)
            ]
            return _Node(items, path, line)
        return self._scalar(node, path, line)

    def _scalar(self, node: yaml.Node, path: str, line: int) -> _Node:
        raw = str(node.value)
        if node.tag in _NUMBER_TAGS and len(raw) > MAX_NUMBER_CHARS:
            self._problems.append(Problem(path, f"a number longer than {MAX_NUMBER_CHARS} characters", line))
            return _Node(None, path, line, _shorten(raw, 40))
        try:
            value = self._constructor.construct_object(node)
        except yaml.YAMLError as exc:
            self._problems.append(Problem(path, f"cannot read this value: {_yaml_reason(exc)}", line))
            return _Node(None, path, line, raw)
        except (ValueError, OverflowError):  # e.g. a date like 2024-02-30: keep the text, as for dates
            value = raw
        if value is not None and not isinstance(value, (str, int, float, bool)):
            value = raw  # dates, binary and the like: keep the text as written
        return _Node(value, path, line, raw)

    def _mapping(self, node: yaml.MappingNode, path: str, ancestors: frozenset[int]) -> dict[str, _Node]:
        merged = self._flatten(node, path)
        children: dict[str, _Node] = {}
        origin: dict[str, int] = {}  # key -> index of the pair that set it
        for index, (key_node, value_node) in enumerate(node.value):
            if not isinstance(key_node, yaml.ScalarNode):
                self._problems.append(Problem(path, "mapping keys must be plain scalars", _line(key_node)))
                continue
            key, key_line = str(key_node.value), _line(key_node)
            if len(key) > MAX_KEY_CHARS:
                self._problems.append(Problem(path, f"a key longer than {MAX_KEY_CHARS} characters", key_line))
                continue
            child_path = f"{path}.{key}" if path else key
            # Keys brought in by a `<<` merge may be overridden; keys written twice may not.
            if key in children and index >= merged and origin[key] >= merged:
                first = children[key].line
                self._problems.append(
                    Problem(child_path, f"duplicate key {key!r} (first at line {first})", key_line)
                )
                continue
            children[key] = self.convert(value_node, child_path, key_line, ancestors)
            origin[key] = index
        return children

    def _flatten(self, node: yaml.MappingNode, path: str) -> int:
        """Apply `<<` merge keys in place; return how many leading pairs came from merges."""
        own = sum(1 for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge")
        try:
            self._constructor.flatten_mapping(node)
        except yaml.YAMLError as exc:
            self._problems.append(Problem(path, f"bad merge key: {_yaml_reason(exc)}", _line(node)))
        return max(0, len(node.value) - own)


_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        return str(exc.problem or exc.context or "invalid YAML")
    return str(exc)


def _syntax_problem(exc: yaml.MarkedYAMLError) -> Problem:
    """yaml's own line (where it gave up), with what it was in the middle of and where that began."""
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    message = f"YAML syntax error: {exc.problem or 'invalid YAML'}"
    if exc.context and exc.context_mark is not None and exc.problem_mark is not None:
        message += f" ({exc.context} started on line {exc.context_mark.line + 1})"
    return Problem("", message, line)


def _parse(text: str, problems: list[Problem]) -> _Node | None:
    """The document's root node, or None after adding a problem."""
    if len(text) > MAX_DOCUMENT_BYTES:
        problems.append(Problem("", f"the document is larger than {MAX_DOCUMENT_BYTES} bytes"))
        return None
    try:
        root = yaml.compose(text, Loader=_Loader)
    except _TooDeep as exc:
        problems.append(_too_deep(exc))
        return None
    except yaml.MarkedYAMLError as exc:
        problems.append(_syntax_problem(exc))
        return None
    except yaml.YAMLError as exc:
        problems.append(Problem("", f"YAML error: {_yaml_reason(exc)}"))
        return None
    if root is None:
        problems.append(
            Problem("", "the document is empty; expected a mapping with the key external_services")
        )
        return None
    if not isinstance(root, yaml.MappingNode):
        problems.append(
            Problem("", "the top level must be a mapping with the key external_services", _line(root))
        )
        return None
    try:
        _measure(root, "", 1, {}, set())
        return _Converter(problems).convert(root, "", _line(root), frozenset())
    except _TooDeep as exc:
        problems.append(_too_deep(exc))
        return None
    except _TooLarge:
        problems.append(Problem("", f"the document expands to more than {MAX_NODES} values (aliases?)"))
        return None


def _too_deep(exc: _TooDeep) -> Problem:
    return Problem(exc.path, f"nested deeper than {MAX_DEPTH} levels (aliases count as the values they name)", exc.line)


# --- step 2: read ---------------------------------------------------------------------------


class _Bad(Exception):
    """A value that cannot be read; the message says what was expected."""


class _MissingEnv(_Bad):
    """An unset environment variable (not an error inside a disabled service)."""


_Reader = Callable[["_Context", _Node], _T]


@dataclass
class _Context:
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

    def child(self, strict_env: bool) -> _Context:
        return _Context(self.env, self.problems, strict_env)

    def problem(self, node: _Node, message: str) -> None:
        self.problems.append(Problem(node.path, message, node.line))

    def locate(self, model_path: str, node: _Node) -> None:
        self.locations[model_path] = (node.path, node.line)

    def read(self, node: _Node, model_path: str, reader: _Reader[_T]) -> _T | None:
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

    def text(self, node: _Node) -> str:
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


def _join(prefix: str, path: str) -> str:
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


def _shown(node: _Node) -> str:
    """How an unreadable value is quoted in a message: as written, shortened."""
    if isinstance(node.value, dict):
        return "a mapping"
    if isinstance(node.value, list):
        return "a list"
    if node.value is None:
        return "nothing (null)"
    text = node.raw
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _number_text(ctx: _Context, node: _Node) -> str | None:
    """The text of a number written as a string ("${PORT}", "3e-5"), else None; _Bad when it
    is longer than any number we take (int() and float() of it could overflow or be slow)."""
    if not isinstance(node.value, str):
        return None
    text = ctx.text(node).strip()
    if len(text) > MAX_NUMBER_CHARS:
        raise _Bad(f"expected a number of at most {MAX_NUMBER_CHARS} characters, got {_shown(node)}")
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


def _read_int(ctx: _Context, node: _Node) -> int:
    """An integer, or a string that is one."""
    if isinstance(node.value, int) and not isinstance(node.value, bool):
        return _bounded_int(node.value)
    text = _number_text(ctx, node)
    if text is not None and _INT_RE.fullmatch(text):
        return _bounded_int(int(text))
    raise _Bad(f"expected an integer, got {_shown(node)}")


def _read_float(ctx: _Context, node: _Node) -> float:
    """A number, or a string that is one (YAML 1.1 reads 3e-5 as a string)."""
    if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return _bounded_float(float(node.value))
    text = _number_text(ctx, node)
    if text is not None and _FLOAT_RE.fullmatch(text):
        return _bounded_float(float(text))
    raise _Bad(f"expected a number, got {_shown(node)}")


def _read_bool(ctx: _Context, node: _Node) -> bool:
    """true or false."""
    if isinstance(node.value, bool):
        return node.value
    text = ctx.text(node).strip().lower() if isinstance(node.value, str) else ""
    if text in ("true", "false"):
        return text == "true"
    raise _Bad(f"expected true or false, got {_shown(node)}")


def _read_str(ctx: _Context, node: _Node) -> str:
    """A string (numbers are taken as written)."""
    if isinstance(node.value, bool) or node.value is None or isinstance(node.value, (dict, list)):
        raise _Bad(f"expected a string, got {_shown(node)}")
    return ctx.text(node)


def _read_str_tuple(ctx: _Context, node: _Node) -> tuple[str, ...]:
    """A list of strings."""
    if not isinstance(node.value, list):
        raise _Bad(f"expected a list of strings, got {_shown(node)}")
    out: list[str] = []
    for index, item in enumerate(node.value):
        try:
            out.append(_read_str(ctx, item))
        except _Bad as bad:
            raise type(bad)(f"item [{index}]: {bad}") from None
    return tuple(out)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = MappingProxyType({"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0})


def _read_duration(ctx: _Context, node: _Node) -> float:
    """Seconds: a plain number, or a string like "300ms", "5s", "2m", "1h"; at most 366 days."""
    if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        seconds = float(node.value)
    else:
        text = _number_text(ctx, node)
        parsed = _DURATION_RE.fullmatch(text) if text is not None else None
        if parsed is None:
            raise _Bad(
                f"expected a duration in seconds (30) or with a unit (300ms, 5s, 2m, 1h), got {_shown(node)}"
            )
        seconds = float(parsed.group(1)) * _DURATION_UNITS[parsed.group(2)]
    return _bounded_float(seconds, MAX_DURATION_S, "a finite duration in seconds")


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


def _read_size(ctx: _Context, node: _Node) -> int:
    """Bytes: a plain integer, or a string like "4Gi", "512Mi", "2G", "50MB"; at most 1 EiB."""
    if isinstance(node.value, int) and not isinstance(node.value, bool):
        size: int | None = node.value
    else:
        size = parse_size(ctx.text(node)) if isinstance(node.value, str) else None
    if size is None:
        raise _Bad(f"expected a size like 4Gi, 512Mi, 2G, 50MB or a number of bytes, got {_shown(node)}")
    if not 0 <= size <= MAX_SIZE_BYTES:
        raise _Bad(f"must be a size from 0 to {MAX_SIZE_BYTES} bytes (1Ei), got {_shown(node)}")
    return size


_SECRET_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LITERAL_SECRET = "literal secrets are not allowed; use ${VAR} or file:PATH"


def _read_secret(ctx: _Context, node: _Node) -> SecretRef:
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


def _read_response_limit(ctx: _Context, node: _Node) -> int:
    """A per-service cap on an upstream answer: a size from 1 byte to MAX_RESPONSE_LIMIT_BYTES."""
    size = _read_size(ctx, node)
    if not 1 <= size <= MAX_RESPONSE_LIMIT_BYTES:
        raise _Bad(f"must be a size from 1 byte to {_bytes(MAX_RESPONSE_LIMIT_BYTES)}, got {_shown(node)}")
    return size


def _plain(ctx: _Context, node: _Node) -> Any:
    """A node as plain JSON-able data, strings interpolated; _Bad for inf/nan (JSON has none)."""
    if isinstance(node.value, dict):
        return {key: _plain(ctx, child) for key, child in node.value.items()}
    if isinstance(node.value, list):
        return [_plain(ctx, item) for item in node.value]
    if isinstance(node.value, float) and not math.isfinite(node.value):
        raise _Bad(f"{node.path}: {_shown(node)} is not a finite number")
    return ctx.text(node) if isinstance(node.value, str) else node.value


def _read_options(ctx: _Context, node: _Node) -> dict[str, Any]:
    """A mapping of adapter options (any JSON-able values)."""
    if not isinstance(node.value, dict):
        raise _Bad(f"expected a mapping of options, got {_shown(node)}")
    options: dict[str, Any] = _plain(ctx, node)
    return options


def _metadata_text(ctx: _Context, node: _Node) -> str:
    """A metadata value as a string; lists are joined with ","."""
    if isinstance(node.value, list):
        return ",".join(_metadata_text(ctx, item) for item in node.value)
    if isinstance(node.value, dict):
        raise _Bad(f"expected a string or a list of strings, got {_shown(node)}")
    if isinstance(node.value, bool):
        return "true" if node.value else "false"
    return "" if node.value is None else ctx.text(node)


def _read_metadata(ctx: _Context, node: _Node) -> dict[str, str]:
    """A mapping of descriptive facts; values become strings."""
    if not isinstance(node.value, dict):
        raise _Bad(f"expected a mapping, got {_shown(node)}")
    return {key: _metadata_text(ctx, child) for key, child in node.value.items()}


# --- mappings and tables of keys ------------------------------------------------------------


def _unknown_key(key: str, allowed: Collection[str]) -> str:
    """'unknown key' with the closest known key, or the list of known keys."""
    close = difflib.get_close_matches(key, sorted(allowed), n=1) if len(key) <= 64 else []
    if close:
        return f"unknown key {_shorten(key, 60)!r}; did you mean {close[0]!r}?"
    return f"unknown key {_shorten(key, 60)!r}; expected one of: {', '.join(sorted(allowed))}"


def _members(ctx: _Context, node: _Node | None, allowed: Collection[str] | None) -> dict[str, _Node]:
    """A mapping node's children, reporting unknown keys (any key goes when allowed is None).

    A missing or empty (null) section is an empty mapping.
    """
    if node is None or node.value is None:
        return {}
    if not isinstance(node.value, dict):
        ctx.problem(node, f"expected a mapping, got {_shown(node)}")
        return {}
    if allowed is None:
        return dict(node.value)
    for key, child in node.value.items():
        if key not in allowed:
            ctx.problem(child, _unknown_key(key, allowed))
    return {key: child for key, child in node.value.items() if key in allowed}


@dataclass(frozen=True)
class _Leaf:
    """One YAML key read into one model field (`target` is the model path under a prefix)."""

    key: str
    target: str
    read: _Reader[Any]


def _read_leaves(
    ctx: _Context, node: _Node | None, leaves: tuple[_Leaf, ...], prefix: str, also: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, _Node]]:
    """Read a mapping's leaves into {target: value}; `also` names allowed non-leaf keys."""
    members = _members(ctx, node, [leaf.key for leaf in leaves] + list(also))
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
    _Leaf("cache_ttl", "service_discovery.cache_ttl_s", _read_duration),
    _Leaf("health_check_interval", "service_discovery.health_check_interval_s", _read_duration),
    _Leaf("failover_threshold", "service_discovery.failover_threshold", _read_int),
)
_RESOURCE_ALLOCATION = (
    _Leaf("default_cpu", "resource_allocation.default_cpu", _read_float),
    _Leaf("default_memory", "resource_allocation.default_memory_bytes", _read_size),
    _Leaf("max_concurrent_tasks", "resource_allocation.max_concurrent_tasks", _read_int),
)
_LOAD_BALANCING = (
    _Leaf("default_strategy", "default_strategy", _read_str),
    _Leaf("health_check_timeout", "health_check_timeout_s", _read_duration),
    _Leaf("circuit_breaker_threshold", "circuit_breaker.failure_threshold", _read_int),
)
_RETRY_POLICY = (
    _Leaf("max_retries", "retry_policy.max_retries", _read_int),
    _Leaf("backoff_strategy", "retry_policy.backoff_strategy", _read_str),
    _Leaf("base_delay", "retry_policy.base_delay_s", _read_duration),
    _Leaf("max_delay", "retry_policy.max_delay_s", _read_duration),
)
_CACHING = (_Leaf("enabled", "cache.enabled", _read_bool),)
_COMMUNICATION = (_Leaf("default_timeout", "default_timeout_s", _read_duration),)
_POLICY = (
    _Leaf("strategy", "strategy", _read_str),
    _Leaf("max_cost_per_request", "max_cost_per_request", _read_float),
    _Leaf("min_success_rate", "min_success_rate", _read_float),
    _Leaf("max_queue_size", "max_queue_size", _read_int),
    _Leaf("timeout", "timeout_s", _read_duration),
    _Leaf("attempt_timeout_floor", "attempt_timeout_floor_s", _read_duration),
    _Leaf("attempt_timeout_ceiling", "attempt_timeout_ceiling_s", _read_duration),
    _Leaf("attempt_timeout_factor", "attempt_timeout_factor", _read_float),
    _Leaf("hedge_min_priority", "hedge_min_priority", _read_int),
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


def _read_policies(ctx: _Context, node: _Node | None) -> dict[str, CategoryPolicy]:
    """coordination.scheduling_policies: one CategoryPolicy per category."""
    policies: dict[str, CategoryPolicy] = {}
    for key, child in _members(ctx, node, tuple(_POLICY_GROUPS)).items():
        prefix = f"{_SETTINGS}category_policies[{_POLICY_GROUPS[key]}]"
        ctx.locate(prefix, child)
        values, _ = _read_leaves(ctx, child, _POLICY, prefix + ".")
        policies[_POLICY_GROUPS[key]] = CategoryPolicy(**values)
    return policies


def _read_ttl(ctx: _Context, node: _Node | None) -> dict[str, float]:
    """communication.caching.ttl: {kind: seconds}."""
    ttl: dict[str, float] = {}
    for kind, child in _members(ctx, node, None).items():
        value = ctx.read(child, f"{_SETTINGS}cache.ttl_s[{kind}]", _read_duration)
        if value is not None:
            ttl[kind] = value
    return ttl


def _read_coordination(ctx: _Context, node: _Node | None) -> tuple[dict[str, Any], dict[str, CategoryPolicy]]:
    sections = _members(ctx, node, ("service_discovery", "resource_allocation", "scheduling_policies"))
    flat, _ = _read_leaves(ctx, sections.get("service_discovery"), _SERVICE_DISCOVERY, _SETTINGS)
    flat |= _read_leaves(ctx, sections.get("resource_allocation"), _RESOURCE_ALLOCATION, _SETTINGS)[0]
    return flat, _read_policies(ctx, sections.get("scheduling_policies"))


def _read_communication(ctx: _Context, node: _Node | None) -> tuple[dict[str, Any], dict[str, float]]:
    flat, sections = _read_leaves(
        ctx, node, _COMMUNICATION, _SETTINGS, also=("load_balancing", "caching", "retry_policy")
    )
    flat |= _read_leaves(ctx, sections.get("load_balancing"), _LOAD_BALANCING, _SETTINGS)[0]
    flat |= _read_leaves(ctx, sections.get("retry_policy"), _RETRY_POLICY, _SETTINGS)[0]
    cache, caching = _read_leaves(ctx, sections.get("caching"), _CACHING, _SETTINGS, also=("ttl",))
    return flat | cache, _read_ttl(ctx, caching.get("ttl"))


def _section(flat: dict[str, Any], name: str) -> dict[str, Any]:
    """The fields of one nested settings object, from flat "name.field" keys."""
    return {key.split(".", 1)[1]: value for key, value in flat.items() if key.startswith(name + ".")}


def _assemble_settings(
    flat: dict[str, Any], ttl: dict[str, float], policies: dict[str, CategoryPolicy]
) -> Settings:
    """Settings from the values the file gave; the model supplies every other default.

    TTLs given in the file are merged over the default kinds rather than replacing them.
    """
    cache = _section(flat, "cache")
    if ttl:
        cache["ttl_s"] = tuple(sorted({**dict(CacheSettings().ttl_s), **ttl}.items()))
    return Settings(
        **{key: value for key, value in flat.items() if "." not in key},
        retry_policy=RetryPolicy(**_section(flat, "retry_policy")),
        circuit_breaker=CircuitBreakerSettings(**_section(flat, "circuit_breaker")),
        cache=CacheSettings(**cache),
        category_policies=tuple(sorted(policies.items())),
        service_discovery=ServiceDiscoverySettings(**_section(flat, "service_discovery")),
        resource_allocation=ResourceAllocationSettings(**_section(flat, "resource_allocation")),
    )


def _read_settings(ctx: _Context, coordination: _Node | None, communication: _Node | None) -> Settings:
    flat, policies = _read_coordination(ctx, coordination)
    more, ttl = _read_communication(ctx, communication)
    return _assemble_settings(flat | more, ttl, policies)


# --- monitoring (external_services.monitoring) ----------------------------------------------

_MONITORING = (
    _Leaf("report_interval", "report_interval_s", _read_duration),
    _Leaf("health_window", "health_window_s", _read_duration),
    _Leaf("alert_window", "alert_window_s", _read_duration),
    _Leaf("health_debounce", "health_debounce_s", _read_duration),
    _Leaf("breaker_threshold", "breaker_threshold", _read_int),
)
_ALERT_RULE = (
    _Leaf("condition", "condition", _read_str),
    _Leaf("severity", "severity", _read_str),
    _Leaf("action", "action", _read_str),
    _Leaf("for", "for_s", _read_duration),
    _Leaf("clear_for", "clear_for_s", _read_duration),
    _Leaf("hysteresis", "hysteresis", _read_float),
    _Leaf("min_requests", "min_requests", _read_int),
)
_MONITORING_PREFIX = _SETTINGS + "monitoring."


def _read_monitoring(ctx: _Context, node: _Node | None) -> MonitoringSettings:
    """monitoring: intervals and windows, and alert_rules (name -> rule; the seed's four when
    the key is absent, exactly the rules given when present)."""
    from switchgear.controlplane.alerts import RuleError, check_rule, rules_from_settings

    flat, sections = _read_leaves(ctx, node, _MONITORING, _MONITORING_PREFIX, also=("alert_rules",))
    rules_node = sections.get("alert_rules")
    if rules_node is None:
        return MonitoringSettings(**flat)
    rules: list[AlertRuleSpec] = []
    for name, child in _members(ctx, rules_node, None).items():
        prefix = f"{_MONITORING_PREFIX}alert_rules[{name}]"
        values, members = _read_leaves(ctx, child, _ALERT_RULE, prefix + ".")
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


@dataclass(frozen=True)
class _Provider:
    """What a well-known provider key under a service group implies."""

    protocol: str
    url: str = ""
    key_env: str = ""


_PROVIDERS = MappingProxyType(
    {
        "openai": _Provider("openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
        "anthropic": _Provider("anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY"),
        "local_models": _Provider("openai"),  # OpenAI-compatible servers, no key
        "unstructured": _Provider("unstructured"),
        "graphrag": _Provider("graphrag"),
        "chroma": _Provider("chroma"),
        "pinecone": _Provider("pinecone", "https://api.pinecone.io", "PINECONE_API_KEY"),
    }
)
_NO_PROVIDER = _Provider("")

_GROUPS = MappingProxyType(
    {
        "llm_services": Category.LLM,
        "document_services": Category.DOCUMENT,
        "knowledge_graph": Category.KNOWLEDGE_GRAPH,
        "vector_databases": Category.VECTOR_DB,
        "embedding_services": Category.EMBEDDING,
    }
)
_MODEL_CATEGORIES = frozenset({Category.LLM, Category.EMBEDDING})

#: Keys a provider passes down to each of its models (innermost wins; options merge).
_INHERITED = frozenset({"protocol", "endpoint", "endpoints", "api_key", "options", "timeout"})
_PROVIDER_KEYS = _INHERITED | {"enabled", "models"}
_SERVICE_LEAVES = (
    _Leaf("model", "model", _read_str),
    _Leaf("max_tokens", "max_tokens", _read_int),
    _Leaf("priority", "priority", _read_int),
    _Leaf("strategy", "strategy", _read_str),
    _Leaf("timeout", "timeout_s", _read_duration),
    _Leaf("capabilities", "capabilities", _read_str_tuple),
    _Leaf("fallbacks", "fallbacks", _read_str_tuple),
)
_PRICE_LEAVES = tuple(
    _Leaf(key, f"pricing.{key}", _read_float)
    for key in (
        "cost_per_1k_tokens",
        "input_cost_per_1k_tokens",
        "output_cost_per_1k_tokens",
        "cost_per_request",
    )
)
_ENTRY_KEYS = (
    _INHERITED
    | {"name", "enabled", "metadata"}
    | {leaf.key for leaf in _SERVICE_LEAVES}
    | {leaf.key for leaf in _PRICE_LEAVES}
)
_ENDPOINT_LEAVES = (
    _Leaf("id", "id", _read_str),
    _Leaf("url", "url", _read_str),
    _Leaf("weight", "weight", _read_int),
    _Leaf("priority", "priority", _read_int),
    _Leaf("max_concurrency", "max_concurrency", _read_int),
)

#: Protocol-specific descriptive keys: (protocol, YAML key, how it is kept).
#: "size" and "list" and "count" go to metadata as strings; "option" goes to options_json.
_EXTRAS: tuple[tuple[str, str, str], ...] = (
    ("unstructured", "max_file_size", "size"),
    ("unstructured", "supported_formats", "list"),
    ("graphrag", "max_documents", "count"),
    ("chroma", "collections", "list"),
    ("pinecone", "environment", "option"),
    ("pinecone", "index_name", "option"),
)


def _extra_keys(protocol: str) -> frozenset[str]:
    return frozenset(key for proto, key, _ in _EXTRAS if proto == protocol)


def _read_extra(ctx: _Context, node: _Node, key: str, kind: str) -> dict[str, str] | None:
    """One descriptive key as metadata entries (a size also gives `<key>_bytes`)."""
    if kind == "size":
        size = ctx.read(node, "metadata", _read_size)
        return None if size is None else {key: ctx.text(node), f"{key}_bytes": str(size)}
    reader: _Reader[Any] = {"list": _read_str_tuple, "count": _read_int, "option": _read_str}[kind]
    value = ctx.read(node, "options_json" if kind == "option" else "metadata", reader)
    if value is None:
        return None
    return {key: ",".join(value) if kind == "list" else str(value)}


@dataclass(frozen=True)
class _Built:
    """A service read from the file, with its context (locations relative to the service)."""

    spec: ServiceSpec
    ctx: _Context
    where: _Node


class _ServiceReader:
    """Reads one service from its layers: provider mapping, then model entry; innermost wins."""

    def __init__(
        self, ctx: _Context, category: Category, provider: _Provider, layers: tuple[_Node, ...]
    ) -> None:
        self.ctx = ctx
        self.category = category
        self.provider = provider
        self.layers = layers

    @property
    def entry(self) -> _Node:
        return self.layers[-1]

    def pick(self, key: str) -> _Node | None:
        for layer in reversed(self.layers):
            if isinstance(layer.value, dict) and key in layer.value:
                return layer.value[key]
        return None

    def build(self, default_name: str | None) -> ServiceSpec | None:
        protocol = self.protocol()
        _members(self.ctx, self.entry, _ENTRY_KEYS | _extra_keys(protocol))
        name = self.name(default_name)
        if name is None or not protocol:
            return None
        self.ctx.locate("", self.entry)
        fields: dict[str, Any] = {"name": name, "category": self.category, "protocol": protocol}
        fields |= self.leaves(_SERVICE_LEAVES)
        if "model" not in fields and self.category in _MODEL_CATEGORIES:
            fields["model"] = name
        fields["pricing"] = Pricing(**_section(self.leaves(_PRICE_LEAVES), "pricing"))
        fields["endpoints"] = self.endpoints()
        fields["api_key"] = self.api_key()
        metadata, options = self.extras(protocol)
        fields |= self.options_json(options) | self.metadata(metadata)
        return ServiceSpec(**fields)

    def protocol(self) -> str:
        """The `protocol:` key, else the provider's; "" (with a problem) when neither says."""
        node = self.pick("protocol")
        if node is None:
            if not self.provider.protocol:
                self.ctx.problem(self.layers[0], _unknown_provider(self.layers[0]))
            return self.provider.protocol
        return self.ctx.read(node, "protocol", _read_str) or ""

    def name(self, default: str | None) -> str | None:
        node = self.entry.value.get("name") if isinstance(self.entry.value, dict) else None
        if node is None:
            if default is None:
                self.ctx.problem(self.entry, "missing required key 'name'")
            return default
        return self.ctx.read(node, "name", _read_str)

    def leaves(self, leaves: tuple[_Leaf, ...]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for leaf in leaves:
            node = self.pick(leaf.key)
            value = None if node is None else self.ctx.read(node, leaf.target, leaf.read)
            if value is not None:
                values[leaf.target] = value
        return values

    def endpoints(self) -> tuple[EndpointSpec, ...]:
        """`endpoint: URL` (id "default"), `endpoints: [...]` (ids e0, e1, ...), or the provider's URL."""
        layer = next((x for x in reversed(self.layers) if _has_any(x, ("endpoint", "endpoints"))), None)
        if layer is None:
            return (EndpointSpec("default", self.provider.url),) if self.provider.url else ()
        assert isinstance(layer.value, dict)
        single, many = layer.value.get("endpoint"), layer.value.get("endpoints")
        if single is not None and many is not None:
            self.ctx.problem(many, "set endpoint or endpoints, not both")
            self.ctx.poisoned.add("endpoints")
        if single is not None:
            return self.single_endpoint(single)
        assert many is not None
        return self.endpoint_list(many)

    def single_endpoint(self, node: _Node) -> tuple[EndpointSpec, ...]:
        for path in ("endpoints", "endpoints[0]", "endpoints[0].id"):
            self.ctx.locate(path, node)
        url = self.ctx.read(node, "endpoints[0].url", _read_str)
        return () if url is None else (EndpointSpec("default", url),)

    def endpoint_list(self, node: _Node) -> tuple[EndpointSpec, ...]:
        self.ctx.locate("endpoints", node)
        if not isinstance(node.value, list):
            self.ctx.problem(node, f"expected a list of endpoints, got {_shown(node)}")
            self.ctx.poisoned.add("endpoints")
            return ()
        built = (self.list_endpoint(index, item) for index, item in enumerate(node.value))
        return tuple(endpoint for endpoint in built if endpoint is not None)

    def list_endpoint(self, index: int, node: _Node) -> EndpointSpec | None:
        """One `endpoints:` item: a URL string, or {id, url, weight, priority, max_concurrency}."""
        path = f"endpoints[{index}]"
        self.ctx.locate(path, node)
        if isinstance(node.value, str):
            url = self.ctx.read(node, f"{path}.url", _read_str)
            return None if url is None else EndpointSpec(f"e{index}", url)
        values, members = _read_leaves(self.ctx, node, _ENDPOINT_LEAVES, f"{path}.")
        if "url" not in members and isinstance(node.value, dict):
            self.ctx.problem(node, "missing required key 'url'")
        if "url" not in values:
            self.ctx.poisoned.add(path)
            return None
        return EndpointSpec(**{"id": f"e{index}", **values})

    def api_key(self) -> SecretRef | None:
        """`api_key:` (null means none), else the provider's usual key variable."""
        node = self.pick("api_key")
        if node is None:
            return SecretRef(env=self.provider.key_env) if self.provider.key_env else None
        self.ctx.locate("api_key", node)
        return None if node.value is None else self.ctx.read(node, "api_key", _read_secret)

    def extras(self, protocol: str) -> tuple[dict[str, str], dict[str, str]]:
        """The protocol's descriptive keys: (metadata, options)."""
        metadata: dict[str, str] = {}
        options: dict[str, str] = {}
        for proto, key, kind in _EXTRAS:
            node = self.pick(key) if proto == protocol else None
            entries = None if node is None else _read_extra(self.ctx, node, key, kind)
            if entries:
                (options if kind == "option" else metadata).update(entries)
        return metadata, options

    def options_json(self, extra: dict[str, str]) -> dict[str, str]:
        """Provider options, overridden key by key by the model's, then the protocol's keys.
        The answer caps every protocol accepts (max_response_bytes, ...) take sizes ("16Mi")."""
        merged: dict[str, Any] = {}
        for layer in self.layers:
            node = layer.value.get("options") if isinstance(layer.value, dict) else None
            options = None if node is None else self.ctx.read(node, "options_json", _read_options)
            merged |= options or {}
            if options is not None and isinstance(node, _Node) and isinstance(node.value, dict):
                merged |= self.response_limits(node.value)
        merged |= extra
        if not merged:
            return {}
        try:
            return {"options_json": orjson.dumps(merged, option=orjson.OPT_SORT_KEYS).decode()}
        except TypeError:  # orjson.JSONEncodeError, e.g. an integer beyond 64 bits
            self.ctx.problem(self.entry, "options cannot be written as JSON (integers must fit in 64 bits)")
            return {}

    def response_limits(self, options: dict[str, _Node]) -> dict[str, int]:
        """The options that cap an upstream answer, as bytes; a bad one is a problem at its line
        (and is left out, so the agent's default applies only if the config is fixed)."""
        limits: dict[str, int] = {}
        for key in RESPONSE_LIMIT_OPTIONS:
            node = options.get(key)
            value = None if node is None else self.ctx.read(node, f"options_json.{key}", _read_response_limit)
            if value is not None:
                limits[key] = value
        return limits

    def metadata(self, extra: dict[str, str]) -> dict[str, tuple[tuple[str, str], ...]]:
        node = self.pick("metadata")
        given = None if node is None else self.ctx.read(node, "metadata", _read_metadata)
        merged = extra | (given or {})
        return {"metadata": tuple(sorted(merged.items()))} if merged else {}


def _unknown_provider(node: _Node) -> str:
    """The provider key is not a built-in one and no `protocol:` says how to call it."""
    key = node.path.rsplit(".", 1)[-1].split("[", 1)[0]
    close = difflib.get_close_matches(key, sorted(_PROVIDERS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown provider {key!r}; {hint}a provider that is not built in must set protocol:"


def _has_any(node: _Node, keys: Iterable[str]) -> bool:
    return isinstance(node.value, dict) and any(key in node.value for key in keys)


def _enabled(ctx: _Context, layers: tuple[_Node, ...]) -> bool:
    """False when any layer says `enabled: false` (an unreadable value counts as true)."""
    for layer in layers:
        node = layer.value.get("enabled") if isinstance(layer.value, dict) else None
        if node is not None and ctx.read(node, "enabled", _read_bool) is False:
            return False
    return True


def _read_service(
    ctx: _Context,
    category: Category,
    provider: _Provider,
    layers: tuple[_Node, ...],
    default_name: str | None,
) -> _Built | None:
    """One service, or None when disabled or unnamed. A disabled service is still read (so
    its typos are reported) but with unset variables allowed, and is not registered."""
    entry = layers[-1]
    if not isinstance(entry.value, dict):
        ctx.problem(entry, f"expected a mapping describing a service, got {_shown(entry)}")
        return None
    scope = ctx.child(strict_env=True)
    enabled = scope.strict_env = _enabled(scope, layers)
    spec = _ServiceReader(scope, category, provider, layers).build(default_name)
    if spec is None or not enabled:
        return None
    name_node = entry.value.get("name", entry)
    return _Built(spec, scope, name_node)


def _model_entry(node: _Node) -> _Node:
    """A model list item; a bare string is shorthand for {name: ...}."""
    if isinstance(node.value, str):
        return _Node({"name": node}, node.path, node.line)
    return node


def _read_provider(ctx: _Context, key: str, node: _Node, category: Category) -> Iterator[_Built]:
    """A provider: a list of models, a mapping with `models:`, or a mapping that is one service."""
    provider = _PROVIDERS.get(key, _NO_PROVIDER)
    if isinstance(node.value, list):
        layers: tuple[_Node, ...] = ()
        models: _Node | None = node
    elif isinstance(node.value, dict):
        layers, models = (node,), node.value.get("models")
    else:
        ctx.problem(node, f"expected a mapping or a list of models, got {_shown(node)}")
        return
    if models is None:
        built = _read_service(ctx, category, provider, layers, key)
        yield from (built,) if built is not None else ()
        return
    yield from _read_models(ctx, provider, layers, models, category)


def _read_models(
    ctx: _Context, provider: _Provider, layers: tuple[_Node, ...], models: _Node, category: Category
) -> Iterator[_Built]:
    if layers:  # the provider mapping's own keys, checked once rather than once per model
        _members(ctx, layers[0], _PROVIDER_KEYS | _extra_keys(_written_protocol(layers[0], provider)))
    if not isinstance(models.value, list):
        ctx.problem(models, f"expected a list of models, got {_shown(models)}")
        return
    for item in models.value:
        built = _read_service(ctx, category, provider, (*layers, _model_entry(item)), None)
        if built is not None:
            yield built


def _written_protocol(node: _Node, provider: _Provider) -> str:
    """The protocol a mapping names as plain text, else the provider's (only to pick allowed keys)."""
    written = node.value.get("protocol") if isinstance(node.value, dict) else None
    return written.value if written is not None and isinstance(written.value, str) else provider.protocol


def _register(ctx: _Context, registered: dict[str, _Built], built: _Built) -> None:
    """Add a service, refusing a second one with the same name; adopt its locations."""
    name = built.spec.name
    first = registered.get(name)
    if first is not None:
        message = (
            f"duplicate service name {name!r}; first defined at {first.where.path} (line {first.where.line})"
        )
        ctx.problem(built.where, message)
        return
    registered[name] = built
    prefix = f"services[{name}]"
    for path, where in built.ctx.locations.items():
        ctx.locations[_join(prefix, path)] = where
    ctx.poisoned.update(_join(prefix, path) for path in built.ctx.poisoned if path)


def _read_services(ctx: _Context, node: _Node | None) -> tuple[ServiceSpec, ...]:
    registered: dict[str, _Built] = {}
    for group, group_node in _members(ctx, node, tuple(_GROUPS)).items():
        for key, provider_node in _members(ctx, group_node, None).items():
            for built in _read_provider(ctx, key, provider_node, _GROUPS[group]):
                _register(ctx, registered, built)
    return tuple(registered[name].spec for name in sorted(registered))


_TOP_SECTIONS = ("coordination", "communication", "services", "monitoring")


def _read_document(ctx: _Context, root: _Node) -> RegistryState:
    top = _members(ctx, root, ("external_services",))
    body = top.get("external_services")
    if body is None:
        ctx.problem(root, "missing required key 'external_services'")
        return RegistryState()
    sections = _members(ctx, body, _TOP_SECTIONS)
    settings = _read_settings(ctx, sections.get("coordination"), sections.get("communication"))
    settings = dataclasses.replace(settings, monitoring=_read_monitoring(ctx, sections.get("monitoring")))
    return RegistryState(services=_read_services(ctx, sections.get("services")), settings=settings)


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
    root = _parse(text, problems)
    if root is None:
        raise ConfigError(source, problems)
    ctx = _Context(env, problems)
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


# --- describe -------------------------------------------------------------------------------


def describe(state: RegistryState) -> str:
    """A human summary: one line per service, then the settings. Secrets appear only as
    references ("env:NAME"); URLs are shown without any user:password part."""
    lines = [f"{len(state.services)} services:"]
    rows = [_service_row(spec) for spec in state.services]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    for row in rows:
        head = "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        lines.append(f"  {head}  {'  '.join(row[3:])}")
    lines.append("settings:")
    lines.extend(f"  {line}" for line in _settings_lines(state.settings))
    return "\n".join(lines)


def _service_row(spec: ServiceSpec) -> list[str]:
    endpoints = ", ".join(f"{e.id}={_safe_url(e.url)}" for e in spec.endpoints) or "-"
    key = spec.api_key.describe() if spec.api_key is not None else "-"
    category = spec.category.value if isinstance(spec.category, Category) else str(spec.category)
    return [
        spec.name,
        category,
        spec.protocol,
        f"model={spec.model or '-'}",
        f"price={_price(spec.pricing)}",
        f"priority={spec.priority}",
        f"timeout={_seconds(spec.timeout_s) if spec.timeout_s else 'default'}",
        f"key={key}",
        *_limit_cells(spec),
        f"endpoints={endpoints}",
    ]


def _limit_cells(spec: ServiceSpec) -> list[str]:
    """The answer caps the service sets (the agent's defaults apply to the others)."""
    try:
        options = orjson.loads(spec.options_json or "{}")
    except orjson.JSONDecodeError:
        return []
    if not isinstance(options, dict):
        return []
    return [f"{key}={_bytes(options[key])}" for key in RESPONSE_LIMIT_OPTIONS if isinstance(options.get(key), int)]


def _safe_url(url: str) -> str:
    """The URL without any credentials (validation rejects them, but describe must not leak)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _price(pricing: Pricing) -> str:
    parts = []
    if pricing.input_cost_per_1k_tokens or pricing.output_cost_per_1k_tokens:
        tokens_in, tokens_out = (
            _num(pricing.input_cost_per_1k_tokens),
            _num(pricing.output_cost_per_1k_tokens),
        )
        parts.append(f"${tokens_in} in / ${tokens_out} out per 1k tokens")
    elif pricing.cost_per_1k_tokens:
        parts.append(f"${_num(pricing.cost_per_1k_tokens)}/1k tokens")
    if pricing.cost_per_request:
        parts.append(f"${_num(pricing.cost_per_request)}/request")
    return ", ".join(parts) or "$0"


def _settings_lines(settings: Settings) -> list[str]:
    ttl = ", ".join(f"{kind}={_seconds(value)}" for kind, value in settings.cache.ttl_s) or "-"
    lines = [
        f"default strategy {settings.default_strategy}; "
        f"default timeout {_seconds(settings.default_timeout_s)}; "
        f"health check timeout {_seconds(settings.health_check_timeout_s)}",
        _retry_line(settings),
        f"cache: {'on' if settings.cache.enabled else 'off'}; ttl {ttl}",
        _discovery_line(settings.service_discovery),
        _resources_line(settings.resource_allocation),
    ]
    lines.extend(_policy_line(category, policy) for category, policy in settings.category_policies)
    return lines


def _retry_line(settings: Settings) -> str:
    retry = settings.retry_policy
    return (
        f"retry: up to {retry.max_retries}, {retry.backoff_strategy} backoff "
        f"{_seconds(retry.base_delay_s)}..{_seconds(retry.max_delay_s)}; "
        f"circuit breaker opens after {settings.circuit_breaker.failure_threshold} failures"
    )


def _discovery_line(discovery: ServiceDiscoverySettings) -> str:
    return (
        f"discovery: cache ttl {_seconds(discovery.cache_ttl_s)}, health check every "
        f"{_seconds(discovery.health_check_interval_s)}, "
        f"failover after {discovery.failover_threshold} failures"
    )


def _resources_line(resources: ResourceAllocationSettings) -> str:
    return (
        f"resources: cpu {_num(resources.default_cpu)}, memory {_bytes(resources.default_memory_bytes)}, "
        f"max concurrent tasks {resources.max_concurrent_tasks}"
    )


def _policy_line(category: str, policy: CategoryPolicy) -> str:
    parts = [f"strategy {policy.strategy or 'default'}"]
    if policy.max_cost_per_request:
        parts.append(f"max cost ${_num(policy.max_cost_per_request)}/request")
    if policy.min_success_rate:
        parts.append(f"min success rate {_num(policy.min_success_rate)}")
    if policy.max_queue_size:
        parts.append(f"max queue {policy.max_queue_size}")
    if policy.timeout_s:
        parts.append(f"timeout {_seconds(policy.timeout_s)}")
    parts.append(_attempt_timeout_text(category, policy))
    parts.append(_hedging_text(category, policy))
    return f"policy {category}: {', '.join(parts)}"


def _attempt_timeout_text(category: str, policy: CategoryPolicy) -> str:
    """The attempt timeout in effect: the category's defaults with the policy's overrides."""
    t = timeouts_for(category, policy.attempt_timeout_floor_s, policy.attempt_timeout_ceiling_s,
                     policy.attempt_timeout_factor)
    return (f"attempt timeout {_num(t.factor)} x p99 within {_seconds(t.floor_s)}..{_seconds(t.ceiling_s)} "
            f"(after {t.min_samples} answers)")


def _hedging_text(category: str, policy: CategoryPolicy) -> str:
    hedging = hedging_for(category, policy.hedge_min_priority)
    if hedging.min_priority >= NEVER:
        return "no hedging"
    return f"hedging at priority >= {hedging.min_priority} after p95"


def _num(value: float) -> str:
    """A number without a pointless ".0"."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _seconds(value: float) -> str:
    return f"{_num(value)}s"


def _bytes(value: int) -> str:
    for suffix, power in (("Ti", 4), ("Gi", 3), ("Mi", 2), ("Ki", 1)):
        if value and value % 1024**power == 0:
            return f"{value // 1024**power}{suffix}"
    return f"{value}B"
