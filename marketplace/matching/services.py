"""Claiming queued tasks for a host: atomic, lease-based, fair across buyers.

On PostgreSQL the candidates are locked with `FOR UPDATE SKIP LOCKED`, so many
claimers never wait on each other; on SQLite the write lock serialises them.
Either way each task moves with `UPDATE … WHERE status = 'queued'` and a
claimer only keeps the rows it actually moved.

A round's free slots are shared out among buyers first (`fair_shares`: the
buyer with the fewest tasks in flight goes next); within a buyer, higher
priority, then older jobs, go first.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Exists, Min, OuterRef, Q, QuerySet
from django.utils import timezone

from hearth_agent.policy import is_green
from marketplace.catalog.models import CatalogModel
from marketplace.hosts.models import Host
from marketplace.jobs.models import Task, TaskRole
from marketplace.jobs.services import job_mark_started
from marketplace.jobs.states import JOB_ACTIVE, JobStatus, TaskStatus
from marketplace.matching.scoring import BuyerQueue, HostView, fair_shares, free_slots, pair_rejection
from marketplace.matching.selectors import host_view, task_view
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
        view = host_view(host, now=now)
        wanted = free_slots(view)
        if wanted == 0:
            return []
        if host.verified_at is None:
            # Known-answer tasks only, one at a time, until the host has shown it computes honestly.
            canary = _canary_for_unverified(host, now=now)
            return [_assignment(canary)] if canary is not None else []
        price = view.policy.price_per_1k_items_minor
        rows = _fair_pick(_candidates(host, view, now=now), slots=wanted)
        expires = now + timedelta(seconds=settings.HEARTH_LEASE_SECONDS)
        assignments: list[Assignment] = []
        groups: set[uuid.UUID | None] = set()
        rate = canary_rate(
            host.pass_streak, high=settings.HEARTH_CANARY_RATE_MAX, low=settings.HEARTH_CANARY_RATE_MIN
        )
        for task in rows:
            if pair_rejection(task_view(task.job), view) is not None or task.group in groups:
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


def _candidates(host: Host, view: HostView, *, now: datetime) -> QuerySet[Task]:
    """The queued tasks this host may run, unordered and unlocked: the database's half of the filter
    (`pair_rejection` checks each picked row again)."""
    candidates = Task.objects.filter(
        status=TaskStatus.QUEUED,
        job__status__in=JOB_ACTIVE,
        job__max_price_per_1k_minor__gte=view.policy.price_per_1k_items_minor,
        job__model__is_active=True,
        job__model__min_memory_mb__lte=host.memory_mb,
    ).exclude(role=TaskRole.CANARY)
    candidates = candidates.filter(Q(job__region="") | Q(job__region=host.region))
    # A queued job past its deadline is the sweep's to fail, not a host's to start.
    candidates = candidates.filter(
        Q(job__deadline__isnull=True) | Q(job__deadline__gt=now) | Q(job__status=JobStatus.RUNNING)
    )
    # Never two runs of the same inputs on one host; tie-breaks only on trusted hosts, first.
    ran_here = Task.objects.filter(group=OuterRef("group")).filter(Q(leased_to=host) | Q(completed_by=host))
    candidates = candidates.exclude(Exists(ran_here))
    if not host_trusted(host=host, now=now):
        candidates = candidates.exclude(needs_trusted=True)
    if not is_green(view.power):
        candidates = candidates.exclude(job__green_only=True)
    return candidates


def _fair_pick(candidates: QuerySet[Task], *, slots: int) -> list[Task]:
    """Up to `slots` candidates, locked, shared out among their buyers by `fair_shares`."""
    waiting = {
        row["job__buyer_id"]: row
        for row in candidates.order_by()
        .values("job__buyer_id")
        .annotate(queued=Count("id"), oldest=Min("job__created_at"))
    }
    if not waiting:
        return []
    in_flight = dict(
        Task.objects.filter(status=TaskStatus.LEASED, job__buyer_id__in=waiting)
        .exclude(role=TaskRole.CANARY)
        .order_by()
        .values("job__buyer_id")
        .annotate(n=Count("id"))
        .values_list("job__buyer_id", "n")
    )
    shares = fair_shares(
        {
            buyer_id: BuyerQueue(
                leased=in_flight.get(buyer_id, 0), queued=row["queued"], oldest=row["oldest"]
            )
            for buyer_id, row in waiting.items()
        },
        slots,
    )
    ordered = candidates.order_by("-needs_trusted", "-job__priority", "job__created_at", "index")
    if connection.features.has_select_for_update_skip_locked:
        ordered = ordered.select_for_update(skip_locked=True, of=("self",))
    rows: list[Task] = []
    for buyer_id, share in shares.items():
        rows.extend(ordered.filter(job__buyer_id=buyer_id).select_related("job__model")[:share])
    return rows


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
