"""The one converter between `stats.LoadRow` and loadreport.proto's EndpointLoad."""

from __future__ import annotations

from switchgear.v1 import loadreport_pb2
from switchgear.wire.stats import SUMS, WIRE_NAMES, LoadRow


def row_to_proto(row: LoadRow) -> loadreport_pb2.EndpointLoad:
    return loadreport_pb2.EndpointLoad(
        service=row.service, endpoint=row.endpoint, category=row.category,
        requests_failed=[loadreport_pb2.ErrorCount(kind=k, count=n) for k, n in row.failed],
        latency_buckets=row.latency_buckets, in_flight=row.in_flight, queue_length=row.queue_length,
        capacity=row.capacity,
        **{WIRE_NAMES.get(name, name): getattr(row, name) for name in SUMS},
    )


def row_from_proto(msg: loadreport_pb2.EndpointLoad) -> LoadRow:
    return LoadRow(
        service=msg.service, endpoint=msg.endpoint, category=msg.category,
        failed=tuple((e.kind, e.count) for e in msg.requests_failed),
        latency_buckets=tuple(msg.latency_buckets), in_flight=msg.in_flight, queue_length=msg.queue_length,
        capacity=msg.capacity,
        **{name: getattr(msg, WIRE_NAMES.get(name, name)) for name in SUMS},
    )
