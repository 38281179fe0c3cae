import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from switchgear.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_QUEUED: _ClassVar[TaskState]
    TASK_STATE_LEASED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_SUCCEEDED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]
    TASK_STATE_DEAD_LETTERED: _ClassVar[TaskState]

class TaskOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_OUTCOME_UNSPECIFIED: _ClassVar[TaskOutcome]
    TASK_OUTCOME_SUCCEEDED: _ClassVar[TaskOutcome]
    TASK_OUTCOME_FAILED: _ClassVar[TaskOutcome]
    TASK_OUTCOME_RELEASED: _ClassVar[TaskOutcome]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_QUEUED: TaskState
TASK_STATE_LEASED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_SUCCEEDED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState
TASK_STATE_DEAD_LETTERED: TaskState
TASK_OUTCOME_UNSPECIFIED: TaskOutcome
TASK_OUTCOME_SUCCEEDED: TaskOutcome
TASK_OUTCOME_FAILED: TaskOutcome
TASK_OUTCOME_RELEASED: TaskOutcome

class Resources(_message.Message):
    __slots__ = ("cpu", "memory_bytes", "gpu", "disk_iops", "network_mbps")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    DISK_IOPS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MBPS_FIELD_NUMBER: _ClassVar[int]
    cpu: float
    memory_bytes: int
    gpu: float
    disk_iops: float
    network_mbps: float
    def __init__(self, cpu: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., gpu: _Optional[float] = ..., disk_iops: _Optional[float] = ..., network_mbps: _Optional[float] = ...) -> None: ...

