import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServiceCategory(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVICE_CATEGORY_UNSPECIFIED: _ClassVar[ServiceCategory]
    SERVICE_CATEGORY_LLM: _ClassVar[ServiceCategory]
    SERVICE_CATEGORY_DOCUMENT: _ClassVar[ServiceCategory]
    SERVICE_CATEGORY_KNOWLEDGE_GRAPH: _ClassVar[ServiceCategory]
    SERVICE_CATEGORY_VECTOR_DB: _ClassVar[ServiceCategory]
    SERVICE_CATEGORY_EMBEDDING: _ClassVar[ServiceCategory]

class HealthState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_STATE_UNSPECIFIED: _ClassVar[HealthState]
    HEALTH_STATE_HEALTHY: _ClassVar[HealthState]
    HEALTH_STATE_DEGRADED: _ClassVar[HealthState]
    HEALTH_STATE_EJECTED: _ClassVar[HealthState]
    HEALTH_STATE_DRAINING: _ClassVar[HealthState]
SERVICE_CATEGORY_UNSPECIFIED: ServiceCategory
SERVICE_CATEGORY_LLM: ServiceCategory
SERVICE_CATEGORY_DOCUMENT: ServiceCategory
SERVICE_CATEGORY_KNOWLEDGE_GRAPH: ServiceCategory
SERVICE_CATEGORY_VECTOR_DB: ServiceCategory
SERVICE_CATEGORY_EMBEDDING: ServiceCategory
HEALTH_STATE_UNSPECIFIED: HealthState
HEALTH_STATE_HEALTHY: HealthState
HEALTH_STATE_DEGRADED: HealthState
HEALTH_STATE_EJECTED: HealthState
HEALTH_STATE_DRAINING: HealthState

class SecretRef(_message.Message):
    __slots__ = ("env", "file")
    ENV_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    env: str
    file: str
    def __init__(self, env: _Optional[str] = ..., file: _Optional[str] = ...) -> None: ...

class Pricing(_message.Message):
    __slots__ = ("cost_per_1k_tokens", "input_cost_per_1k_tokens", "output_cost_per_1k_tokens", "cost_per_request", "cache_read_input_cost_per_1k_tokens", "cache_write_input_cost_per_1k_tokens", "web_search_cost_per_1k_requests")
    COST_PER_1K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_COST_PER_1K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_COST_PER_1K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_INPUT_COST_PER_1K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_INPUT_COST_PER_1K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEB_SEARCH_COST_PER_1K_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    cost_per_1k_tokens: float
    input_cost_per_1k_tokens: float
    output_cost_per_1k_tokens: float
    cost_per_request: float
    cache_read_input_cost_per_1k_tokens: float
    cache_write_input_cost_per_1k_tokens: float
    web_search_cost_per_1k_requests: float
    def __init__(self, cost_per_1k_tokens: _Optional[float] = ..., input_cost_per_1k_tokens: _Optional[float] = ..., output_cost_per_1k_tokens: _Optional[float] = ..., cost_per_request: _Optional[float] = ..., cache_read_input_cost_per_1k_tokens: _Optional[float] = ..., cache_write_input_cost_per_1k_tokens: _Optional[float] = ..., web_search_cost_per_1k_requests: _Optional[float] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("id", "url", "weight", "priority", "health", "max_concurrency", "protocol", "api_key", "model", "pricing", "max_tokens", "options_json", "rpm_limit", "tpm_limit", "tags", "provider", "source_service", "context_window", "capabilities")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRICING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    RPM_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TPM_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    id: str
    url: str
    weight: int
    priority: int
    health: HealthState
    max_concurrency: int
    protocol: str
    api_key: SecretRef
    model: str
    pricing: Pricing
    max_tokens: int
    options_json: str
    rpm_limit: int
    tpm_limit: int
    tags: _containers.ScalarMap[str, str]
    provider: str
    source_service: str
    context_window: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., url: _Optional[str] = ..., weight: _Optional[int] = ..., priority: _Optional[int] = ..., health: _Optional[_Union[HealthState, str]] = ..., max_concurrency: _Optional[int] = ..., protocol: _Optional[str] = ..., api_key: _Optional[_Union[SecretRef, _Mapping]] = ..., model: _Optional[str] = ..., pricing: _Optional[_Union[Pricing, _Mapping]] = ..., max_tokens: _Optional[int] = ..., options_json: _Optional[str] = ..., rpm_limit: _Optional[int] = ..., tpm_limit: _Optional[int] = ..., tags: _Optional[_Mapping[str, str]] = ..., provider: _Optional[str] = ..., source_service: _Optional[str] = ..., context_window: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("name", "category", "protocol", "endpoints", "api_key", "model", "max_tokens", "pricing", "capabilities", "priority", "strategy", "timeout", "options_json", "metadata", "fallbacks", "context_window")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRICING_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    category: ServiceCategory
    protocol: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    api_key: SecretRef
    model: str
    max_tokens: int
    pricing: Pricing
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    strategy: str
    timeout: _duration_pb2.Duration
    options_json: str
    metadata: _containers.ScalarMap[str, str]
    fallbacks: _containers.RepeatedScalarFieldContainer[str]
    context_window: int
    def __init__(self, name: _Optional[str] = ..., category: _Optional[_Union[ServiceCategory, str]] = ..., protocol: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., api_key: _Optional[_Union[SecretRef, _Mapping]] = ..., model: _Optional[str] = ..., max_tokens: _Optional[int] = ..., pricing: _Optional[_Union[Pricing, _Mapping]] = ..., capabilities: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ..., strategy: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., options_json: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., fallbacks: _Optional[_Iterable[str]] = ..., context_window: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cost_usd", "estimated", "cache_read_input_tokens", "cache_write_input_tokens", "reasoning_tokens", "web_search_requests")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEB_SEARCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cost_usd: float
    estimated: bool
    cache_read_input_tokens: int
    cache_write_input_tokens: int
    reasoning_tokens: int
    web_search_requests: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_usd: _Optional[float] = ..., estimated: _Optional[bool] = ..., cache_read_input_tokens: _Optional[int] = ..., cache_write_input_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., web_search_requests: _Optional[int] = ...) -> None: ...
