import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from switchgear.v1 import common_pb2 as _common_pb2
from switchgear.v1 import governance_pb2 as _governance_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotDelivery(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SNAPSHOT_DELIVERY_UNSPECIFIED: _ClassVar[SnapshotDelivery]
    SNAPSHOT_DELIVERY_WHOLE: _ClassVar[SnapshotDelivery]
    SNAPSHOT_DELIVERY_DELTA: _ClassVar[SnapshotDelivery]
SNAPSHOT_DELIVERY_UNSPECIFIED: SnapshotDelivery
SNAPSHOT_DELIVERY_WHOLE: SnapshotDelivery
SNAPSHOT_DELIVERY_DELTA: SnapshotDelivery

class Node(_message.Message):
    __slots__ = ("id", "zone", "build_version", "protocols", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    BUILD_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOLS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    zone: str
    build_version: str
    protocols: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., zone: _Optional[str] = ..., build_version: _Optional[str] = ..., protocols: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class NackDetail(_message.Message):
    __slots__ = ("field_path", "message")
    FIELD_PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    field_path: str
    message: str
    def __init__(self, field_path: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StreamSnapshotsRequest(_message.Message):
    __slots__ = ("node", "version_info", "response_nonce", "error_detail", "rejected_services", "delivery")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_INFO_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_NONCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SERVICES_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    node: Node
    version_info: str
    response_nonce: str
    error_detail: NackDetail
    rejected_services: _containers.RepeatedCompositeFieldContainer[ServiceRejection]
    delivery: SnapshotDelivery
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., version_info: _Optional[str] = ..., response_nonce: _Optional[str] = ..., error_detail: _Optional[_Union[NackDetail, _Mapping]] = ..., rejected_services: _Optional[_Iterable[_Union[ServiceRejection, _Mapping]]] = ..., delivery: _Optional[_Union[SnapshotDelivery, str]] = ...) -> None: ...

class ServiceRejection(_message.Message):
    __slots__ = ("service", "error_detail")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    service: str
    error_detail: NackDetail
    def __init__(self, service: _Optional[str] = ..., error_detail: _Optional[_Union[NackDetail, _Mapping]] = ...) -> None: ...

class StreamSnapshotsResponse(_message.Message):
    __slots__ = ("version_info", "nonce", "snapshot", "delta")
    VERSION_INFO_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    version_info: str
    nonce: str
    snapshot: Snapshot
    delta: SnapshotDelta
    def __init__(self, version_info: _Optional[str] = ..., nonce: _Optional[str] = ..., snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., delta: _Optional[_Union[SnapshotDelta, _Mapping]] = ...) -> None: ...

class SnapshotDelta(_message.Message):
    __slots__ = ("version", "base_version", "services", "removed_services", "settings", "governance")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_SERVICES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    GOVERNANCE_FIELD_NUMBER: _ClassVar[int]
    version: str
    base_version: str
    services: _containers.RepeatedCompositeFieldContainer[_common_pb2.Service]
    removed_services: _containers.RepeatedScalarFieldContainer[str]
    settings: DataPlaneSettings
    governance: SnapshotGovernance
    def __init__(self, version: _Optional[str] = ..., base_version: _Optional[str] = ..., services: _Optional[_Iterable[_Union[_common_pb2.Service, _Mapping]]] = ..., removed_services: _Optional[_Iterable[str]] = ..., settings: _Optional[_Union[DataPlaneSettings, _Mapping]] = ..., governance: _Optional[_Union[SnapshotGovernance, _Mapping]] = ...) -> None: ...

class SnapshotGovernance(_message.Message):
    __slots__ = ("tenants", "keys")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[_governance_pb2.Tenant]
    keys: _containers.RepeatedCompositeFieldContainer[_governance_pb2.KeyDigest]
    def __init__(self, tenants: _Optional[_Iterable[_Union[_governance_pb2.Tenant, _Mapping]]] = ..., keys: _Optional[_Iterable[_Union[_governance_pb2.KeyDigest, _Mapping]]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("version", "services", "settings", "tenants", "keys")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    version: str
    services: _containers.RepeatedCompositeFieldContainer[_common_pb2.Service]
    settings: DataPlaneSettings
    tenants: _containers.RepeatedCompositeFieldContainer[_governance_pb2.Tenant]
    keys: _containers.RepeatedCompositeFieldContainer[_governance_pb2.KeyDigest]
    def __init__(self, version: _Optional[str] = ..., services: _Optional[_Iterable[_Union[_common_pb2.Service, _Mapping]]] = ..., settings: _Optional[_Union[DataPlaneSettings, _Mapping]] = ..., tenants: _Optional[_Iterable[_Union[_governance_pb2.Tenant, _Mapping]]] = ..., keys: _Optional[_Iterable[_Union[_governance_pb2.KeyDigest, _Mapping]]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("max_retries", "backoff_strategy", "base_delay", "max_delay")
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BASE_DELAY_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_FIELD_NUMBER: _ClassVar[int]
    max_retries: int
    backoff_strategy: str
    base_delay: _duration_pb2.Duration
    max_delay: _duration_pb2.Duration
    def __init__(self, max_retries: _Optional[int] = ..., backoff_strategy: _Optional[str] = ..., base_delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CircuitBreakerSettings(_message.Message):
    __slots__ = ("failure_threshold",)
    FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    failure_threshold: int
    def __init__(self, failure_threshold: _Optional[int] = ...) -> None: ...

class CacheSettings(_message.Message):
    __slots__ = ("enabled", "ttl")
    class TtlEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _duration_pb2.Duration
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    ttl: _containers.MessageMap[str, _duration_pb2.Duration]
    def __init__(self, enabled: _Optional[bool] = ..., ttl: _Optional[_Mapping[str, _duration_pb2.Duration]] = ...) -> None: ...

class CategoryPolicy(_message.Message):
    __slots__ = ("strategy", "max_cost_per_request", "min_success_rate", "max_queue_size", "timeout", "attempt_timeout_floor", "attempt_timeout_ceiling", "attempt_timeout_factor", "hedge_min_priority", "overload_threshold", "underload_threshold", "stream_upstream")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MIN_SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TIMEOUT_FLOOR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TIMEOUT_CEILING_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TIMEOUT_FACTOR_FIELD_NUMBER: _ClassVar[int]
    HEDGE_MIN_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    OVERLOAD_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    UNDERLOAD_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STREAM_UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    max_cost_per_request: float
    min_success_rate: float
    max_queue_size: int
    timeout: _duration_pb2.Duration
    attempt_timeout_floor: _duration_pb2.Duration
    attempt_timeout_ceiling: _duration_pb2.Duration
    attempt_timeout_factor: float
    hedge_min_priority: int
    overload_threshold: float
    underload_threshold: float
    stream_upstream: bool
    def __init__(self, strategy: _Optional[str] = ..., max_cost_per_request: _Optional[float] = ..., min_success_rate: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., attempt_timeout_floor: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., attempt_timeout_ceiling: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., attempt_timeout_factor: _Optional[float] = ..., hedge_min_priority: _Optional[int] = ..., overload_threshold: _Optional[float] = ..., underload_threshold: _Optional[float] = ..., stream_upstream: _Optional[bool] = ...) -> None: ...

class DataPlaneSettings(_message.Message):
    __slots__ = ("default_strategy", "retry_policy", "circuit_breaker", "cache", "health_check_timeout", "category_policies", "default_timeout", "preset_responses", "discovery_cache_ttl")
    class CategoryPoliciesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: CategoryPolicy
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[CategoryPolicy, _Mapping]] = ...) -> None: ...
    class PresetResponsesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEFAULT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    RETRY_POLICY_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_BREAKER_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_POLICIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PRESET_RESPONSES_FIELD_NUMBER: _ClassVar[int]
    DISCOVERY_CACHE_TTL_FIELD_NUMBER: _ClassVar[int]
    default_strategy: str
    retry_policy: RetryPolicy
    circuit_breaker: CircuitBreakerSettings
    cache: CacheSettings
    health_check_timeout: _duration_pb2.Duration
    category_policies: _containers.MessageMap[str, CategoryPolicy]
    default_timeout: _duration_pb2.Duration
    preset_responses: _containers.ScalarMap[str, str]
    discovery_cache_ttl: _duration_pb2.Duration
    def __init__(self, default_strategy: _Optional[str] = ..., retry_policy: _Optional[_Union[RetryPolicy, _Mapping]] = ..., circuit_breaker: _Optional[_Union[CircuitBreakerSettings, _Mapping]] = ..., cache: _Optional[_Union[CacheSettings, _Mapping]] = ..., health_check_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., category_policies: _Optional[_Mapping[str, CategoryPolicy]] = ..., default_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., preset_responses: _Optional[_Mapping[str, str]] = ..., discovery_cache_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
