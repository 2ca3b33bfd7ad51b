"""Writes for jobs and tasks: submit, cancel, results, failures, requeues.

Every change of a task's state is a conditional UPDATE on the state (and the
lease) it expects, so two processes can never both move the same task.
Services that finish or fail a job lock the job row first; that serialises
the "was this the last task?" question per job.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Case, DateTimeField, F, Q, Value, When
from django.db.models.functions import Least
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from hearth_agent import protocol
from marketplace.accounts.models import User
from marketplace.billing.services import escrow_hold
from marketplace.catalog.models import CatalogModel
from marketplace.catalog.selectors import catalog_model_get_by_name
from marketplace.gateway import notify
from marketplace.hosts.models import Host
from marketplace.jobs.metering import escrow_worst_case, job_escrow_release
from marketplace.jobs.models import Job, Task, TaskRole, Verification
from marketplace.jobs.states import JOB_TRANSITIONS, JobStatus, TaskStatus, sources_of
from marketplace.matching.regions import check_region
from marketplace.trust.models import Strike
from marketplace.trust.verification import canary_judge, group_settle, replicas_build, replicas_plan

logger = logging.getLogger(__name__)


# ---- submit ---------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    model: CatalogModel
    inputs: list[str]
    task_size: int
    green_only: bool = False
    verification: str = Verification.NONE
    spot_fraction: float = 0.0
    replicas: int = 1
    max_price_per_1k_minor: int = 0
    priority: int = 5
    deadline: datetime | None = None
    region: str = ""


class JobTooLarge(ValueError):
    """The job exceeds a size limit; the API answers 413."""


MAX_REPLICAS = 5


def check_verification(
    *, verification: object, spot_fraction: object, replicas: object
) -> tuple[str, float, int]:
    """The job's verification level and its parameter; ValidationError naming the field."""
    level = Verification.NONE if verification is None else verification
    if level not in Verification.values:
        raise ValidationError(
            {"verification": [f"verification must be one of {', '.join(Verification.values)}, not {level!r}"]}
        )
    if level == Verification.SPOT:
        fraction = settings.HEARTH_DEFAULT_SPOT_FRACTION if spot_fraction is None else spot_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise ValidationError({"spot_fraction": ["spot_fraction must be a number above 0 and at most 1"]})
        return str(level), float(fraction), 1
    if spot_fraction is not None:
        raise ValidationError({"spot_fraction": ["spot_fraction applies to verification 'spot' only"]})
    if level == Verification.REDUNDANT:
        count = 2 if replicas is None else replicas
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= MAX_REPLICAS:
            raise ValidationError({"replicas": [f"replicas must be an integer from 2 to {MAX_REPLICAS}"]})
        return str(level), 0.0, count
    if replicas is not None:
        raise ValidationError({"replicas": ["replicas applies to verification 'redundant' only"]})
    return str(level), 0.0, 1


def check_job_spec(
    *,
    model_name: str,
    inputs: object,
    task_size: int | None,
    green_only: object = False,
    verification: object = None,
    spot_fraction: object = None,
    replicas: object = None,
    max_price_per_1k_minor: object = None,
    priority: object = None,
    deadline: object = None,
    region: object = None,
) -> JobSpec:
    """Validate a job request; raise ValidationError naming the field, or JobTooLarge."""
    model = catalog_model_get_by_name(name=model_name) if isinstance(model_name, str) else None
    if model is None:
        raise ValidationError({"model": [f"unknown model {model_name!r}; see GET /api/v1/models"]})
    if not isinstance(inputs, list) or not inputs:
        raise ValidationError({"inputs": ["inputs must be a non-empty list of strings"]})
    if len(inputs) > settings.HEARTH_MAX_JOB_ITEMS:
        raise JobTooLarge(f"inputs has {len(inputs)} items; the limit is {settings.HEARTH_MAX_JOB_ITEMS}")
    for position, item in enumerate(inputs):
        if not isinstance(item, str):
            raise ValidationError({"inputs": [f"item {position} is {type(item).__name__}, not a string"]})
        if not item.strip():
            raise ValidationError({"inputs": [f"item {position} is empty"]})
        if len(item) > settings.HEARTH_MAX_ITEM_CHARS:
            raise JobTooLarge(
                f"inputs item {position} has {len(item)} characters; the limit is {settings.HEARTH_MAX_ITEM_CHARS}"
            )
    size = settings.HEARTH_DEFAULT_TASK_SIZE if task_size is None else task_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= settings.HEARTH_MAX_TASK_SIZE:
        raise ValidationError(
            {"task_size": [f"task_size must be an integer from 1 to {settings.HEARTH_MAX_TASK_SIZE}"]}
        )
    if not isinstance(green_only, bool):
        raise ValidationError({"green_only": ["green_only must be true or false"]})
    level, fraction, runs = check_verification(
        verification=verification, spot_fraction=spot_fraction, replicas=replicas
    )
    price = check_max_price(max_price_per_1k_minor)
    return JobSpec(
        priority=check_priority(priority),
        deadline=check_deadline(deadline, now=timezone.now()),
        region=check_region(region),
        model=model,
        inputs=inputs,
        task_size=size,
        green_only=green_only,
        verification=level,
        spot_fraction=fraction,
        replicas=runs,
        max_price_per_1k_minor=price,
    )