class TaskError(_message.Message):
    __slots__ = ("kind", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("id", "tenant", "service", "category", "method", "payload", "payload_blob_id", "priority", "effective_priority", "timeout", "idempotency_key", "state", "attempts", "max_attempts", "requirements", "agent", "progress", "progress_message", "result", "endpoint", "usage", "error", "origin", "created_at", "updated_at", "started_at", "finished_at", "not_before", "lease_expires_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    service: str
    category: _common_pb2.ServiceCategory
    method: str
    payload: bytes
    payload_blob_id: str
    priority: int
    effective_priority: float
    timeout: _duration_pb2.Duration
    idempotency_key: str
    state: TaskState
    attempts: int
    max_attempts: int
    requirements: Resources
    agent: str
    progress: float
    progress_message: str
    result: bytes
    endpoint: str
    usage: _common_pb2.Usage
    error: TaskError
    origin: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    not_before: _timestamp_pb2.Timestamp
    lease_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., service: _Optional[str] = ..., category: _Optional[_Union[_common_pb2.ServiceCategory, str]] = ..., method: _Optional[str] = ..., payload: _Optional[bytes] = ..., payload_blob_id: _Optional[str] = ..., priority: _Optional[int] = ..., effective_priority: _Optional[float] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., attempts: _Optional[int] = ..., max_attempts: _Optional[int] = ..., requirements: _Optional[_Union[Resources, _Mapping]] = ..., agent: _Optional[str] = ..., progress: _Optional[float] = ..., progress_message: _Optional[str] = ..., result: _Optional[bytes] = ..., endpoint: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., error: _Optional[_Union[TaskError, _Mapping]] = ..., origin: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubmitTaskRequest(_message.Message):
    __slots__ = ("service", "method", "payload", "payload_blob_id", "priority", "timeout", "idempotency_key", "tenant", "max_attempts")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    service: str
    method: str
    payload: bytes
    payload_blob_id: str
    priority: int
    timeout: _duration_pb2.Duration
    idempotency_key: str
    tenant: str
    max_attempts: int
    def __init__(self, service: _Optional[str] = ..., method: _Optional[str] = ..., payload: _Optional[bytes] = ..., payload_blob_id: _Optional[str] = ..., priority: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., tenant: _Optional[str] = ..., max_attempts: _Optional[int] = ...) -> None: ...

class SubmitTaskResponse(_message.Message):
    __slots__ = ("task", "created")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    task: Task
    created: bool
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class UploadBlobRequest(_message.Message):
    __slots__ = ("content_type", "chunk")
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    content_type: str
    chunk: bytes
    def __init__(self, content_type: _Optional[str] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadBlobResponse(_message.Message):
    __slots__ = ("blob_id", "size")
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    blob_id: str
    size: int
    def __init__(self, blob_id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class DownloadBlobRequest(_message.Message):
    __slots__ = ("blob_id", "task_id", "lease_id")
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    blob_id: str
    task_id: str
    lease_id: str
    def __init__(self, blob_id: _Optional[str] = ..., task_id: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class DownloadBlobResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("states", "tenant", "service", "limit")
    STATES_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[TaskState]
    tenant: str
    service: str
    limit: int
    def __init__(self, states: _Optional[_Iterable[_Union[TaskState, str]]] = ..., tenant: _Optional[str] = ..., service: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...

class WatchTasksRequest(_message.Message):
    __slots__ = ("ids", "tenant", "service")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    tenant: str
    service: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., tenant: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class WatchTasksResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class GetTaskStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResourceUsage(_message.Message):
    __slots__ = ("used", "capacity", "utilisation", "tasks", "task_capacity")
    class UtilisationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    UTILISATION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TASK_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    used: Resources
    capacity: Resources
    utilisation: _containers.ScalarMap[str, float]
    tasks: int
    task_capacity: int
    def __init__(self, used: _Optional[_Union[Resources, _Mapping]] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., utilisation: _Optional[_Mapping[str, float]] = ..., tasks: _Optional[int] = ..., task_capacity: _Optional[int] = ...) -> None: ...

class AgentTaskStats(_message.Message):
    __slots__ = ("agent", "usage", "peak_utilisation", "last_seen")
    class PeakUtilisationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AGENT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PEAK_UTILISATION_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    agent: str
    usage: ResourceUsage
    peak_utilisation: _containers.ScalarMap[str, float]
    last_seen: _timestamp_pb2.Timestamp
    def __init__(self, agent: _Optional[str] = ..., usage: _Optional[_Union[ResourceUsage, _Mapping]] = ..., peak_utilisation: _Optional[_Mapping[str, float]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetTaskStatsResponse(_message.Message):
    __slots__ = ("counts", "cluster", "agents", "peak_utilisation", "max_concurrent_tasks", "aging_interval", "lease_ttl")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PeakUtilisationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    PEAK_UTILISATION_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_TASKS_FIELD_NUMBER: _ClassVar[int]
    AGING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.ScalarMap[str, int]
    cluster: ResourceUsage
    agents: _containers.RepeatedCompositeFieldContainer[AgentTaskStats]
    peak_utilisation: _containers.ScalarMap[str, float]
    max_concurrent_tasks: int
    aging_interval: _duration_pb2.Duration
    lease_ttl: _duration_pb2.Duration
    def __init__(self, counts: _Optional[_Mapping[str, int]] = ..., cluster: _Optional[_Union[ResourceUsage, _Mapping]] = ..., agents: _Optional[_Iterable[_Union[AgentTaskStats, _Mapping]]] = ..., peak_utilisation: _Optional[_Mapping[str, float]] = ..., max_concurrent_tasks: _Optional[int] = ..., aging_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LeaseTasksRequest(_message.Message):
    __slots__ = ("agent", "capacity", "resources", "services", "max_tasks", "wait")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    agent: str
    capacity: int
    resources: Resources
    services: _containers.RepeatedScalarFieldContainer[str]
    max_tasks: int
    wait: _duration_pb2.Duration
    def __init__(self, agent: _Optional[str] = ..., capacity: _Optional[int] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., services: _Optional[_Iterable[str]] = ..., max_tasks: _Optional[int] = ..., wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LeasedTask(_message.Message):
    __slots__ = ("task", "lease_id", "lease_ttl")
    TASK_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_FIELD_NUMBER: _ClassVar[int]
    task: Task
    lease_id: str
    lease_ttl: _duration_pb2.Duration
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., lease_id: _Optional[str] = ..., lease_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LeaseTasksResponse(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[LeasedTask]
    def __init__(self, leases: _Optional[_Iterable[_Union[LeasedTask, _Mapping]]] = ...) -> None: ...

class HeartbeatTaskRequest(_message.Message):
    __slots__ = ("task_id", "lease_id", "agent", "progress", "progress_message", "started")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    agent: str
    progress: float
    progress_message: str
    started: bool
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., agent: _Optional[str] = ..., progress: _Optional[float] = ..., progress_message: _Optional[str] = ..., started: _Optional[bool] = ...) -> None: ...

class HeartbeatTaskResponse(_message.Message):
    __slots__ = ("lease_valid", "cancelled", "lease_expires_at")
    LEASE_VALID_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    lease_valid: bool
    cancelled: bool
    lease_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, lease_valid: _Optional[bool] = ..., cancelled: _Optional[bool] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CompleteTaskRequest(_message.Message):
    __slots__ = ("task_id", "lease_id", "agent", "outcome", "result", "endpoint", "usage", "error", "retryable")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    agent: str
    outcome: TaskOutcome
    result: bytes
    endpoint: str
    usage: _common_pb2.Usage
    error: TaskError
    retryable: bool
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., agent: _Optional[str] = ..., outcome: _Optional[_Union[TaskOutcome, str]] = ..., result: _Optional[bytes] = ..., endpoint: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., error: _Optional[_Union[TaskError, _Mapping]] = ..., retryable: _Optional[bool] = ...) -> None: ...

class CompleteTaskResponse(_message.Message):
    __slots__ = ("accepted", "task")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    task: Task
    def __init__(self, accepted: _Optional[bool] = ..., task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class DeferInvokeRequest(_message.Message):
    __slots__ = ("request_id", "service", "method", "payload", "priority", "tenant", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    service: str
    method: str
    payload: bytes
    priority: int
    tenant: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., service: _Optional[str] = ..., method: _Optional[str] = ..., payload: _Optional[bytes] = ..., priority: _Optional[int] = ..., tenant: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeferInvokeResponse(_message.Message):
    __slots__ = ("task", "queue_id", "message")
    TASK_FIELD_NUMBER: _ClassVar[int]
    QUEUE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    task: Task
    queue_id: str
    message: str
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., queue_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
