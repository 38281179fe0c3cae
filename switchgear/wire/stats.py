"""One load-report row, as both planes see it: the agent's reporter builds them, the control
plane's collector sums them (loadreport.proto's EndpointLoad; `wire.loadreport` converts).

`LoadSums` holds the additive figures (counts, seconds, tokens, USD) that a window of reports
adds up; `LoadRow` is one (service, endpoint)'s row of one report: its sums, the failures by
kind, the latency histogram and the gauges. Pure: no generated code, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class LoadSums:
    """What adds up across reports and agents. Units: seconds and USD; the rest are counts."""

    issued: int = 0
    succeeded: int = 0
    latency_sum_s: float = 0.0
    latency_count: int = 0
    success_latency_sum_s: float = 0.0
    success_latency_count: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    failovers: int = 0
    cache_lookups: int = 0
    cache_hits: int = 0
    breaker_trips: int = 0


#: LoadSums' field names in declaration order (the collector's vector order).
SUMS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LoadSums))
FLOAT_SUMS = frozenset({"latency_sum_s", "success_latency_sum_s", "ttft_sum_s", "cost_usd"})
#: Where the wire (loadreport.proto) names a figure otherwise than the row does.
WIRE_NAMES = {"issued": "requests_issued", "succeeded": "requests_succeeded", "breaker_trips": "circuit_breaker_trips"}


def typed_sums(values: Mapping[str, float]) -> dict[str, Any]:
    """`values` (by LoadSums field, missing = 0) with each count rounded back to an int."""
    return {name: values.get(name, 0.0) if name in FLOAT_SUMS else round(values.get(name, 0)) for name in SUMS}


@dataclass(frozen=True, kw_only=True)
class LoadRow(LoadSums):
    """One endpoint's row of one report (endpoint "" = service-level figures, e.g. the cache's)."""

    service: str
    endpoint: str
    category: str = ""
    failed: tuple[tuple[str, int], ...] = ()  # (ErrorKind value, count)
    latency_buckets: tuple[int, ...] = ()
    in_flight: int = 0
    queue_length: int = 0
    capacity: int = 0  # a gauge: the endpoint's capacity as this agent takes it (0 = unknown)