def check_max_price(raw: object) -> int:
    """The job's max price per 1,000 items per run (minor units); ValidationError naming the field."""
    if raw is None:
        return int(settings.HEARTH_DEFAULT_MAX_PRICE_PER_1K_MINOR)
    limit = settings.HEARTH_MAX_PRICE_PER_1K_LIMIT_MINOR
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= limit:
        raise ValidationError(
            {
                "max_price_per_1k_minor": [
                    f"max_price_per_1k_minor must be an integer of minor units from 0 to {limit}"
                ]
            }
        )
    return raw


PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 9, 5


def check_priority(raw: object) -> int:
    """0-9, higher first among the buyer's own jobs; ValidationError naming the field."""
    if raw is None:
        return PRIORITY_DEFAULT
    if isinstance(raw, bool) or not isinstance(raw, int) or not PRIORITY_MIN <= raw <= PRIORITY_MAX:
        raise ValidationError(
            {"priority": [f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}"]}
        )
    return raw


def check_deadline(raw: object, *, now: datetime) -> datetime | None:
    """An ISO 8601 date and time in the future (UTC when it names no offset), or None."""
    if raw is None or raw == "":
        return None
    parsed = parse_datetime(raw) if isinstance(raw, str) else None
    if parsed is None:
        raise ValidationError(
            {"deadline": ["deadline must be an ISO 8601 date and time, e.g. 2030-01-31T18:00:00Z"]}
        )
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, UTC)
    if parsed <= now:
        raise ValidationError({"deadline": [f"deadline {raw} is not in the future"]})
    return parsed


@transaction.atomic
def job_submit(*, buyer: User, spec: JobSpec) -> Job:
    """Create the job and its tasks and hold its worst case in escrow, in one transaction; then wake
    the agents. Raises InsufficientCredit (nothing stored) when the buyer's credit does not cover it."""
    job = Job(
        buyer=buyer,
        model=spec.model,
        task_size=spec.task_size,
        items_total=len(spec.inputs),
        green_only=spec.green_only,
        verification=spec.verification,
        spot_fraction=spec.spot_fraction,
        replicas=spec.replicas,
        max_price_per_1k_minor=spec.max_price_per_1k_minor,
        priority=spec.priority,
        deadline=spec.deadline,
        region=spec.region,
    )
    primaries = [
        Task(
            job=job,
            index=task_index,
            first_item=start,
            inputs=spec.inputs[start : start + spec.task_size],
            item_count=len(spec.inputs[start : start + spec.task_size]),
            billable=True,
        )
        for task_index, start in enumerate(range(0, len(spec.inputs), spec.task_size))
    ]
    for primary in primaries:
        primary.group = primary.pk
    plan = replicas_plan(
        verification=spec.verification,
        spot_fraction=spec.spot_fraction,
        replicas=spec.replicas,
        tasks=len(primaries),
    )
    replicas = [
        r
        for primary, n in zip(primaries, plan, strict=True)
        for r in replicas_build(primary=primary, count=n)
    ]
    for replica in replicas:
        replica.billable = True  # the buyer asked for these checks
    planned = [*primaries, *replicas]
    job.escrow_minor = escrow_worst_case(
        item_counts=(run.item_count for run in planned), max_price_per_1k_minor=spec.max_price_per_1k_minor
    )
    job.save(force_insert=True)
    Task.objects.bulk_create(planned)
    if job.escrow_minor:
        escrow_hold(job_id=job.pk, buyer=buyer, amount_minor=job.escrow_minor)
    notify.on_commit_dispatch()
    return job


# ---- cancel and fail --------------------------------------------------------


