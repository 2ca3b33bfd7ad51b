"""The state machines of jobs and tasks: which transitions exist at all."""

from __future__ import annotations

from django.db import models


class JobStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class TaskStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    LEASED = "leased", "Leased"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.LEASED, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    # LEASED -> QUEUED is a requeue (lease expired, agent gone, retryable failure).
    TaskStatus.LEASED: frozenset(
        {TaskStatus.SUCCEEDED, TaskStatus.QUEUED, TaskStatus.FAILED, TaskStatus.CANCELLED}
    ),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}

JOB_ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
JOB_FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def sources_of(transitions: dict[str, frozenset[str]], target: str) -> list[str]:
    """The states from which `target` may be entered; used in conditional UPDATEs."""
    return [state for state, targets in transitions.items() if target in targets]
