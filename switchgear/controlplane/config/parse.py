"""Step 1, parse: YAML text -> a tree of `Node`s that know their key path and line.

Hostile YAML is bounded here (docs/reference/limits.md): the document's size, its
nesting depth (yaml's composer recurses), its expansion through aliases and merge keys, key
and number lengths. Each bound is a problem naming the key path and line, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from switchgear.controlplane.validate import Problem

#: Aliases and merge keys may add at most this many values to those a document writes out.
#: (What is written is bounded by MAX_DOCUMENT_BYTES, and yaml has composed it already; the bound is
#: for what aliases multiply: billion laughs, merge bombs. A 10,000-service registry writes ~200,000.)
MAX_NODES = 100_000
#: Bounds on what a document may hold (docs/reference/limits.md). Deeper nesting, longer
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
class Node:
    """A YAML value with its key path and 1-based line (the key's line for mapping values).

    `raw` is a scalar's text exactly as written (before interpolation); "" for collections.
    """

    value: str | int | float | bool | dict[str, Node] | list[Node] | None
    path: str
    line: int
    raw: str = ""


class _TooLarge(Exception):
    """Aliases and merge keys add more than MAX_NODES values to the document."""


class _TooDeep(Exception):
    """Nesting deeper than MAX_DEPTH: `path` and `line` say where it went over."""

    def __init__(self, path: str, line: int | None) -> None:
        super().__init__(path)
        self.path = path
        self.line = line


def shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # yaml has no type information
    """yaml's safe loader whose (recursive) composer stops at MAX_DEPTH levels, naming the key
    path where it did: without it a few hundred nested brackets end in a RecursionError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        return _compose_node(self, parent, index)


if yaml.__with_libyaml__:
    from yaml.cyaml import CParser

    class _FastLoader(yaml.composer.Composer, SafeConstructor, yaml.resolver.Resolver, CParser):  # type: ignore[misc]
        """_Loader with libyaml's scanner and parser underneath (~4x faster on a large
        registry). libyaml's own composer (recursive C) is not used: this one is yaml's, bounded."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            self._path: list[str] = []

        def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
            return _compose_node(self, parent, index)

def _compose_node(loader: Any, parent: yaml.Node | None, index: Any) -> yaml.Node:
    if isinstance(index, int):
        segment = f"[{index}]"
    else:
        segment = f".{shorten(str(index.value), 40)}" if isinstance(index, yaml.ScalarNode) else ""
    loader._path.append(segment)
    try:
        if len(loader._path) > MAX_DEPTH:
            raise _TooDeep(shorten("".join(loader._path).lstrip(".")), loader.peek_event().start_mark.line + 1)
        node: yaml.Node = yaml.composer.Composer.compose_node(loader, parent, index)
        return node
    finally:
        loader._path.pop()


def _measure(node: yaml.Node, path: str, depth: int, seen: dict[int, tuple[int, int]], active: set[int],
             bound: int) -> int:
    """The height of `node` once aliases and merge keys are expanded (memoised per node, so an
    alias bomb is measured in time linear in the document); raises _TooDeep past MAX_DEPTH and
    _TooLarge past `bound` values. An alias to a containing node counts as one (reported later)."""
    key = id(node)
    if key in active:
        return 1
    if key in seen:
        height, _ = seen[key]
        if depth + height - 1 > MAX_DEPTH:
            raise _TooDeep(shorten(path), _line(node))
        return height
    if depth > MAX_DEPTH:
        raise _TooDeep(shorten(path), _line(node))
    active.add(key)
    height, size = 1, 1
    for child_path, child in _children(node, path):
        height = max(height, 1 + _measure(child, child_path, depth + 1, seen, active, bound))
        size += seen[id(child)][1] if id(child) in seen else 1
        if size > bound:
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
            name = shorten(str(key.value), 40) if isinstance(key, yaml.ScalarNode) else "?"
            yield path, key
            yield (f"{path}.{name}" if path else name), value


def _expansion(root: yaml.Node) -> int:
    """How many values `root` holds once expanded (measured, not expanded); raises _TooDeep past
    MAX_DEPTH and _TooLarge when aliases and merge keys add more than MAX_NODES values to the
    ones written (each distinct node once)."""
    seen: dict[int, tuple[int, int]] = {}
    _measure(root, "", 1, seen, set(), _written(root) + MAX_NODES)
    return seen[id(root)][1]


def _written(root: yaml.Node) -> int:
    """The distinct nodes under `root`, each once however many aliases name it."""
    seen, todo = {id(root)}, [root]
    while todo:
        node = todo.pop()
        if isinstance(node, yaml.SequenceNode):
            children: Iterable[yaml.Node] = node.value
        elif isinstance(node, yaml.MappingNode):
            children = (item for pair in node.value for item in pair)
        else:
            continue
        for child in children:
            if id(child) not in seen:
                seen.add(id(child))
                todo.append(child)
    return len(seen)


class _Converter:
    """Turns yaml's composed nodes into `Node`s, reporting what yaml itself lets through."""

    def __init__(self, problems: list[Problem], budget: int) -> None:
        self._problems = problems
        self._constructor = SafeConstructor()
        self._budget = budget  # the values measured: a converter that meets more has a bug to stop at

    def convert(self, node: yaml.Node, path: str, line: int, ancestors: frozenset[int]) -> Node:
        self._budget -= 1
        if self._budget < 0:
            raise _TooLarge
        if id(node) in ancestors:
            self._problems.append(Problem(path, "an alias refers to the value that contains it", line))
            return Node(None, path, line)
        inner = ancestors | {id(node)}
        if isinstance(node, yaml.MappingNode):
            return Node(self._mapping(node, path, inner), path, line)
        if isinstance(node, yaml.SequenceNode):
            items = [
                self.convert(item, f"{path}[{i}]", _line(item), inner) for i, item in enumerate(node.value)
            ]
            return Node(items, path, line)
        return self._scalar(node, path, line)

    def _scalar(self, node: yaml.Node, path: str, line: int) -> Node:
        raw = str(node.value)
        if node.tag in _NUMBER_TAGS and len(raw) > MAX_NUMBER_CHARS:
            self._problems.append(Problem(path, f"a number longer than {MAX_NUMBER_CHARS} characters", line))
            return Node(None, path, line, shorten(raw, 40))
        try:
            value = self._constructor.construct_object(node)
        except yaml.YAMLError as exc:
            self._problems.append(Problem(path, f"cannot read this value: {_yaml_reason(exc)}", line))
            return Node(None, path, line, raw)
        except (ValueError, OverflowError):  # e.g. a date like 2024-02-30: keep the text, as for dates
            value = raw
        if value is not None and not isinstance(value, (str, int, float, bool)):
            value = raw  # dates, binary and the like: keep the text as written
        return Node(value, path, line, raw)

    def _mapping(self, node: yaml.MappingNode, path: str, ancestors: frozenset[int]) -> dict[str, Node]:
        merged = self._flatten(node, path)
        children: dict[str, Node] = {}
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


def parse_yaml(text: str, problems: list[Problem]) -> Node | None:
    """The document's root node, or None after adding a problem."""
    if len(text) > MAX_DOCUMENT_BYTES:
        problems.append(Problem("", f"the document is larger than {MAX_DOCUMENT_BYTES} bytes"))
        return None
    try:
        root = yaml.compose(text, Loader=_FastLoader if yaml.__with_libyaml__ else _Loader)
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
        size = _expansion(root)
        return _Converter(problems, size).convert(root, "", _line(root), frozenset())
    except _TooDeep as exc:
        problems.append(_too_deep(exc))
        return None
    except _TooLarge:
        problems.append(Problem("", f"aliases and merge keys add more than {MAX_NODES} values to the document"))
        return None


def _too_deep(exc: _TooDeep) -> Problem:
    return Problem(exc.path, f"nested deeper than {MAX_DEPTH} levels (aliases count as the values they name)", exc.line)
