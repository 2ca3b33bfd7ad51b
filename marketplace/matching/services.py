"""Claiming queued tasks for a host: atomic, lease-based.

On PostgreSQL the candidates are locked with `FOR UPDATE SKIP LOCKED`, so many
claimers never wait on each other; on SQLite the write lock serialises them.
Either way each task moves with `UPDATE … WHERE status = 'queued'` and a
claimer only keeps the rows it actually moved.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from hearth_agent.policy import PowerState, Verdict, is_green
from marketplace.catalog.models import CatalogModel
from marketplace.hosts.models import Host
from marketplace.hosts.services import host_policy
from marketplace.jobs.models import Task, TaskRole
from marketplace.jobs.services import job_mark_started
from marketplace.jobs.states import JOB_ACTIVE, TaskStatus
from marketplace.matching.scoring import HostView, ModelNeeds, free_slots, host_can_run
from marketplace.trust.scoring import canary_rate
from marketplace.trust.services import canary_lease, host_trusted

_random = secrets.SystemRandom()


@dataclass(frozen=True)
class Assignment:
    task_id: uuid.UUID
    lease_id: uuid.UUID
    model_sha256: str
    model_name: str
    inputs: list[str]
    lease_expires_at: datetime


def _host_view(host: Host, *, now: datetime) -> HostView:
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
    )


def tasks_claim_for_host(
    *, host_id: uuid.UUID, channel_name: str, now: datetime | None = None
) -> list[Assignment]:
    """Lease up to the host's free slots of queued tasks, oldest job first.

    Only the connection named by `channel_name` may claim: a stale consumer
    of a replaced connection gets nothing. Send the returned assignments
    after this returns (the transaction has committed by then).
    """
    now = now or timezone.now()
    with transaction.atomic():
        host = Host.objects.filter(
            pk=host_id, channel_name=channel_name, status=Host.Status.ONLINE, revoked_at__isnull=True
        ).first()
        if host is None:
            return []
        view = _host_view(host, now=now)
        wanted = free_slots(view)
        if wanted == 0:
            return []
        if host.verified_at is None:
            # Known-answer tasks only, one at a time, until the host has shown it computes honestly.
            canary = _canary_for_unverified(host, now=now)
            return [_assignment(canary)] if canary is not None else []
        price = view.policy.price_per_1k_items_minor
        candidates = Task.objects.filter(
            status=TaskStatus.QUEUED,
            job__status__in=JOB_ACTIVE,
            job__max_price_per_1k_minor__gte=price,
            job__model__is_active=True,
            job__model__min_memory_mb__lte=host.memory_mb,
        ).exclude(role=TaskRole.CANARY)
        # Never two runs of the same inputs on one host; tie-breaks only on trusted hosts, first.
        ran_here = Task.objects.filter(group=OuterRef("group")).filter(
            Q(leased_to=host) | Q(completed_by=host)
        )
        candidates = candidates.exclude(Exists(ran_here))
        if not host_trusted(host=host, now=now):
            candidates = candidates.exclude(needs_trusted=True)
        candidates = candidates.order_by("-needs_trusted", "job__created_at", "index")
        if not is_green(view.power):
            candidates = candidates.exclude(job__green_only=True)
        if connection.features.has_select_for_update_skip_locked:
            candidates = candidates.select_for_update(skip_locked=True, of=("self",))
        rows = list(candidates.select_related("job__model")[:wanted])
        expires = now + timedelta(seconds=settings.HEARTH_LEASE_SECONDS)
        assignments: list[Assignment] = []
        groups: set[uuid.UUID | None] = set()
        rate = canary_rate(
            host.pass_streak, high=settings.HEARTH_CANARY_RATE_MAX, low=settings.HEARTH_CANARY_RATE_MIN
        )
        for task in rows:
            needs = ModelNeeds(min_memory_mb=task.job.model.min_memory_mb)
            if host_can_run(view, needs, green_only=task.job.green_only) is not None or task.group in groups:
                continue
            if not task.needs_trusted and _random.random() < rate:
                # A canary in this task's place, shaped like it; the task stays queued for the next round.
                canary = canary_lease(host=host, model=task.job.model, size=task.item_count, now=now)
                if canary is not None:
                    assignments.append(_assignment(canary))
                    continue
            groups.add(task.group)
            lease_id = uuid.uuid4()
            moved = Task.objects.filter(pk=task.pk, status=TaskStatus.QUEUED).update(
                status=TaskStatus.LEASED,
                lease_id=lease_id,
                leased_to=host,
                lease_expires_at=expires,
                assigned_at=now,
                attempt=task.attempt + 1,
                price_per_1k_minor=price,
            )
            if moved:
                task.lease_id, task.lease_expires_at = lease_id, expires
                assignments.append(_assignment(task))
        started = {task.job_id for task in rows}
    job_mark_started(job_ids=started, now=now)
    return assignments


def _assignment(task: Task) -> Assignment:
    assert task.lease_id is not None and task.lease_expires_at is not None
    return Assignment(
        task_id=task.pk,
        lease_id=task.lease_id,
        model_sha256=task.job.model.weights_sha256,
        model_name=task.job.model.name,
        inputs=list(task.inputs),
        lease_expires_at=task.lease_expires_at,
    )


def _canary_for_unverified(host: Host, *, now: datetime) -> Task | None:
    """The next known-answer task for a host still proving itself, shaped like the queued work."""
    if Task.objects.filter(leased_to=host, status=TaskStatus.LEASED, role=TaskRole.CANARY).exists():
        return None
    models = CatalogModel.objects.filter(
        is_active=True, min_memory_mb__lte=host.memory_mb, canary_items__isnull=False
    )
    model = models.distinct().order_by("created_at").first()
    if model is None:
        return None
    queued = Task.objects.filter(status=TaskStatus.QUEUED, role=TaskRole.PRIMARY, job__model=model)
    size = queued.values_list("item_count", flat=True).first() or settings.HEARTH_DEFAULT_TASK_SIZE
    return canary_lease(host=host, model=model, size=size, now=now)
