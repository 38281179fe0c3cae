"""Protobuf messages from the JSON a person writes: enum values by their short names.

`"category": "llm"` means SERVICE_CATEGORY_LLM and `"health": "healthy"` HEALTH_STATE_HEALTHY
(any case; the full names and numbers still work). An unknown value is refused naming the field
and listing the valid values, before anything is sent.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


class JsonInputError(ValueError):
    """Input that is not valid JSON for the message; the text names the field."""


def _prefix(enum: EnumDescriptor) -> str:
    """"SERVICE_CATEGORY_" of SERVICE_CATEGORY_UNSPECIFIED (the house's zero values); else ""."""
    zero = enum.values_by_number.get(0)
    return zero.name.removesuffix("UNSPECIFIED") if zero is not None and zero.name.endswith("_UNSPECIFIED") else ""


def short_names(enum: EnumDescriptor) -> list[str]:
    """The enum's values without their common prefix, lower case, UNSPECIFIED left out."""
    prefix = _prefix(enum)
    return [v.name.removeprefix(prefix).lower() for v in enum.values if v.number != 0]


def _enum_value(value: Any, enum: EnumDescriptor, path: str) -> Any:
    if not isinstance(value, str) or value in enum.values_by_name:
        return value
    full = _prefix(enum) + value.upper()
    if full in enum.values_by_name and enum.values_by_name[full].number != 0:
        return full
    raise JsonInputError(f"{path}: {value!r} is not a valid {enum.name}; use one of "
                         f"{', '.join(short_names(enum))} (or the full names, e.g. "
                         f"{enum.values[-1].name})")


def _field_value(value: Any, field: FieldDescriptor, path: str) -> Any:
    if field.enum_type is not None:
        return _enum_value(value, field.enum_type, path)
    if field.message_type is not None and isinstance(value, dict):
        return expand_enums(value, field.message_type, path)
    return value


def expand_enums(data: dict[str, Any], descriptor: Descriptor, path: str = "") -> dict[str, Any]:
    """`data` with short enum names replaced by full ones, recursively (lists and maps too)."""
    fields = {**descriptor.fields_by_name, **{f.json_name: f for f in descriptor.fields}}
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = fields.get(key)
        where = f"{path}.{key}" if path else key
        if field is None:
            out[key] = value  # ParseDict names unknown fields itself
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[key] = ({k: _field_value(v, value_field, f"{where}[{k!r}]") for k, v in value.items()}
                        if isinstance(value, dict) else value)
        elif isinstance(value, list):  # a repeated field
            out[key] = [_field_value(v, field, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            out[key] = _field_value(value, field, where)
    return out


def parse(text: str | bytes, message: M) -> M:
    """`message` filled from JSON `text`; JsonInputError naming the field on a bad value."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise JsonInputError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise JsonInputError(f"must be a JSON object (a {message.DESCRIPTOR.name})")
    try:
        json_format.ParseDict(expand_enums(data, message.DESCRIPTOR), message)
    except json_format.ParseError as exc:
        raise JsonInputError(str(exc)) from None
    return message
