"""Dataclass <-> JSON-able data for the registry model, driven by type hints.

Used to persist the model in the store and to hash it canonically. Pure: stdlib only.
Supported field types: str, int, float, bool, Enum subclasses, nested frozen dataclasses,
`X | None`, `tuple[X, ...]` and `tuple[tuple[str, X], ...]` (sorted key/value pairs).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
import typing
from enum import Enum
from functools import cache
from typing import Any, TypeVar

import orjson

T = TypeVar("T")


def to_jsonable(obj: Any) -> Any:
    """Plain dicts, lists and scalars; enums become their values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, tuple):
        return [to_jsonable(item) for item in obj]
    return obj


def from_jsonable(cls: type[T], data: Any) -> T:
    """Rebuild `cls` from `to_jsonable` output; missing fields take the dataclass defaults."""
    return typing.cast(T, _decode(cls, data))


def canonical_hash(obj: Any) -> str:
    """SHA-256 hex of the canonical JSON (sorted keys) of a model object."""
    return hashlib.sha256(orjson.dumps(to_jsonable(obj), option=orjson.OPT_SORT_KEYS)).hexdigest()


def dumps(obj: Any) -> str:
    return orjson.dumps(to_jsonable(obj), option=orjson.OPT_SORT_KEYS).decode()


def dumps_memo(obj: Any) -> str:
    """`dumps`, memoised per (immutable, hashable) item: a commit re-encodes only the items that
    changed, not a 10,000-service registry each time (bench/controlplane)."""
    try:
        return _dumps_cached(obj)
    except TypeError:  # an unhashable item: encode it every time
        return dumps(obj)


@functools.lru_cache(maxsize=32768)
def _dumps_cached(obj: Any) -> str:
    return dumps(obj)


def loads(cls: type[T], text: str | bytes) -> T:
    return from_jsonable(cls, orjson.loads(text))


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner, data)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(_decode(args[0], item) for item in data)
        return tuple(_decode(arg, item) for arg, item in zip(args, data, strict=True))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        return tp(**{k: _decode(hints[k], v) for k, v in data.items() if k in known})
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(data)
    if tp is float:
        return float(data)
    return data
