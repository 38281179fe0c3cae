import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from switchgear.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InvokeRequest(_message.Message):
    __slots__ = ("request_id", "category", "service", "method", "payload", "priority", "timeout", "user_id", "session_id", "max_retries", "required_capabilities")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    category: _common_pb2.ServiceCategory
    service: str
    method: str
    payload: bytes
    priority: int
    timeout: _duration_pb2.Duration
    user_id: str
    session_id: str
    max_retries: int
    required_capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., category: _Optional[_Union[_common_pb2.ServiceCategory, str]] = ..., service: _Optional[str] = ..., method: _Optional[str] = ..., payload: _Optional[bytes] = ..., priority: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., max_retries: _Optional[int] = ..., required_capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class InvokeResponse(_message.Message):
    __slots__ = ("request_id", "payload", "service", "endpoint", "attempts", "latency", "usage", "fallback", "snapshot_version", "cached", "fallback_source", "tenant", "target")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    payload: bytes
    service: str
    endpoint: str
    attempts: int
    latency: _duration_pb2.Duration
    usage: _common_pb2.Usage
    fallback: bool
    snapshot_version: str
    cached: bool
    fallback_source: str
    tenant: str
    target: TargetInfo
    def __init__(self, request_id: _Optional[str] = ..., payload: _Optional[bytes] = ..., service: _Optional[str] = ..., endpoint: _Optional[str] = ..., attempts: _Optional[int] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., fallback: _Optional[bool] = ..., snapshot_version: _Optional[str] = ..., cached: _Optional[bool] = ..., fallback_source: _Optional[str] = ..., tenant: _Optional[str] = ..., target: _Optional[_Union[TargetInfo, _Mapping]] = ...) -> None: ...

class TargetInfo(_message.Message):
    __slots__ = ("id", "provider", "protocol", "model", "pricing")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRICING_FIELD_NUMBER: _ClassVar[int]
    id: str
    provider: str
    protocol: str
    model: str
    pricing: _common_pb2.Pricing
    def __init__(self, id: _Optional[str] = ..., provider: _Optional[str] = ..., protocol: _Optional[str] = ..., model: _Optional[str] = ..., pricing: _Optional[_Union[_common_pb2.Pricing, _Mapping]] = ...) -> None: ...

class InvokeStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: InvokeRequest
    def __init__(self, request: _Optional[_Union[InvokeRequest, _Mapping]] = ...) -> None: ...

class InvokeStreamResponse(_message.Message):
    __slots__ = ("chunk", "end")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    end: InvokeStreamEnd
    def __init__(self, chunk: _Optional[bytes] = ..., end: _Optional[_Union[InvokeStreamEnd, _Mapping]] = ...) -> None: ...

class InvokeStreamEnd(_message.Message):
    __slots__ = ("request_id", "service", "endpoint", "attempts", "latency", "ttft", "usage", "failover", "snapshot_version", "finish_reason", "error_kind", "error_message", "target", "fallback", "fallback_source")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    TTFT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FAILOVER_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_SOURCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    service: str
    endpoint: str
    attempts: int
    latency: _duration_pb2.Duration
    ttft: _duration_pb2.Duration
    usage: _common_pb2.Usage
    failover: bool
    snapshot_version: str
    finish_reason: str
    error_kind: str
    error_message: str
    target: TargetInfo
    fallback: bool
    fallback_source: str
    def __init__(self, request_id: _Optional[str] = ..., service: _Optional[str] = ..., endpoint: _Optional[str] = ..., attempts: _Optional[int] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ttft: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., failover: _Optional[bool] = ..., snapshot_version: _Optional[str] = ..., finish_reason: _Optional[str] = ..., error_kind: _Optional[str] = ..., error_message: _Optional[str] = ..., target: _Optional[_Union[TargetInfo, _Mapping]] = ..., fallback: _Optional[bool] = ..., fallback_source: _Optional[str] = ...) -> None: ...