def _job_finish(*, job_id: uuid.UUID, status: str, reason: str, now: datetime) -> bool:
    """Move an active job to a final state and stop its remaining tasks. Needs the job row locked."""
    moved = Job.objects.filter(pk=job_id, status__in=sources_of(JOB_TRANSITIONS, status)).update(
        status=status, failure_reason=reason, finished_at=now
    )
    if not moved:
        return False
    job_escrow_release(job_id=job_id)
    task_status = TaskStatus.CANCELLED if status == JobStatus.CANCELLED else TaskStatus.FAILED
    leased = list(
        Task.objects.filter(job_id=job_id, status=TaskStatus.LEASED)
        .select_related("leased_to")
        .values_list("id", "lease_id", "leased_to__channel_name")
    )
    Task.objects.filter(job_id=job_id, status__in=[TaskStatus.QUEUED, TaskStatus.LEASED]).update(
        status=task_status, lease_expires_at=None, last_error=reason
    )
    for task_id, lease_id, channel_name in leased:
        if channel_name:
            notify.on_commit_send(
                channel_name,
                {"type": "task.cancel", "task_id": str(task_id), "lease_id": str(lease_id), "reason": reason},
            )
    return True


def job_fail(*, job_id: uuid.UUID, reason: str, now: datetime) -> bool:
    """Fail an active job with the reason. Needs the job row locked."""
    return _job_finish(job_id=job_id, status=JobStatus.FAILED, reason=reason, now=now)


@transaction.atomic
def job_cancel(*, job: Job) -> Job:
    """Cancel an active job; a finished job is left as it is (idempotent)."""
    Job.objects.select_for_update().filter(pk=job.pk).first()
    _job_finish(
        job_id=job.pk, status=JobStatus.CANCELLED, reason="cancelled by the buyer", now=timezone.now()
    )
    job.refresh_from_db()
    return job


def jobs_fail_past_deadline(*, now: datetime | None = None) -> int:
    """Fail every job still queued at its deadline ("deadline passed"), releasing its escrow as any
    failed job does. Idempotent: a job already failed, cancelled or started is left alone."""
    now = now or timezone.now()
    due = Job.objects.filter(status=JobStatus.QUEUED, deadline__lte=now).values_list("pk", flat=True)
    failed = 0
    for job_id in list(due):
        with transaction.atomic():
            locked = Job.objects.select_for_update().filter(pk=job_id, status=JobStatus.QUEUED).first()
            if locked is not None and job_fail(job_id=job_id, reason="deadline passed", now=now):
                failed += 1
    return failed


# ---- leases: release, requeue, renew ------------------------------------------


def _task_release(*, task: Task, reason: str, now: datetime) -> str:
    """Give a leased task back: requeue it, or fail the job once attempts run out.

    Needs the task's job row locked. Returns the task's new status, or "" when
    the lease had already moved on (someone else released or finished it).
    A canary is never requeued: it was that host's test, and it ends there.
    """
    if task.role == TaskRole.CANARY:
        ended = Task.objects.filter(pk=task.pk, status=TaskStatus.LEASED, lease_id=task.lease_id).update(
            status=TaskStatus.FAILED, lease_expires_at=None, last_error=reason
        )
        return TaskStatus.FAILED if ended else ""
    if task.attempt >= settings.HEARTH_MAX_ATTEMPTS:
        failed = _job_finish(
            job_id=task.job_id,
            status=JobStatus.FAILED,
            reason=f"task {task.index} failed after {task.attempt} attempts; last error: {reason}",
            now=now,
        )
        return TaskStatus.FAILED if failed else ""
    return TaskStatus.QUEUED if _task_requeue(task=task, reason=reason) else ""


def _task_requeue(*, task: Task, reason: str, refund_attempt: bool = False) -> bool:
    """Leased → queued, only if the lease is still the one `task` holds. False when it moved on.

    `refund_attempt` gives back the attempt the lease counted (a task handed back unrun).
    """
    changes: dict[str, Any] = {"attempt": F("attempt") - 1} if refund_attempt else {}
    return bool(
        Task.objects.filter(pk=task.pk, status=TaskStatus.LEASED, lease_id=task.lease_id).update(
            status=TaskStatus.QUEUED,
            lease_id=None,
            leased_to=None,
            lease_expires_at=None,
            last_error=reason,
            **changes,
        )
    )


