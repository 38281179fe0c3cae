"""Wire conversions both the registry's (convert.py) and governance's (convert_governance.py)
converters use: the field-path error, categories, durations and timestamps. Its own module so
that neither converter imports the other's helpers back (convert.py builds the snapshot from
both)."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from switchgear.controlplane.model import Category
from switchgear.v1 import common_pb2


class ConvertError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def category_to_proto(category: Category) -> int:
    return int(common_pb2.ServiceCategory.Value(f"SERVICE_CATEGORY_{category.name}"))


def category_from_proto(value: int, path: str = "category") -> Category:
    if value == common_pb2.SERVICE_CATEGORY_UNSPECIFIED:
        raise ConvertError(path, "required (one of llm, document, knowledge_graph, vector_db, embedding)")
    try:
        name = common_pb2.ServiceCategory.Name(value)
    except ValueError:
        raise ConvertError(path, f"unknown category {value}") from None
    return Category[name.removeprefix("SERVICE_CATEGORY_")]


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def seconds(d: duration_pb2.Duration) -> float:
    return float(d.ToNanoseconds()) / 1e9


def timestamp(epoch_s: float) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(round(epoch_s * 1e9))
    return t
