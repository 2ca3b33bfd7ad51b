"""Reads for dispatch: hosts and jobs as the matcher's plain views, and the answers built on them
(why a host does or does not get a task, why a job is still queued)."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from hearth_agent.policy import Verdict
from marketplace.hosts.models import Host
from marketplace.hosts.power import power_latest
from marketplace.hosts.services import host_policy
from marketplace.jobs.models import Job, Task, TaskRole
from marketplace.jobs.states import JOB_ACTIVE, JobStatus, TaskStatus
from marketplace.matching.scoring import HostView, TaskView, match_score, pair_rejection, queued_reason
from marketplace.trust.services import host_trusted


def host_view(host: Host, *, now: datetime, leased: int | None = None) -> HostView:
    """The host as the matcher sees it; `leased` (its tasks in flight) is counted when not given."""
    if leased is None:
        leased = Task.objects.filter(leased_to=host, status=TaskStatus.LEASED).count()
    fresh = host.power_at is not None and host.power_at >= power_fresh_since(now)
    power = power_latest(host) if fresh else None
    items_per_s = (host.benchmark or {}).get("minilm_items_per_s")
    return HostView(
        ready=host.ready,
        slots=host.slots,
        leased=leased,
        memory_mb=host.memory_mb,
        draining=host.draining,
        policy=host_policy(host=host),
        power=power,
        agent_verdict=Verdict(host.agent_work_allowed, host.agent_work_reason)
        if fresh
        else Verdict(True, ""),
        quarantine_reason=host.quarantine_reason if host.quarantined_at is not None else None,
        hardware_ok=host.hardware_ok,
        hardware_reason=host.hardware_reason,
        verified=host.verified_at is not None,
        region=host.region,
        items_per_s=float(items_per_s) if isinstance(items_per_s, int | float) else None,
        reliability=host.reliability,
    )


def power_fresh_since(now: datetime) -> datetime:
    """A power reading older than this is stale: the matcher treats the host as having none."""
    return now - timedelta(seconds=3 * settings.HEARTH_POWER_INTERVAL_S)


def task_view(job: Job) -> TaskView:
    """What any task of `job` asks of its host (every task of a job asks the same)."""
    return TaskView(
        min_memory_mb=job.model.min_memory_mb,
        max_price_per_1k_minor=job.max_price_per_1k_minor,
        green_only=job.green_only,
        region=job.region,
    )


def host_views_online(*, now: datetime) -> list[HostView]:
    """Every host with a live connection, each with its leases counted in the same query."""
    hosts = (
        Host.objects.filter(status=Host.Status.ONLINE, revoked_at__isnull=True)
        .exclude(channel_name="")
        .annotate(in_flight=Count("leased_tasks", filter=Q(leased_tasks__status=TaskStatus.LEASED)))
    )
    return [host_view(host, now=now, leased=host.in_flight) for host in hosts]


def job_queued_reason(
    *, job: Job, now: datetime | None = None, online: list[HostView] | None = None
) -> str | None:
    """Why no online host can take the queued job's tasks; None when it is not queued or one can.

    `online` (from `host_views_online`) lets a caller with many jobs read the hosts once."""
    if job.status != JobStatus.QUEUED:
        return None
    if online is None:
        online = host_views_online(now=now or timezone.now())
    return queued_reason(task_view(job), online)


def dispatch_explain(*, task: Task, host: Host, now: datetime | None = None) -> dict[str, Any]:
    """Whether `host` may run `task`, the filter that says no, and the score's parts.

    Beside the pure filter, the claim's rules about this task's state and its other runs."""
    now = now or timezone.now()
    view = host_view(host, now=now)
    wants = task_view(task.job)
    rejected_by = _task_rejection(task=task, host=host, now=now) or pair_rejection(wants, view)
    if rejected_by is None:
        rejected_by = _runs_rejection(task=task, host=host, now=now)
    return {
        "eligible": rejected_by is None,
        "rejected_by": rejected_by,
        "score": asdict(match_score(wants, view)),
    }


def _task_rejection(*, task: Task, host: Host, now: datetime) -> str | None:
    if task.role == TaskRole.CANARY:
        return "a canary is made for one host when it is leased; it is never dispatched"
    if task.status != TaskStatus.QUEUED:
        return f"task is {task.status}, not queued"
    if task.job.status not in JOB_ACTIVE:
        return f"job is {task.job.status}"
    if not task.job.model.is_active:
        return f"model {task.job.model.name} is not active"
    if task.job.status == JobStatus.QUEUED and task.job.deadline is not None and task.job.deadline <= now:
        return "job's deadline passed"
    return None


def _runs_rejection(*, task: Task, host: Host, now: datetime) -> str | None:
    ran_here = Task.objects.filter(group=task.group).filter(Q(leased_to=host) | Q(completed_by=host))
    if task.group is not None and ran_here.exists():
        return "host already ran these inputs (the runs of one input go to different hosts)"
    if task.needs_trusted and not host_trusted(host=host, now=now):
        return "a tie-break runs only on a trusted host"
    return None


_QUEUED_SEEN: tuple[float, bool] = (float("-inf"), True)


def tasks_queued_recently(*, max_age_s: float = 1.0) -> bool:
    """Whether any task was queued as of at most `max_age_s` ago: one query a second per process,
    however many heartbeats ask. Call from sync code; `tasks_queued_cached` answers without I/O."""
    global _QUEUED_SEEN
    checked_at, queued = _QUEUED_SEEN
    if time.monotonic() - checked_at <= max_age_s:
        return queued
    queued = Task.objects.filter(status=TaskStatus.QUEUED).exists()
    _QUEUED_SEEN = (time.monotonic(), queued)
    return queued


def tasks_queued_cached(*, max_age_s: float = 1.0) -> bool | None:
    """The answer of `tasks_queued_recently` if it is fresh, else None (ask it)."""
    checked_at, queued = _QUEUED_SEEN
    return queued if time.monotonic() - checked_at <= max_age_s else None
