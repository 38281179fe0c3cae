"""`@lean`: a frozen dataclass made as cheaply as a plain one, still frozen afterwards.

A frozen dataclass's generated `__init__` sets each field through `object.__setattr__` (the
class's own `__setattr__` refuses): about 0.1 us a field, five times a plain class's. The
request path makes a dozen such objects per call (its events, targets, results), a few per
cent of an agent's CPU per request. `lean` replaces that `__init__` with one of the same
signature that writes the instance's `__dict__` directly; the class stays frozen (assignment
still raises FrozenInstanceError), equal, hashable and printable exactly as before.

Only for what it can copy exactly: a frozen dataclass without `__slots__`, `InitVar`s or
`__post_init__` (checked when decorated). Fields made by a `default_factory` get a fresh value
per instance as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")

_NO_VALUE = object()  # a default_factory field's argument was not passed


def lean(cls: type[T]) -> type[T]:
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"@lean is for frozen dataclasses; {cls.__name__} is not one")
    if "__slots__" in cls.__dict__ or hasattr(cls, "__post_init__"):
        raise TypeError(f"@lean cannot copy {cls.__name__}'s __init__ (slots or __post_init__)")
    plain = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if any(name not in plain and "InitVar" in str(field.type) for name, field in cls.__dataclass_fields__.items()):  # type: ignore[attr-defined]
        raise TypeError(f"@lean cannot copy {cls.__name__}'s __init__ (InitVar)")
    if any(name == "self" or name.startswith("__") for name in plain):
        raise TypeError(f"@lean cannot copy {cls.__name__}'s __init__ (a field named self or __*)")
    namespace: dict[str, Any] = {"__no_value": _NO_VALUE}
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = field.name  # (the generated names all begin with "__", which no field's does)
        has_factory = field.default_factory is not dataclasses.MISSING
        if field.default is not dataclasses.MISSING:
            namespace[f"__default_{name}"] = field.default
        if has_factory:
            namespace[f"__factory_{name}"] = field.default_factory
        if not field.init:
            if has_factory:
                body.append(f"__d[{name!r}] = __factory_{name}()")
            elif field.default is not dataclasses.MISSING:
                body.append(f"__d[{name!r}] = __default_{name}")
            continue
        if has_factory:
            param = f"{name}=__no_value"
            body.append(f"__d[{name!r}] = __factory_{name}() if {name} is __no_value else {name}")
        else:
            param = name if field.default is dataclasses.MISSING else f"{name}=__default_{name}"
            body.append(f"__d[{name!r}] = {name}")
        (keyword if field.kw_only else positional).append(param)
    signature = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    source = f"def __init__({signature}):\n    __d = self.__dict__\n" + "".join(f"    {line}\n" for line in body)
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    setattr(cls, "__init__", init)  # noqa: B010 - (mypy refuses assigning a method)
    return cls
