"""The task scheduler's edge to the wire: tasks.proto messages <-> its dataclasses.

Conversions from the wire raise ConvertError naming the field; semantic checks are the
scheduler's. In a pool, the wire's 0 means "not limited" where the model uses math.inf.
"""

from __future__ import annotations

import math

from switchgear.controlplane.convert import ConvertError, category_to_proto, duration, seconds, timestamp
from switchgear.controlplane.model import Category
from switchgear.controlplane.tasks.lifecycle import Completion
from switchgear.controlplane.tasks.model import AgentOffer, Resources, Task, TaskError, TaskState, Usage
from switchgear.controlplane.tasks.scheduler import AgentStats, PoolUsage, Stats, Submission
from switchgear.v1 import common_pb2, tasks_pb2

__all__ = ["ConvertError"]

MAX_WAIT_S = 30.0
_OUTCOMES = {
    tasks_pb2.TASK_OUTCOME_SUCCEEDED: "succeeded",
    tasks_pb2.TASK_OUTCOME_FAILED: "failed",
    tasks_pb2.TASK_OUTCOME_RELEASED: "released",
}


def state_to_proto(state: TaskState) -> int:
    return int(tasks_pb2.TaskState.Value(f"TASK_STATE_{state.name}"))


def state_from_proto(value: int, path: str) -> TaskState:
    try:
        name = tasks_pb2.TaskState.Name(value)
    except ValueError:
        raise ConvertError(path, f"unknown state {value}") from None
    if value == tasks_pb2.TASK_STATE_UNSPECIFIED:
        raise ConvertError(path, "unspecified state")
    return TaskState[name.removeprefix("TASK_STATE_")]


def resources_to_proto(r: Resources) -> tasks_pb2.Resources:
    def finite(x: float) -> float:
        return 0.0 if math.isinf(x) else x

    return tasks_pb2.Resources(
        cpu=finite(r.cpu), memory_bytes=int(finite(r.memory_bytes)), gpu=finite(r.gpu),
        disk_iops=finite(r.disk_iops), network_mbps=finite(r.network_mbps),
    )


def resources_from_proto(msg: tasks_pb2.Resources, path: str) -> Resources:
    values = (msg.cpu, float(msg.memory_bytes), msg.gpu, msg.disk_iops, msg.network_mbps)
    for name, value in zip(("cpu", "memory_bytes", "gpu", "disk_iops", "network_mbps"), values, strict=True):
        if not math.isfinite(value) or value < 0:
            raise ConvertError(f"{path}.{name}", "must be a finite number >= 0")
    return Resources(*values)


def _usage_to_proto(u: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens, cost_usd=u.cost_usd,
                            estimated=u.estimated)


def task_to_proto(t: Task, effective_priority: float, *, with_payload: bool = True) -> tasks_pb2.Task:
    msg = tasks_pb2.Task(
        id=t.id, tenant=t.tenant, service=t.service, category=category_to_proto(Category(t.category)),  # type: ignore[arg-type]
        method=t.method, payload=t.payload if with_payload else b"", payload_blob_id=t.payload_blob_id,
        priority=t.priority, effective_priority=effective_priority, timeout=duration(t.timeout_s),
        idempotency_key=t.idempotency_key, state=state_to_proto(t.state),  # type: ignore[arg-type]
        attempts=t.attempts, max_attempts=t.max_attempts, requirements=resources_to_proto(t.requirements),
        agent=t.agent, progress=t.progress, progress_message=t.progress_message, result=t.result,
        endpoint=t.endpoint, usage=_usage_to_proto(t.usage), origin=t.origin,
        created_at=timestamp(t.submitted_at), updated_at=timestamp(t.updated_at or t.submitted_at),
    )
    if t.error is not None:
        msg.error.CopyFrom(tasks_pb2.TaskError(kind=t.error.kind, message=t.error.message))
    for name in ("started_at", "finished_at", "not_before", "lease_expires_at"):
        value = getattr(t, name)
        if value:
            getattr(msg, name).CopyFrom(timestamp(value))
    return msg


def submission_from_proto(msg: tasks_pb2.SubmitTaskRequest) -> Submission:
    return Submission(
        service=msg.service, method=msg.method, payload=msg.payload, payload_blob_id=msg.payload_blob_id,
        priority=msg.priority, timeout_s=seconds(msg.timeout), idempotency_key=msg.idempotency_key,
        tenant=msg.tenant, max_attempts=msg.max_attempts,
    )


def defer_from_proto(msg: tasks_pb2.DeferInvokeRequest) -> Submission:
    if not msg.request_id:
        raise ConvertError("request_id", "required (it makes the fallback idempotent)")
    return Submission(
        service=msg.service, method=msg.method, payload=msg.payload, priority=msg.priority,
        idempotency_key=f"defer:{msg.request_id}", tenant=msg.tenant, origin="defer",
    )


def offer_from_proto(msg: tasks_pb2.LeaseTasksRequest) -> tuple[AgentOffer, float]:
    if not msg.agent:
        raise ConvertError("agent", "required")
    if msg.capacity < 1:
        raise ConvertError("capacity", "must be at least 1")
    declared = resources_from_proto(msg.resources, "resources")
    wait_s = seconds(msg.wait)
    if not 0 <= wait_s <= MAX_WAIT_S:
        raise ConvertError("wait", f"must be within 0..{MAX_WAIT_S:g} s")
    offer = AgentOffer(agent=msg.agent, capacity=msg.capacity, pool=declared, services=frozenset(msg.services),
                       max_tasks=msg.max_tasks or msg.capacity)
    return offer, wait_s


def completion_from_proto(msg: tasks_pb2.CompleteTaskRequest) -> Completion:
    outcome = _OUTCOMES.get(msg.outcome)
    if outcome is None:
        raise ConvertError("outcome", "required (succeeded, failed or released)")
    if not msg.lease_id:
        raise ConvertError("lease_id", "required")
    error = TaskError(msg.error.kind, msg.error.message) if msg.HasField("error") else None
    u = msg.usage
    return Completion(
        outcome=outcome, lease_id=msg.lease_id, result=msg.result, endpoint=msg.endpoint,
        usage=Usage(u.input_tokens, u.output_tokens, u.cost_usd, u.estimated), error=error, retryable=msg.retryable,
    )


def _pool_usage(u: PoolUsage) -> tasks_pb2.ResourceUsage:
    return tasks_pb2.ResourceUsage(
        used=resources_to_proto(u.used), capacity=resources_to_proto(u.capacity), utilisation=u.utilisation,
        tasks=u.tasks, task_capacity=u.task_capacity,
    )


def _agent_stats(a: AgentStats) -> tasks_pb2.AgentTaskStats:
    return tasks_pb2.AgentTaskStats(agent=a.agent, usage=_pool_usage(a.usage), peak_utilisation=a.peak,
                                    last_seen=timestamp(a.last_seen))


def stats_to_proto(s: Stats) -> tasks_pb2.GetTaskStatsResponse:
    return tasks_pb2.GetTaskStatsResponse(
        counts=s.counts, cluster=_pool_usage(s.cluster), agents=[_agent_stats(a) for a in s.agents],
        peak_utilisation=s.peak, max_concurrent_tasks=s.max_concurrent_tasks,
        aging_interval=duration(s.aging_interval_s), lease_ttl=duration(s.lease_ttl_s),
    )
