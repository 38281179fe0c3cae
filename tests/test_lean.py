"""`@lean` (wire/lean.py): a frozen dataclass built by a cheaper __init__ behaves exactly as before."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

import pytest

from switchgear.adapters.base import AdapterRequest, TokenUsage
from switchgear.dataplane.events import AttemptEnd
from switchgear.wire.lean import lean


def declared() -> type:
    """One declaration, made twice: once left as dataclasses makes it, once made lean."""

    @dataclass(frozen=True)
    class Fields:
        a: int
        b: str = "b"
        c: list[int] = field(default_factory=list)
        d: float = field(default=1.5, repr=False)
        e: int = field(default=7, init=False)
        f: list[str] = field(default_factory=lambda: ["x"], init=False)
        g: int = field(default=0, kw_only=True)
        h: str = field(kw_only=True, default="h")

    return Fields


Plain, Lean = declared(), lean(declared())


def test_the_lean_init_takes_and_sets_what_the_generated_one_does() -> None:
    def shape(cls: type) -> list[tuple[str, object, object]]:
        params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
        return [(p.name, p.kind, p.default if isinstance(p.default, (int, float, str)) else "factory")
                for p in params]

    assert shape(Lean) == shape(Plain)
    for args, kwargs in [((1,), {}), ((2, "x", [3], 2.5), {"g": 4, "h": "k"}), ((3,), {"c": [9], "h": "z"})]:
        plain, quick = Plain(*args, **kwargs), Lean(*args, **kwargs)
        assert dataclasses.asdict(plain) == dataclasses.asdict(quick)
    one, two = Lean(1), Lean(1)
    assert one.c is not two.c and one.f is not two.f  # a fresh value per instance, as default_factory
    with pytest.raises(TypeError):
        Lean(1, "b", [], 1.0, 5)  # type: ignore[call-arg]  # g is keyword-only, e is not an argument
    with pytest.raises(TypeError):
        Lean()  # type: ignore[call-arg]


def test_a_lean_class_stays_frozen_equal_hashable_and_secret_free_in_its_repr() -> None:
    usage = TokenUsage(3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        usage.input_tokens = 5  # type: ignore[misc]
    assert usage == TokenUsage(3, 4) and hash(usage) == hash(TokenUsage(3, 4)) and usage != TokenUsage(3, 5)
    request = AdapterRequest("chat", {"a": 1}, 2.0, "r1")
    assert request.headers == {} and request.headers is not AdapterRequest("chat", {}, 2.0, "r2").headers
    assert AttemptEnd.__init__.__qualname__ == "AttemptEnd.__init__"
    assert AttemptEnd("r", "s", "c", "e", 1, 0.5).usage == TokenUsage()


def test_lean_refuses_what_it_cannot_copy_exactly() -> None:
    @dataclass
    class Mutable:
        a: int

    @dataclass(frozen=True, slots=True)
    class Slotted:
        a: int

    @dataclass(frozen=True)
    class Posted:
        a: int

        def __post_init__(self) -> None:
            pass

    for cls in (Mutable, Slotted, Posted):
        with pytest.raises(TypeError):
            lean(cls)
