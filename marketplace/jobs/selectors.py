"""Reads for jobs: listings, progress, and results in input order."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from marketplace.accounts.models import User
from marketplace.billing.selectors import job_cost
from marketplace.jobs.models import Job, Task, TaskRole, Verdict, Verification
from marketplace.jobs.states import JobStatus, TaskStatus
from marketplace.matching.scoring import HostView
from marketplace.matching.selectors import host_views_online, job_queued_reason


def job_list_for_buyer(*, buyer: User) -> QuerySet[Job]:
    return Job.objects.filter(buyer=buyer).select_related("model")


def job_get_for_buyer(*, buyer: User, job_id: str) -> Job | None:
    """The buyer's own job, or None (another tenant's job looks like no job)."""
    try:
        key = uuid.UUID(str(job_id))
    except ValueError:
        return None
    return job_list_for_buyer(buyer=buyer).filter(pk=key).first()


def job_task_attempts(*, job: Job) -> int:
    """Leases granted over all tasks; above the task count means some task was re-run."""
    return int(Task.objects.filter(job=job).aggregate(total=Sum("attempt"))["total"] or 0)


def job_energy(*, job: Job) -> dict[str, Any]:
    """Energy of the finished tasks: total Wh, and how much of it was measured rather than estimated."""
    rows = Task.objects.filter(job=job, status=TaskStatus.SUCCEEDED, energy_wh__isnull=False)
    totals = {
        row["energy_source"]: row["wh"] for row in rows.values("energy_source").annotate(wh=Sum("energy_wh"))
    }
    total = sum(totals.values())
    return {
        "wh": round(total, 6),
        "measured_wh": round(totals.get("nvml", 0.0), 6),
        "estimated_wh": round(totals.get("estimate", 0.0), 6),
        "wh_per_1k_items": round(1000 * total / job.items_done, 6) if job.items_done else None,
    }


def job_task_counts(*, job: Job) -> dict[str, int]:
    """The buyer's tasks by state (replicas and tie-breaks are counted under `verification`)."""
    counts = {status: 0 for status in TaskStatus.values}
    for row in Task.objects.filter(job=job, role=TaskRole.PRIMARY).values("status").annotate(n=Count("*")):
        counts[row["status"]] = row["n"]
    return counts


def job_verification(*, job: Job) -> dict[str, Any]:
    """The job's verification level and what it cost so far: one aggregate over its runs (a job
    page and API pollers read it every half second)."""
    counts = Task.objects.filter(job=job).aggregate(
        extra_runs=Count("job", filter=Q(role=TaskRole.REPLICA)),
        tie_breaks=Count("job", filter=Q(needs_trusted=True)),
        runs_passed=Count("job", filter=Q(verdict=Verdict.PASSED)),
        runs_failed=Count("job", filter=Q(verdict=Verdict.FAILED)),
        runs_unchecked=Count("job", filter=Q(verdict=Verdict.UNCHECKED)),
        tasks_settled=Count("job", filter=Q(role=TaskRole.PRIMARY, settled=True)),
    )
    return {
        "level": job.verification,
        "spot_fraction": job.spot_fraction if job.verification == Verification.SPOT else None,
        "replicas": job.replicas if job.verification == Verification.REDUNDANT else None,
        **{name: int(n) for name, n in counts.items()},
    }


def job_summaries(*, jobs: Iterable[Job]) -> list[dict[str, Any]]:
    """`job_summary` of each job, reading the online hosts once for all the queued ones."""
    jobs = list(jobs)
    online = (
        host_views_online(now=timezone.now()) if any(j.status == JobStatus.QUEUED for j in jobs) else None
    )
    return [job_summary(job=job, online=online) for job in jobs]


def job_summary(*, job: Job, online: list[HostView] | None = None) -> dict[str, Any]:
    return {
        "id": str(job.pk),
        "status": job.status,
        "model": job.model.name,
        "task_size": job.task_size,
        "items_total": job.items_total,
        "items_done": job.items_done,
        "tasks": job_task_counts(job=job),
        "task_attempts": job_task_attempts(job=job),
        "green_only": job.green_only,
        "verification": job_verification(job=job),
        "energy": job_energy(job=job),
        "max_price_per_1k_minor": job.max_price_per_1k_minor,
        "priority": job.priority,
        "deadline": job.deadline,
        "region": job.region,
        "queued_reason": job_queued_reason(job=job, online=online),
        "cost": job_cost(job_id=str(job.pk), buyer_id=job.buyer_id),
        "failure_reason": job.failure_reason,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def job_results_jsonl(*, job: Job) -> Iterator[str]:
    """One line per input, in input order: {"index": i, "embedding": [...]}. Only settled outputs
    (checked as the job asked) are ever served."""
    tasks = Task.objects.filter(job=job, role=TaskRole.PRIMARY, settled=True).order_by("index")
    for task in tasks.only("first_item", "output", "dimension", "item_count").iterator(chunk_size=16):
        assert task.output is not None and task.dimension is not None  # set together on success
        vectors = np.frombuffer(bytes(task.output), dtype="<f4").reshape(task.item_count, task.dimension)
        for offset, vector in enumerate(vectors):
            yield json.dumps({"index": task.first_item + offset, "embedding": vector.tolist()}) + "\n"