def _release_all(tasks: list[Task], *, reason: str | dict[uuid.UUID, str], now: datetime) -> int:
    """Release each task, locking the jobs in the order given; `reason` may differ by leaseholder."""
    released = 0
    for task in tasks:
        if isinstance(reason, str):
            why = reason
        else:
            assert task.leased_to_id is not None  # a lease
            why = reason[task.leased_to_id]
        with transaction.atomic():
            Job.objects.select_for_update().filter(pk=task.job_id).first()
            if _task_release(task=task, reason=why, now=now):
                released += 1
    if released:
        notify.on_commit_dispatch()
    return released


def tasks_requeue_for_host(*, host_id: uuid.UUID, reason: str) -> int:
    """Requeue every lease a host holds (it went away or lost its token)."""
    return tasks_requeue_for_hosts(reasons={host_id: reason})


def tasks_requeue_for_hosts(*, reasons: dict[uuid.UUID, str]) -> int:
    """`tasks_requeue_for_host` of many hosts, each with its reason, from one read of their leases."""
    # Ordered by the job's id, not the model's ("job": a join to order by the job's creation): any
    # fixed order keeps the job locks below taken in one order.
    tasks = list(
        Task.objects.filter(status=TaskStatus.LEASED, leased_to_id__in=reasons).order_by("job_id", "index")
    )
    return _release_all(tasks, reason=reasons, now=timezone.now())


def leases_requeue_expired(*, now: datetime | None = None) -> int:
    """Requeue tasks whose lease deadline passed without a result. Each expiry counts against the
    host; one that held the task while still connected (it heartbeats, it never answers) gets a strike."""
    from marketplace.trust.services import score_update, strike

    now = now or timezone.now()
    tasks = list(
        Task.objects.filter(status=TaskStatus.LEASED, lease_expires_at__lt=now).select_related("leased_to")
    )
    released = _release_all(tasks, reason="lease expired", now=now)
    for task in tasks:
        host = task.leased_to
        if host is None:
            continue
        Host.objects.filter(pk=host.pk).update(leases_expired=F("leases_expired") + 1)
        held = (now - task.assigned_at).total_seconds() if task.assigned_at else 0.0
        if host.status == Host.Status.ONLINE and host.quarantined_at is None:
            strike(
                host_id=host.pk,
                kind=Strike.Kind.NO_ANSWER,
                task=task,
                evidence=f"held task {task.pk} for {held:.0f} s while connected and never answered",
            )
        else:
            score_update(host_id=host.pk, reason=f"lease of task {task.pk} expired while offline", now=now)
    return released


def leases_renew(*, host_id: uuid.UUID, lease_ids: list[str], now: datetime) -> int:
    """Extend leases the agent reports holding; only its own, only while leased."""
    valid: list[uuid.UUID] = []
    for lease_id in lease_ids:
        try:
            valid.append(uuid.UUID(lease_id))
        except ValueError:
            continue
    # Renewed only up to the runtime cap after assignment: holding a task forever is not running it.
    return Task.objects.filter(leased_to_id=host_id, status=TaskStatus.LEASED, lease_id__in=valid).update(
        lease_expires_at=Least(
            Value(now + timedelta(seconds=settings.HEARTH_LEASE_SECONDS)),
            F("assigned_at") + timedelta(seconds=settings.HEARTH_TASK_MAX_RUNTIME_S),
        )
    )


def leases_renew_many(*, held: dict[tuple[uuid.UUID, datetime], list[str]]) -> int:
    """`leases_renew` for many heartbeats in one UPDATE: {(host id, beat time): lease ids}.

    Each lease is extended from the time of the beat that listed it, as if renewed then.
    """
    match = Q()
    until: list[When] = []
    for (host_id, at), lease_ids in held.items():
        valid = [lease for lease in (_uuid_or_none(raw) for raw in lease_ids) if lease is not None]
        if not valid:
            continue
        this = Q(leased_to_id=host_id, lease_id__in=valid)
        match |= this
        until.append(When(this, then=Value(at + timedelta(seconds=settings.HEARTH_LEASE_SECONDS))))
    if not until:
        return 0
    leases = Task.objects.filter(match, status=TaskStatus.LEASED)
    with transaction.atomic():
        if connection.features.has_select_for_update_skip_locked:
            # Rows another transaction holds (a result or a requeue is changing the task, so the
            # lease needs no renewal) are passed over, not waited for while others are held.
            leases = Task.objects.filter(pk__in=leases.select_for_update(skip_locked=True).values("pk"))
        return leases.update(
            lease_expires_at=Least(
                Case(*until, output_field=DateTimeField()),
                F("assigned_at") + timedelta(seconds=settings.HEARTH_TASK_MAX_RUNTIME_S),
            )
        )


