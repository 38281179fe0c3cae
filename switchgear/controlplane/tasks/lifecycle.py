"""Task state transitions (pure): lease, heartbeat, complete, expire, release, cancel.

Each function takes a task and `now` (epoch seconds) and returns the new task; none does I/O.

Retries. A failure the agent marks retryable (the upstream ErrorKind is retryable: 5xx,
rate-limited, timeout, connect) re-queues the task with

    not_before = now + min(max_delay_s, base_delay_s * 2 ** (attempts - 1))

until `attempts == max_attempts`; then it is DEAD_LETTERED keeping the last error. A
non-retryable failure (client error, auth, config, context length) ends it FAILED at once.
A lease that expires (the agent died or lost the control plane) uses up the attempt too - a
task that kills its agent must not loop forever - but is re-queued without backoff, since
the service did not fail. A lease given back unrun (RELEASED) uses up nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from switchgear.controlplane.tasks.model import Task, TaskError, TaskState, Usage


@dataclass(frozen=True)
class RetryPolicy:
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def backoff_s(self, attempts: int) -> float:
        """Delay before the next attempt after `attempts` (>= 1) failed ones."""
        return min(self.max_delay_s, self.base_delay_s * 2.0 ** max(0, min(attempts - 1, 30)))


class TransitionError(ValueError):
    """The transition does not apply to the task's state (the caller maps it to a code)."""


def lease(task: Task, agent: str, lease_id: str, now: float, ttl_s: float) -> Task:
    if task.state is not TaskState.QUEUED:
        raise TransitionError(f"task {task.id} is {task.state.value}, not queued")
    return dataclasses.replace(
        task, state=TaskState.LEASED, attempts=task.attempts + 1, agent=agent, lease_id=lease_id,
        lease_expires_at=now + ttl_s, updated_at=now, progress=0.0, progress_message="",
    )


@dataclass(frozen=True)
class Beat:
    task: Task
    lease_valid: bool
    cancelled: bool


def heartbeat(
    task: Task, lease_id: str, now: float, ttl_s: float, progress: float, message: str, started: bool
) -> Beat:
    """Renew the lease and record progress; a stale lease or a final task is reported, not changed."""
    if task.state is TaskState.CANCELLED:
        return Beat(task, lease_valid=False, cancelled=True)
    if not task.state.holds_lease or task.lease_id != lease_id or task.lease_expires_at <= now:
        return Beat(task, lease_valid=False, cancelled=False)
    state = TaskState.RUNNING if started or task.state is TaskState.RUNNING else TaskState.LEASED
    new = dataclasses.replace(
        task, state=state, lease_expires_at=now + ttl_s, updated_at=now,
        progress=min(1.0, max(0.0, progress)), progress_message=message,
        started_at=task.started_at or (now if state is TaskState.RUNNING else 0.0),
    )
    return Beat(new, lease_valid=True, cancelled=False)


def succeed(task: Task, now: float, result: bytes, endpoint: str, usage: Usage) -> Task:
    return dataclasses.replace(
        task, state=TaskState.SUCCEEDED, result=result, endpoint=endpoint, usage=usage,
        finished_at=now, updated_at=now, progress=1.0, started_at=task.started_at or now,
    )


def fail(task: Task, now: float, error: TaskError, retryable: bool, policy: RetryPolicy) -> Task:
    if not retryable:
        return dataclasses.replace(task, state=TaskState.FAILED, error=error, finished_at=now, updated_at=now)
    if task.attempts >= task.max_attempts:
        return dataclasses.replace(task, state=TaskState.DEAD_LETTERED, error=error, finished_at=now, updated_at=now)
    return dataclasses.replace(
        task, state=TaskState.QUEUED, error=error, not_before=now + policy.backoff_s(task.attempts),
        lease_expires_at=0.0, updated_at=now,
    )


def expired(task: Task, now: float) -> bool:
    return task.state.holds_lease and task.lease_expires_at <= now


def expire(task: Task, now: float) -> Task:
    """The lease ran out: re-queue at once (attempt used), or dead-letter when none are left."""
    error = TaskError("lease_expired", f"agent {task.agent!r} did not renew its lease (attempt {task.attempts})")
    if task.attempts >= task.max_attempts:
        return dataclasses.replace(task, state=TaskState.DEAD_LETTERED, error=error, finished_at=now, updated_at=now)
    return dataclasses.replace(task, state=TaskState.QUEUED, error=error, not_before=now, lease_expires_at=0.0,
                               updated_at=now)


def release(task: Task, now: float) -> Task:
    """Given back unrun: queued again and the attempt is not counted."""
    return dataclasses.replace(task, state=TaskState.QUEUED, attempts=max(0, task.attempts - 1),
                               lease_expires_at=0.0, not_before=now, updated_at=now)


def orphan(task: Task, now: float) -> Task:
    """A queued task whose service was deregistered: it can never run, so it fails."""
    return dataclasses.replace(task, state=TaskState.FAILED, finished_at=now, updated_at=now,
                               error=TaskError("service_removed", f"service {task.service!r} is no longer registered"))


def cancel(task: Task, now: float) -> Task:
    if task.state.final:
        raise TransitionError(f"task {task.id} is already {task.state.value}")
    return dataclasses.replace(
        task, state=TaskState.CANCELLED, finished_at=now, updated_at=now, lease_expires_at=0.0,
        error=TaskError("cancelled", "cancelled on request"),
    )


@dataclass(frozen=True)
class Completion:
    """What an agent reported for one lease."""

    outcome: str  # "succeeded" | "failed" | "released"
    lease_id: str
    result: bytes = b""
    endpoint: str = ""
    usage: Usage = field(default_factory=Usage)
    error: TaskError | None = None
    retryable: bool = False


def complete(task: Task, report: Completion, lease_known: bool, now: float, policy: RetryPolicy) -> Task | None:
    """The task after `report`, or None when the report does not count.

    A report counts when its lease is the task's current one. A success under an older lease
    of the same task (the agent was slow, its lease expired and the task was re-leased) is
    also kept while the task is not final: the work is done, so doing it again would be waste;
    the current holder learns from its next heartbeat that its lease is gone.
    """
    if task.state.final:
        return None
    current = task.state.holds_lease and task.lease_id == report.lease_id
    if report.outcome == "succeeded" and (current or lease_known):
        return succeed(task, now, report.result, report.endpoint, report.usage)
    if not current:
        return None
    if report.outcome == "released":
        return release(task, now)
    error = report.error or TaskError("unknown", "the agent reported a failure without an error")
    return fail(task, now, error, report.retryable, policy)
