import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from switchgear.v1 import common_pb2 as _common_pb2
from switchgear.v1 import discovery_pb2 as _discovery_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterServiceRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: _common_pb2.Service
    def __init__(self, service: _Optional[_Union[_common_pb2.Service, _Mapping]] = ...) -> None: ...

class RegisterServiceResponse(_message.Message):
    __slots__ = ("service", "version")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    service: _common_pb2.Service
    version: str
    def __init__(self, service: _Optional[_Union[_common_pb2.Service, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...

class DeregisterServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeregisterServiceResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ("category",)
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    category: _common_pb2.ServiceCategory
    def __init__(self, category: _Optional[_Union[_common_pb2.ServiceCategory, str]] = ...) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services", "rejections")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[_common_pb2.Service]
    rejections: _containers.RepeatedCompositeFieldContainer[AgentRejection]
    def __init__(self, services: _Optional[_Iterable[_Union[_common_pb2.Service, _Mapping]]] = ..., rejections: _Optional[_Iterable[_Union[AgentRejection, _Mapping]]] = ...) -> None: ...

class AgentRejection(_message.Message):
    __slots__ = ("node_id", "version", "rejection")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    version: str
    rejection: _discovery_pb2.ServiceRejection
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[str] = ..., rejection: _Optional[_Union[_discovery_pb2.ServiceRejection, _Mapping]] = ...) -> None: ...

class GetServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetServiceResponse(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: _common_pb2.Service
    def __init__(self, service: _Optional[_Union[_common_pb2.Service, _Mapping]] = ...) -> None: ...

class ApplyConfigRequest(_message.Message):
    __slots__ = ("yaml", "source", "dry_run")
    YAML_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    source: str
    dry_run: bool
    def __init__(self, yaml: _Optional[str] = ..., source: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyConfigResponse(_message.Message):
    __slots__ = ("version", "added", "changed", "removed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    version: str
    added: _containers.RepeatedScalarFieldContainer[str]
    changed: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., added: _Optional[_Iterable[str]] = ..., changed: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("node", "connected", "peer", "acked_version", "nacked_version", "last_nack", "pending_version", "connected_at", "last_seen", "replica", "rejected_services", "snapshot_delivery")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    ACKED_VERSION_FIELD_NUMBER: _ClassVar[int]
    NACKED_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_FIELD_NUMBER: _ClassVar[int]
    PENDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SERVICES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    node: _discovery_pb2.Node
    connected: bool
    peer: str
    acked_version: str
    nacked_version: str
    last_nack: _discovery_pb2.NackDetail
    pending_version: str
    connected_at: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    replica: str
    rejected_services: _containers.RepeatedCompositeFieldContainer[_discovery_pb2.ServiceRejection]
    snapshot_delivery: str
    def __init__(self, node: _Optional[_Union[_discovery_pb2.Node, _Mapping]] = ..., connected: _Optional[bool] = ..., peer: _Optional[str] = ..., acked_version: _Optional[str] = ..., nacked_version: _Optional[str] = ..., last_nack: _Optional[_Union[_discovery_pb2.NackDetail, _Mapping]] = ..., pending_version: _Optional[str] = ..., connected_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replica: _Optional[str] = ..., rejected_services: _Optional[_Iterable[_Union[_discovery_pb2.ServiceRejection, _Mapping]]] = ..., snapshot_delivery: _Optional[str] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "current_version")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentStatus]
    current_version: str
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentStatus, _Mapping]]] = ..., current_version: _Optional[str] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSnapshotResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: _discovery_pb2.Snapshot
    def __init__(self, snapshot: _Optional[_Union[_discovery_pb2.Snapshot, _Mapping]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class EndpointStats(_message.Message):
    __slots__ = ("service", "endpoint", "category", "request_count", "success_rate", "error_rate", "avg_response_time_ms", "p99_response_time_ms", "cost_per_hour", "cache_hit_rate", "circuit_breaker_trips", "failover_count", "queue_length", "resource_utilization", "in_flight", "health", "weight", "input_tokens", "output_tokens", "errors", "p50_response_time_ms", "capacity")
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    AVG_RESPONSE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    P99_RESPONSE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    COST_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_BREAKER_TRIPS_FIELD_NUMBER: _ClassVar[int]
    FAILOVER_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    P50_RESPONSE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    service: str
    endpoint: str
    category: str
    request_count: int
    success_rate: float
    error_rate: float
    avg_response_time_ms: float
    p99_response_time_ms: float
    cost_per_hour: float
    cache_hit_rate: float
    circuit_breaker_trips: int
    failover_count: int
    queue_length: int
    resource_utilization: float
    in_flight: int
    health: _common_pb2.HealthState
    weight: int
    input_tokens: int
    output_tokens: int
    errors: _containers.ScalarMap[str, int]
    p50_response_time_ms: float
    capacity: int
    def __init__(self, service: _Optional[str] = ..., endpoint: _Optional[str] = ..., category: _Optional[str] = ..., request_count: _Optional[int] = ..., success_rate: _Optional[float] = ..., error_rate: _Optional[float] = ..., avg_response_time_ms: _Optional[float] = ..., p99_response_time_ms: _Optional[float] = ..., cost_per_hour: _Optional[float] = ..., cache_hit_rate: _Optional[float] = ..., circuit_breaker_trips: _Optional[int] = ..., failover_count: _Optional[int] = ..., queue_length: _Optional[int] = ..., resource_utilization: _Optional[float] = ..., in_flight: _Optional[int] = ..., health: _Optional[_Union[_common_pb2.HealthState, str]] = ..., weight: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., errors: _Optional[_Mapping[str, int]] = ..., p50_response_time_ms: _Optional[float] = ..., capacity: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("window", "stats", "reporting_agents", "agents")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    REPORTING_AGENTS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    window: _duration_pb2.Duration
    stats: _containers.RepeatedCompositeFieldContainer[EndpointStats]
    reporting_agents: int
    agents: _containers.RepeatedCompositeFieldContainer[AgentLoad]
    def __init__(self, window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., stats: _Optional[_Iterable[_Union[EndpointStats, _Mapping]]] = ..., reporting_agents: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[AgentLoad, _Mapping]]] = ...) -> None: ...

class AgentLoad(_message.Message):
    __slots__ = ("node_id", "in_flight", "queue_length", "last_report")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    in_flight: int
    queue_length: int
    last_report: _timestamp_pb2.Timestamp
    def __init__(self, node_id: _Optional[str] = ..., in_flight: _Optional[int] = ..., queue_length: _Optional[int] = ..., last_report: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("recovered_limit",)
    RECOVERED_LIMIT_FIELD_NUMBER: _ClassVar[int]
    recovered_limit: int
    def __init__(self, recovered_limit: _Optional[int] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("rule", "service", "severity", "condition", "value", "action", "action_detail", "fired_at", "recovered_at", "fired_version", "recovered_version")
    RULE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTION_DETAIL_FIELD_NUMBER: _ClassVar[int]
    FIRED_AT_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_AT_FIELD_NUMBER: _ClassVar[int]
    FIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_VERSION_FIELD_NUMBER: _ClassVar[int]
    rule: str
    service: str
    severity: str
    condition: str
    value: float
    action: str
    action_detail: str
    fired_at: _timestamp_pb2.Timestamp
    recovered_at: _timestamp_pb2.Timestamp
    fired_version: str
    recovered_version: str
    def __init__(self, rule: _Optional[str] = ..., service: _Optional[str] = ..., severity: _Optional[str] = ..., condition: _Optional[str] = ..., value: _Optional[float] = ..., action: _Optional[str] = ..., action_detail: _Optional[str] = ..., fired_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recovered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fired_version: _Optional[str] = ..., recovered_version: _Optional[str] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("firing", "recovered")
    FIRING_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    firing: _containers.RepeatedCompositeFieldContainer[Alert]
    recovered: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, firing: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., recovered: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class ListReplicasRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class ManagedReplica(_message.Message):
    __slots__ = ("id", "service", "node", "state", "url", "restarts", "last_log", "message", "draining", "serving", "pid")
    ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    id: str
    service: str
    node: str
    state: str
    url: str
    restarts: int
    last_log: _containers.RepeatedScalarFieldContainer[str]
    message: str
    draining: bool
    serving: bool
    pid: int
    def __init__(self, id: _Optional[str] = ..., service: _Optional[str] = ..., node: _Optional[str] = ..., state: _Optional[str] = ..., url: _Optional[str] = ..., restarts: _Optional[int] = ..., last_log: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., draining: _Optional[bool] = ..., serving: _Optional[bool] = ..., pid: _Optional[int] = ...) -> None: ...

class ListReplicasResponse(_message.Message):
    __slots__ = ("replicas", "decisions")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ManagedReplica]
    decisions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, replicas: _Optional[_Iterable[_Union[ManagedReplica, _Mapping]]] = ..., decisions: _Optional[_Iterable[str]] = ...) -> None: ...