def _uuid_or_none(raw: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


# ---- results ----------------------------------------------------------------


@dataclass(frozen=True)
class ResultOutcome:
    accepted: bool
    reason: str = ""
    job_finished: bool = False


def _leased_task(*, host_id: uuid.UUID, task_id: str, lease_id: str) -> Task | None:
    try:
        return Task.objects.select_related("job__model").get(
            pk=uuid.UUID(task_id),
            lease_id=uuid.UUID(lease_id),
            leased_to_id=host_id,
            status=TaskStatus.LEASED,
        )
    except (ValueError, Task.DoesNotExist):
        return None


@transaction.atomic
def task_result_accept(*, host_id: uuid.UUID, payload: protocol.TaskResultPayload) -> ResultOutcome:
    """Store a result from the current leaseholder; anyone else is refused."""
    task = _leased_task(host_id=host_id, task_id=payload.task_id, lease_id=payload.lease_id)
    if task is None:
        return ResultOutcome(False, "not the current leaseholder of this task")
    try:
        vectors = protocol.decode_embeddings(payload)
    except protocol.ProtocolError as exc:
        return ResultOutcome(False, str(exc))
    if payload.count != task.item_count:
        return ResultOutcome(False, f"result has {payload.count} vectors for {task.item_count} inputs")
    if payload.dimension != task.job.model.dimension:
        return ResultOutcome(False, f"dimension {payload.dimension}, model has {task.job.model.dimension}")

    Job.objects.select_for_update().filter(pk=task.job_id).first()
    now = timezone.now()
    result = {
        "status": TaskStatus.SUCCEEDED,
        "output": vectors,
        "output_sha256": payload.output_sha256,
        "dimension": payload.dimension,
        "compute_ms": payload.compute_ms,
        "energy_wh": payload.energy_wh,
        "energy_source": payload.energy_source or "",
        "completed_by_id": host_id,
        "completed_at": now,
        "lease_expires_at": None,
    }
    stored = Task.objects.filter(pk=task.pk, status=TaskStatus.LEASED, lease_id=task.lease_id).update(
        **result
    )
    if not stored:
        return ResultOutcome(False, "lease moved on before the result arrived")
    Host.objects.filter(pk=host_id).update(tasks_completed=F("tasks_completed") + 1)
    # The row as just written (this transaction holds it): no read back of the vectors.
    for field, value in result.items():
        setattr(task, field, value)
    if task.role == TaskRole.CANARY:
        canary_judge(task=task)
        return ResultOutcome(True)
    assert task.group is not None
    finished = group_settle(group=task.group, now=now)
    return ResultOutcome(True, job_finished=finished)


@transaction.atomic
def task_fail(*, host_id: uuid.UUID, payload: protocol.TaskFailedPayload) -> ResultOutcome:
    """The leaseholder reports a failure: requeue (bounded) or fail the job."""
    task = _leased_task(host_id=host_id, task_id=payload.task_id, lease_id=payload.lease_id)
    if task is None:
        return ResultOutcome(False, "not the current leaseholder of this task")
    Job.objects.select_for_update().filter(pk=task.job_id).first()
    reason = f"agent reported: {payload.reason}"
    Host.objects.filter(pk=host_id).update(tasks_failed=F("tasks_failed") + 1)
    status = _task_release(task=task, reason=reason, now=timezone.now())
    if status == TaskStatus.QUEUED:
        notify.on_commit_dispatch()
    return ResultOutcome(bool(status), "" if status else "lease moved on")


@transaction.atomic
def task_release(*, host_id: uuid.UUID, payload: protocol.TaskReleasePayload) -> ResultOutcome:
    """The leaseholder hands a task back unrun (draining, policy): requeue it, no attempt spent."""
    task = _leased_task(host_id=host_id, task_id=payload.task_id, lease_id=payload.lease_id)
    if task is None:
        return ResultOutcome(False, "not the current leaseholder of this task")
    reason = f"released by the agent: {payload.reason}"[:2000]
    moved = _task_requeue(task=task, reason=reason, refund_attempt=True)
    if moved:
        notify.on_commit_dispatch()
    return ResultOutcome(moved, "" if moved else "lease moved on")


def job_mark_started(*, job_ids: set[uuid.UUID], now: datetime) -> None:
    """queued → running once a first task is leased (outside the claim's transaction)."""
    if job_ids:
        Job.objects.filter(pk__in=job_ids, status=JobStatus.QUEUED).update(
            status=JobStatus.RUNNING, started_at=now
        )
