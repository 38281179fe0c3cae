"""The queue's decisions (pure): effective priority with aging, order, and what to lease.

Aging. A task's effective priority is

    effective = min(10, priority + waited_s / aging_interval_s)

where `waited_s` counts from submission (a retried task keeps its age). With the default
interval of 60 s a priority-1 task reaches the top priority after 9 minutes; among equal
effective priorities the older task goes first, so once at the top it only waits for the
older top tasks ahead of it: low priority cannot starve.

Leasing. For one agent's request the ready tasks (QUEUED, past `not_before`, of a service the
agent runs) are taken in order of (effective priority desc, submitted_at asc, id). Each is
leased when it fits the agent's free resources and a slot is left (agent capacity, the
request's max, and the cluster-wide max_concurrent_tasks). A task that does not fit is
skipped so smaller, lower tasks can use the room (backfill) - except a task at the top
effective priority that would fit the agent's whole pool: it reserves the agent, and nothing
below it is leased there until it fits. That keeps big tasks from being starved by a stream
of small ones once they have aged to the top.
"""

from __future__ import annotations

from collections.abc import Iterable

from switchgear.controlplane.tasks.model import AgentOffer, Holding, Resources, Task, TaskState

MAX_PRIORITY = 10
MIN_PRIORITY = 1
DEFAULT_PRIORITY = 5
DEFAULT_AGING_INTERVAL_S = 60.0


def effective_priority(priority: int, waited_s: float, aging_interval_s: float = DEFAULT_AGING_INTERVAL_S) -> float:
    """min(10, priority + max(0, waited_s) / aging_interval_s); no aging when the interval is 0."""
    bonus = max(0.0, waited_s) / aging_interval_s if aging_interval_s > 0 else 0.0
    return min(float(MAX_PRIORITY), priority + bonus)


def order_key(task: Task, now: float, aging_interval_s: float) -> tuple[float, float, str]:
    """Sort key: higher effective priority first, then older, then id (a total order)."""
    return (-effective_priority(task.priority, now - task.submitted_at, aging_interval_s), task.submitted_at, task.id)


def ready(task: Task, now: float) -> bool:
    return task.state is TaskState.QUEUED and task.not_before <= now


def ordered(tasks: Iterable[Task], now: float, aging_interval_s: float) -> list[Task]:
    return sorted(tasks, key=lambda t: order_key(t, now, aging_interval_s))


def select(
    candidates: Iterable[Task],
    offer: AgentOffer,
    pool: Resources,
    holding: Holding,
    *,
    cluster_in_flight: int,
    max_concurrent: int,
    now: float,
    aging_interval_s: float = DEFAULT_AGING_INTERVAL_S,
) -> list[Task]:
    """The tasks to lease to `offer.agent` now, in lease order (see the module docstring).

    Invariants (property-tested): the chosen tasks plus `holding` fit `pool`; there are at
    most `offer.capacity - holding.tasks` of them and the cluster stays within
    `max_concurrent`; a task that comes earlier in the order but was not chosen did not fit
    the room left when its turn came.
    """
    slots = min(offer.capacity - holding.tasks, offer.max_tasks, max_concurrent - cluster_in_flight)
    if slots <= 0:
        return []
    free = pool - holding.resources
    chosen: list[Task] = []
    runnable = (t for t in candidates if ready(t, now) and t.service in offer.services)
    for task in ordered(runnable, now, aging_interval_s):
        if len(chosen) >= slots:
            break
        if task.requirements.fits_in(free):
            chosen.append(task)
            free = free - task.requirements
        elif (
            effective_priority(task.priority, now - task.submitted_at, aging_interval_s) >= MAX_PRIORITY
            and task.requirements.fits_in(pool)
        ):
            break  # reserve this agent for the top task until enough of it drains
    return chosen
