"""Reads for dispatch: hosts and jobs as the matcher's plain views, and the answers built on them
(why a host does or does not get a task, why a job is still queued)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from hearth_agent.policy import PowerState, Verdict
from marketplace.hosts.models import Host
from marketplace.hosts.services import host_policy
from marketplace.jobs.models import Job, Task
from marketplace.jobs.states import JobStatus, TaskStatus
from marketplace.matching.scoring import HostView, TaskView, match_score, pair_rejection, queued_reason


def host_view(host: Host, *, now: datetime, leased: int | None = None) -> HostView:
    """The host as the matcher sees it; `leased` (its tasks in flight) is counted when not given."""
    if leased is None:
        leased = Task.objects.filter(leased_to=host, status=TaskStatus.LEASED).count()
    stale_after = timedelta(seconds=3 * settings.HEARTH_POWER_INTERVAL_S)
    fresh = host.power_at is not None and host.power_at >= now - stale_after
    power = (
        PowerState(
            gpu_w=host.gpu_w,
            battery_soc_pct=host.battery_soc_pct,
            solar_w=host.solar_w,
            grid_w=host.grid_w,
            load_w=host.load_w,
        )
        if fresh
        else None
    )
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


def job_queued_reason(*, job: Job, now: datetime | None = None) -> str | None:
    """Why no online host can take the queued job's tasks; None when it is not queued or one can."""
    if job.status != JobStatus.QUEUED:
        return None
    return queued_reason(task_view(job), host_views_online(now=now or timezone.now()))


def dispatch_explain(*, task: Task, host: Host, now: datetime | None = None) -> dict[str, Any]:
    """Whether `host` may run `task`, the filter that says no, and the score's parts."""
    view = host_view(host, now=now or timezone.now())
    wants = task_view(task.job)
    rejected_by = pair_rejection(wants, view)
    return {
        "eligible": rejected_by is None,
        "rejected_by": rejected_by,
        "score": asdict(match_score(wants, view)),
    }
