import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from switchgear.v1 import discovery_pb2 as _discovery_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamLoadStatsRequest(_message.Message):
    __slots__ = ("node", "endpoint_loads", "load_report_interval", "snapshot_version", "tenant_loads", "node_resources", "replicas")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_LOADS_FIELD_NUMBER: _ClassVar[int]
    LOAD_REPORT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_LOADS_FIELD_NUMBER: _ClassVar[int]
    NODE_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    node: _discovery_pb2.Node
    endpoint_loads: _containers.RepeatedCompositeFieldContainer[EndpointLoad]
    load_report_interval: _duration_pb2.Duration
    snapshot_version: str
    tenant_loads: _containers.RepeatedCompositeFieldContainer[TenantLoad]
    node_resources: NodeResources
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, node: _Optional[_Union[_discovery_pb2.Node, _Mapping]] = ..., endpoint_loads: _Optional[_Iterable[_Union[EndpointLoad, _Mapping]]] = ..., load_report_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., snapshot_version: _Optional[str] = ..., tenant_loads: _Optional[_Iterable[_Union[TenantLoad, _Mapping]]] = ..., node_resources: _Optional[_Union[NodeResources, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class NodeResources(_message.Message):
    __slots__ = ("cpu", "memory_bytes", "gpu")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    cpu: float
    memory_bytes: int
    gpu: float
    def __init__(self, cpu: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., gpu: _Optional[float] = ...) -> None: ...

class ReplicaAssignment(_message.Message):
    __slots__ = ("id", "service", "command", "env", "inherit_env", "port", "url", "readiness_url", "readiness_timeout", "restart_backoff", "restart_max_backoff", "max_crashes", "crash_window", "stop_grace", "log_bytes", "backend", "image", "volumes")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    INHERIT_ENV_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    READINESS_URL_FIELD_NUMBER: _ClassVar[int]
    READINESS_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RESTART_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    RESTART_MAX_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    MAX_CRASHES_FIELD_NUMBER: _ClassVar[int]
    CRASH_WINDOW_FIELD_NUMBER: _ClassVar[int]
    STOP_GRACE_FIELD_NUMBER: _ClassVar[int]
    LOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    id: str
    service: str
    command: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    inherit_env: _containers.RepeatedScalarFieldContainer[str]
    port: int
    url: str
    readiness_url: str
    readiness_timeout: _duration_pb2.Duration
    restart_backoff: _duration_pb2.Duration
    restart_max_backoff: _duration_pb2.Duration
    max_crashes: int
    crash_window: _duration_pb2.Duration
    stop_grace: _duration_pb2.Duration
    log_bytes: int
    backend: str
    image: str
    volumes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., service: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., inherit_env: _Optional[_Iterable[str]] = ..., port: _Optional[int] = ..., url: _Optional[str] = ..., readiness_url: _Optional[str] = ..., readiness_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., restart_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., restart_max_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_crashes: _Optional[int] = ..., crash_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., stop_grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., log_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., image: _Optional[str] = ..., volumes: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("id", "service", "state", "url", "restarts", "last_log", "message", "pid")
    ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    id: str
    service: str
    state: str
    url: str
    restarts: int
    last_log: _containers.RepeatedScalarFieldContainer[str]
    message: str
    pid: int
    def __init__(self, id: _Optional[str] = ..., service: _Optional[str] = ..., state: _Optional[str] = ..., url: _Optional[str] = ..., restarts: _Optional[int] = ..., last_log: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class TenantLoad(_message.Message):
    __slots__ = ("tenant", "requests", "rejected", "tokens", "cost_usd")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    requests: int
    rejected: int
    tokens: int
    cost_usd: float
    def __init__(self, tenant: _Optional[str] = ..., requests: _Optional[int] = ..., rejected: _Optional[int] = ..., tokens: _Optional[int] = ..., cost_usd: _Optional[float] = ...) -> None: ...

class StreamLoadStatsResponse(_message.Message):
    __slots__ = ("load_reporting_interval", "latency_bucket_bounds_s", "assignments", "assignments_set")
    LOAD_REPORTING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUCKET_BOUNDS_S_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_SET_FIELD_NUMBER: _ClassVar[int]
    load_reporting_interval: _duration_pb2.Duration
    latency_bucket_bounds_s: _containers.RepeatedScalarFieldContainer[float]
    assignments: _containers.RepeatedCompositeFieldContainer[ReplicaAssignment]
    assignments_set: bool
    def __init__(self, load_reporting_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., latency_bucket_bounds_s: _Optional[_Iterable[float]] = ..., assignments: _Optional[_Iterable[_Union[ReplicaAssignment, _Mapping]]] = ..., assignments_set: _Optional[bool] = ...) -> None: ...

class ErrorCount(_message.Message):
    __slots__ = ("kind", "count")
    KIND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    count: int
    def __init__(self, kind: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class EndpointLoad(_message.Message):
    __slots__ = ("service", "endpoint", "category", "requests_issued", "requests_succeeded", "requests_failed", "in_flight", "latency_sum_s", "latency_count", "success_latency_sum_s", "success_latency_count", "latency_buckets", "ttft_sum_s", "ttft_count", "input_tokens", "output_tokens", "cost_usd", "failovers", "cache_lookups", "cache_hits", "circuit_breaker_trips", "queue_length", "capacity")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ISSUED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SUM_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_COUNT_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_LATENCY_SUM_S_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_LATENCY_COUNT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    TTFT_SUM_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_COUNT_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    CACHE_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_BREAKER_TRIPS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    service: str
    endpoint: str
    category: str
    requests_issued: int
    requests_succeeded: int
    requests_failed: _containers.RepeatedCompositeFieldContainer[ErrorCount]
    in_flight: int
    latency_sum_s: float
    latency_count: int
    success_latency_sum_s: float
    success_latency_count: int
    latency_buckets: _containers.RepeatedScalarFieldContainer[int]
    ttft_sum_s: float
    ttft_count: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    failovers: int
    cache_lookups: int
    cache_hits: int
    circuit_breaker_trips: int
    queue_length: int
    capacity: int
    def __init__(self, service: _Optional[str] = ..., endpoint: _Optional[str] = ..., category: _Optional[str] = ..., requests_issued: _Optional[int] = ..., requests_succeeded: _Optional[int] = ..., requests_failed: _Optional[_Iterable[_Union[ErrorCount, _Mapping]]] = ..., in_flight: _Optional[int] = ..., latency_sum_s: _Optional[float] = ..., latency_count: _Optional[int] = ..., success_latency_sum_s: _Optional[float] = ..., success_latency_count: _Optional[int] = ..., latency_buckets: _Optional[_Iterable[int]] = ..., ttft_sum_s: _Optional[float] = ..., ttft_count: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_usd: _Optional[float] = ..., failovers: _Optional[int] = ..., cache_lookups: _Optional[int] = ..., cache_hits: _Optional[int] = ..., circuit_breaker_trips: _Optional[int] = ..., queue_length: _Optional[int] = ..., capacity: _Optional[int] = ...) -> None: ...
