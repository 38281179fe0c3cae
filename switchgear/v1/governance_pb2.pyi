import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from switchgear.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UserType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USER_TYPE_UNSPECIFIED: _ClassVar[UserType]
    USER_TYPE_STANDARD: _ClassVar[UserType]
    USER_TYPE_PREMIUM: _ClassVar[UserType]
USER_TYPE_UNSPECIFIED: UserType
USER_TYPE_STANDARD: UserType
USER_TYPE_PREMIUM: UserType

class ServiceQuota(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute", "budget_per_hour_usd", "budget_per_day_usd")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PER_HOUR_USD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PER_DAY_USD_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    budget_per_hour_usd: float
    budget_per_day_usd: float
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., budget_per_hour_usd: _Optional[float] = ..., budget_per_day_usd: _Optional[float] = ...) -> None: ...

class TenantPolicy(_message.Message):
    __slots__ = ("allowed_services", "allowed_categories", "required_capabilities", "max_cost_per_request", "min_success_rate", "requests_per_minute", "tokens_per_minute", "budget_per_hour_usd", "budget_per_day_usd", "priority_cap", "services", "max_in_flight", "max_unfinished_tasks", "max_blobs", "max_blob_bytes")
    class ServicesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ServiceQuota
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ServiceQuota, _Mapping]] = ...) -> None: ...
    ALLOWED_SERVICES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MIN_SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PER_HOUR_USD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PER_DAY_USD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_CAP_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_UNFINISHED_TASKS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOB_BYTES_FIELD_NUMBER: _ClassVar[int]
    allowed_services: _containers.RepeatedScalarFieldContainer[str]
    allowed_categories: _containers.RepeatedScalarFieldContainer[_common_pb2.ServiceCategory]
    required_capabilities: _containers.RepeatedScalarFieldContainer[str]
    max_cost_per_request: float
    min_success_rate: float
    requests_per_minute: int
    tokens_per_minute: int
    budget_per_hour_usd: float
    budget_per_day_usd: float
    priority_cap: int
    services: _containers.MessageMap[str, ServiceQuota]
    max_in_flight: int
    max_unfinished_tasks: int
    max_blobs: int
    max_blob_bytes: int
    def __init__(self, allowed_services: _Optional[_Iterable[str]] = ..., allowed_categories: _Optional[_Iterable[_Union[_common_pb2.ServiceCategory, str]]] = ..., required_capabilities: _Optional[_Iterable[str]] = ..., max_cost_per_request: _Optional[float] = ..., min_success_rate: _Optional[float] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., budget_per_hour_usd: _Optional[float] = ..., budget_per_day_usd: _Optional[float] = ..., priority_cap: _Optional[int] = ..., services: _Optional[_Mapping[str, ServiceQuota]] = ..., max_in_flight: _Optional[int] = ..., max_unfinished_tasks: _Optional[int] = ..., max_blobs: _Optional[int] = ..., max_blob_bytes: _Optional[int] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("id", "display_name", "user_type", "policy", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    USER_TYPE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    display_name: str
    user_type: UserType
    policy: TenantPolicy
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., display_name: _Optional[str] = ..., user_type: _Optional[_Union[UserType, str]] = ..., policy: _Optional[_Union[TenantPolicy, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ApiKeyInfo(_message.Message):
    __slots__ = ("id", "tenant", "description", "created_at", "revoked", "revoked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    description: str
    created_at: _timestamp_pb2.Timestamp
    revoked: bool
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., description: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked: _Optional[bool] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class KeyDigest(_message.Message):
    __slots__ = ("id", "tenant", "sha256")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    sha256: bytes
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ("tenant", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    version: str
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("tenant", "policy", "user_type")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    USER_TYPE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    policy: TenantPolicy
    user_type: UserType
    def __init__(self, tenant: _Optional[str] = ..., policy: _Optional[_Union[TenantPolicy, _Mapping]] = ..., user_type: _Optional[_Union[UserType, str]] = ...) -> None: ...

class SetPolicyResponse(_message.Message):
    __slots__ = ("tenant", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    version: str
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...

class IssueKeyRequest(_message.Message):
    __slots__ = ("tenant", "description")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    description: str
    def __init__(self, tenant: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class IssueKeyResponse(_message.Message):
    __slots__ = ("key", "secret", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: ApiKeyInfo
    secret: str
    version: str
    def __init__(self, key: _Optional[_Union[ApiKeyInfo, _Mapping]] = ..., secret: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ("key", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: ApiKeyInfo
    version: str
    def __init__(self, key: _Optional[_Union[ApiKeyInfo, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKeyInfo, _Mapping]]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("tenant", "requests_this_minute", "tokens_this_minute", "cost_this_hour_usd", "cost_this_day_usd", "requests_total", "rejected_total", "cost_total_usd")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_THIS_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_THIS_MINUTE_FIELD_NUMBER: _ClassVar[int]
    COST_THIS_HOUR_USD_FIELD_NUMBER: _ClassVar[int]
    COST_THIS_DAY_USD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    COST_TOTAL_USD_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    requests_this_minute: int
    tokens_this_minute: int
    cost_this_hour_usd: float
    cost_this_day_usd: float
    requests_total: int
    rejected_total: int
    cost_total_usd: float
    def __init__(self, tenant: _Optional[str] = ..., requests_this_minute: _Optional[int] = ..., tokens_this_minute: _Optional[int] = ..., cost_this_hour_usd: _Optional[float] = ..., cost_this_day_usd: _Optional[float] = ..., requests_total: _Optional[int] = ..., rejected_total: _Optional[int] = ..., cost_total_usd: _Optional[float] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("usage",)
    USAGE_FIELD_NUMBER: _ClassVar[int]
    usage: _containers.RepeatedCompositeFieldContainer[TenantUsage]
    def __init__(self, usage: _Optional[_Iterable[_Union[TenantUsage, _Mapping]]] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "at", "actor", "action", "target", "version", "before_json", "after_json", "detail")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BEFORE_JSON_FIELD_NUMBER: _ClassVar[int]
    AFTER_JSON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    id: int
    at: _timestamp_pb2.Timestamp
    actor: str
    action: str
    target: str
    version: str
    before_json: str
    after_json: str
    detail: str
    def __init__(self, id: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., version: _Optional[str] = ..., before_json: _Optional[str] = ..., after_json: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...
