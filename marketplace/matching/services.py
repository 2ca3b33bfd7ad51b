"""Claiming queued tasks for a host: atomic, lease-based, fair across buyers.

On PostgreSQL the candidates are locked with `FOR UPDATE SKIP LOCKED`, so many
claimers never wait on each other; on SQLite the write lock serialises them.
Either way each task moves with `UPDATE … WHERE status = 'queued'` and a
claimer only keeps the rows it actually moved.

A round's free slots are shared out among buyers first (`fair_shares`: the
buyer with the fewest tasks in flight goes next); within a buyer, higher
priority, then older jobs, go first.

Two ways in: `tasks_claim_for_host` (one host, from its own socket: after
`ready`, after each result, when its energy state changes) and
`tasks_claim_batch` (the online verified hosts with free slots in one round,
the hosts chosen per task by `match_score`), which `dispatch_round` runs after
any commit that queues work (a submit, a requeue, a host verified). Both lock
the host rows they fill (the round skips the locked ones), so the two never
give one host more tasks than it has slots.
"""

from __future__ import annotations

import functools
import math
import secrets
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Exists, F, Min, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from hearth_agent.policy import is_green
from marketplace.catalog.models import CatalogModel
from marketplace.config.bounded import BoundedCache
from marketplace.config.sql import SqlTemplate, sql_column, sql_table, sql_template, sql_value, sql_values_row
from marketplace.gateway import notify
from marketplace.hosts.models import Host
from marketplace.hosts.power import METERS
from marketplace.jobs.models import Job, Task, TaskRole, Verification
from marketplace.jobs.services import job_mark_started
from marketplace.jobs.states import JOB_ACTIVE, JobStatus, TaskStatus
from marketplace.matching.scoring import (
    BuyerQueue,
    HostView,
    TaskView,
    fair_shares,
    fit_rejection,
    fitting,
    free_slots,
    host_takes_work,
    match_score,
    pair_rejection,
)
from marketplace.matching.selectors import host_view, power_fresh_since, task_view
from marketplace.trust.models import CanaryItem
from marketplace.trust.scoring import canary_rate
from marketplace.trust.services import canary_lease, host_trusted

if TYPE_CHECKING:
    from django.db.models.query import RawQuerySet
    from django_stubs_ext import WithAnnotations  # dev only: types of annotated rows

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
        # The row locked: a batch round (which skips locked hosts) and this claim never both count
        # the host's free slots and fill them twice over.
        found = Host.objects.select_for_update().filter(
            pk=host_id, channel_name=channel_name, status=Host.Status.ONLINE, revoked_at__isnull=True
        )[:1]  # not `.first()`, whose ORDER BY (never needed for one id) the ORM compiles per claim
        host = next(iter(found), None)
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
        # As read with the rows: a running job stays so, and only a queued one costs an UPDATE.
        started = {task.job_id for task in rows if task.job.status == JobStatus.QUEUED}
    job_mark_started(job_ids=started, now=now)
    return assignments


@functools.cache
def _queued_work() -> QuerySet[Task]:
    """Queued tasks of active jobs on active models, canaries aside: what every claim starts from.
    Built once per process and chained from (a queryset is immutable; each claim filters a copy), so a
    claim does not pay to build these joins again."""
    return Task.objects.filter(
        status=TaskStatus.QUEUED, job__status__in=JOB_ACTIVE, job__model__is_active=True
    ).exclude(role=TaskRole.CANARY)


def _candidates(host: Host, view: HostView, *, now: datetime) -> QuerySet[Task]:
    """The queued tasks this host may run, unordered and unlocked: the database's half of the filter
    (`pair_rejection` checks each picked row again)."""
    candidates = _queued_work().filter(
        job__max_price_per_1k_minor__gte=view.policy.price_per_1k_items_minor,
        job__model__min_memory_mb__lte=host.memory_mb,
    )
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


def _fair_pick(
    candidates: QuerySet[Task],
    *,
    slots: int,
    with_jobs: bool = True,
    waiting: dict[int, tuple[int, datetime]] | None = None,
) -> list[Task]:
    """Up to `slots` candidates, locked, shared out among their buyers by `fair_shares`; each with its
    job and model joined in, or (`with_jobs=False`) only the columns a claim reads, for the caller to
    attach jobs once per job rather than once per row. `waiting` (each buyer's candidates and its
    oldest job's submit time) is counted here unless the caller has it already."""
    if waiting is None:
        waiting = {
            row["job__buyer_id"]: (row["queued"], row["oldest"])
            for row in candidates.order_by()
            .values("job__buyer_id")
            .annotate(queued=Count("id"), oldest=Min("job__created_at"))
        }
    if not waiting:
        return []
    contested = len(waiting) > 1 and sum(queued for queued, _ in waiting.values()) > slots
    in_flight = _buyers_in_flight(waiting) if contested else {}
    shares = fair_shares(
        {
            buyer_id: BuyerQueue(leased=in_flight.get(buyer_id, 0), queued=queued, oldest=oldest)
            for buyer_id, (queued, oldest) in waiting.items()
        },
        slots,
    )
    ordered = candidates.order_by("-needs_trusted", "-job__priority", "job__created_at", "index")
    if connection.features.has_select_for_update_skip_locked:
        ordered = ordered.select_for_update(skip_locked=True, of=("self",))
    if with_jobs:
        ordered = ordered.select_related("job__model")
    else:
        ordered = ordered.only("id", "job_id", "group", "role", "needs_trusted", "item_count", "inputs")
    if all(share == waiting[buyer_id][0] for buyer_id, share in shares.items()):
        # Every buyer gets all it has waiting: one statement locks what the per-buyer ones would
        # (each buyer's unlocked candidates, a task queued since the count aside), and the rows go
        # back into the buyers' turn order.
        per_buyer: dict[int, list[Task]] = {buyer_id: [] for buyer_id in shares}
        for task in ordered.filter(job__buyer_id__in=shares).annotate(turn_of=F("job__buyer_id")):
            if len(per_buyer[task.turn_of]) < shares[task.turn_of]:
                per_buyer[task.turn_of].append(task)
        return [task for tasks in per_buyer.values() for task in tasks]
    rows: list[Task] = []
    for buyer_id, share in shares.items():
        rows.extend(ordered.filter(job__buyer_id=buyer_id)[:share])
    return rows


def _buyers_in_flight(buyer_ids: Iterable[int]) -> dict[int, int]:
    """Each buyer's tasks leased now, canaries aside: what `fair_shares` weighs when the slots are
    contested. When every waiting task has a slot, or one buyer waits alone, each buyer's share is
    the same whatever these are, and the claim skips the count (a statement and its build: ~3 ms)."""
    return dict(
        Task.objects.filter(status=TaskStatus.LEASED, job__buyer_id__in=buyer_ids)
        .exclude(role=TaskRole.CANARY)
        .order_by()
        .values("job__buyer_id")
        .annotate(n=Count("id"))
        .values_list("job__buyer_id", "n")
    )


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
    banked = CanaryItem.objects.filter(model=OuterRef("pk"))
    models = CatalogModel.objects.filter(Exists(banked), is_active=True, min_memory_mb__lte=host.memory_mb)
    model = models.order_by("created_at").first()
    if model is None:
        return None
    queued = Task.objects.filter(status=TaskStatus.QUEUED, role=TaskRole.PRIMARY, job__model=model)
    size = queued.values_list("item_count", flat=True).first() or settings.HEARTH_DEFAULT_TASK_SIZE
    return canary_lease(host=host, model=model, size=size, now=now)


# ---- many hosts in one round ------------------------------------------------------------

# Tasks a batch round leases at most: bounds the round's transaction (and the rows it holds locked).
BATCH_LIMIT = 2000
# A round looks at this many hosts per queued task (and at least HOST_SAMPLE_MIN), from a random
# point in the fleet: the score still picks the best of several, and a round with a handful of new
# tasks costs a handful of host views, not the whole fleet's (sampling, as Sparrow's schedulers do).
# One, not four: a host view cost ~0.1 ms, so four a task made a small round cost more per task than
# a big one, and under a steady stream the rounds grew with the tasks that waited on them
# (bench.dispatch at half load: p99 12.5 s with four, 0.12 and 1.2 s with one). Work that only some
# hosts can serve (a region, green-only, much memory) gets more, by the share of the last round's
# seats that fitted its shape (`_sample_size`), up to HOST_SAMPLE_MAX_PER_TASK: with one a task, a
# burst of 40 tasks for a fifth of the fleet took 4.2 rounds to place on average, against 1.07 with four.
HOST_SAMPLE_PER_TASK = 1
HOST_SAMPLE_MAX_PER_TASK = 4
HOST_SAMPLE_MIN = 32
# How long a round trusts a reading of whether any host of the fleet could serve a job's shape at
# all (`_fleet_serves`); the reading only sizes the sample, each round's own hosts decide the rest.
SHAPE_VERDICT_S = 30.0


@dataclass
class _Seat:
    """A host in a batch round: its view, what it has left, and what it got."""

    host: Host
    view: HostView
    free: int
    groups: set[uuid.UUID]
    planned: list[Task]
    canaries: list[Task]
    trusted: bool | None = None  # None: not asked yet (asking costs a query)


def tasks_claim_batch(
    *, host_ids: list[uuid.UUID] | None = None, now: datetime | None = None, limit: int = BATCH_LIMIT
) -> dict[uuid.UUID, list[Assignment]]:
    """One dispatch round for many hosts: lease up to `limit` queued tasks across the online, verified
    hosts with free slots (all of them, or those in `host_ids`), and send each host its own
    `task.assign` message on commit. Returns what each host got.

    The same rules as `tasks_claim_for_host`: the buyers share the round by `fair_shares`, priority
    then age within a buyer, `pair_rejection`'s filters, never the same inputs twice on one host,
    tie-breaks only on trusted hosts, canaries at the host's rate, the lease at the host's price.
    Among the hosts that may take a task, the one with the best `match_score` gets it.

    Only jobs that some host of the round could serve take part (a job asking what no host of the
    round offers must not take the round's slots from one that can run), and the round samples
    hosts for the tasks of jobs that some host of the fleet could serve, not for work that no host
    can take now (`_fleet_serves`: that work still gets the smallest sample every round).

    Unverified hosts are left to `tasks_claim_for_host`, which gives them known-answer tasks one at
    a time. Locking, on PostgreSQL: the seated hosts' rows and the picked tasks are locked `FOR UPDATE
    SKIP LOCKED` (a host's own claim, which locks its row, and a round never fill the same slots;
    a claim running beside this one skips the round's tasks) and the round's leases are written by one
    `UPDATE … WHERE status = 'queued' RETURNING id` per chunk; only rows that moved are assigned.
    """
    now = now or timezone.now()
    expires = now + timedelta(seconds=settings.HEARTH_LEASE_SECONDS)
    got: dict[uuid.UUID, list[Assignment]] = {}
    started: set[uuid.UUID] = set()
    messages: list[tuple[str, dict[str, object]]] = []
    jobs = _waiting_jobs(now=now)
    if not jobs:
        return {}
    served = _fleet_serves({job.shape for job in jobs.values()}, now=now)
    sample = _sample_size([job for job in jobs.values() if job.shape in served], limit=limit)
    with transaction.atomic():
        seats = _seats(host_ids=host_ids, now=now, sample=sample)
        if not seats:
            return {}
        fits = {shape: fitting(shape, seats, _seat_view) for shape in {job.shape for job in jobs.values()}}
        for shape, fit in fits.items():
            _SHAPE_SHARES.put(shape, len(fit) / len(seats))
        runnable = {job_id: job for job_id, job in jobs.items() if fits[job.shape]}
        if not runnable:
            return {}
        slots = min(limit, sum(seat.free for seat in seats))
        # What the database would check of a job against the seats (price, memory, region, green,
        # deadline) `runnable` has: each of its jobs passed `fit_rejection` on some seat and the
        # deadline as read this round. The database still checks each task, its job and model live.
        candidates = _queued_work().filter(job_id__in=runnable)
        tasks = _batch_pick(candidates, runnable, slots=slots)
        _batch_place(tasks, seats, fits, now=now)
        moved = _lease_planned(seats, expires=expires, now=now)
        for seat in seats:
            leased = [task for task in seat.planned if task.pk in moved]
            for task in leased:
                task.lease_id, task.lease_expires_at = moved[task.pk], expires
                if task.job.status == JobStatus.QUEUED:  # as read this round; running jobs stay so
                    started.add(task.job_id)
            assignments = [_assignment(task) for task in [*seat.canaries, *leased]]
            if assignments:
                got[seat.host.pk] = assignments
                messages.append((seat.host.channel_name, _assign_message(assignments)))
        notify.on_commit_send_many(messages)
    job_mark_started(job_ids=started, now=now)
    return got


@dataclass(frozen=True)
class _Waiting:
    """An active job with queued tasks, as a round reads it before it locks any."""

    job: Job  # with its model
    shape: TaskView
    queued: int


def _waiting_jobs(*, now: datetime) -> dict[uuid.UUID, _Waiting]:
    """Each active job with queued tasks a host may start now, with what its tasks ask of a host and
    how many of them wait: one statement (the jobs found from the queued tasks' own index, each
    job's queued tasks counted by a probe of it, the model's columns a round reads joined in)."""
    statement = _waiting_jobs_statement()
    rows: RawQuerySet[WithAnnotations[Job, _Queued]] = Job.objects.raw(  # type: ignore[assignment]
        statement.sql, statement.bind(sql_value(Job, "deadline", now))
    )
    waiting: dict[uuid.UUID, _Waiting] = {}
    for job in rows:
        if job.queued:
            job.model = CatalogModel.from_db(
                rows.db,
                _MODEL_FIELDS,
                [job.model_id, *(getattr(job, f"model_{name}") for name in _MODEL_FIELDS[1:])],
            )
            waiting[job.pk] = _Waiting(job=job, shape=task_view(job), queued=job.queued)
    return waiting


# What a round reads of a job and of its model (`task_view`, the buyers' turns, the assignment).
_JOB_FIELDS = (
    "id",
    "buyer_id",
    "model_id",
    "status",
    "green_only",
    "verification",
    "max_price_per_1k_minor",
    "region",
    "deadline",
    "created_at",
)
# In the model's field order: `from_db` takes the values in that order.
_MODEL_FIELDS = ("id", "name", "min_memory_mb", "weights_sha256")


@functools.cache
def _waiting_jobs_statement() -> SqlTemplate:
    """`_waiting_job_rows`, compiled once per process (the deadline, which moves with the clock, bound
    each round). Compiling it each round cost about as much as running it: `_waiting_jobs` took 5.2
    ms a round before, 3.4 ms after (its statement ~1.7 ms)."""
    return sql_template(
        _waiting_job_rows, (datetime(2001, 1, 1, tzinfo=UTC), datetime(2002, 1, 1, tzinfo=UTC))
    )


def _waiting_job_rows(now: datetime) -> QuerySet[Job]:
    """What `_waiting_jobs` reads, as the ORM builds it."""
    return _waiting_jobs_base().filter(
        Q(deadline__isnull=True) | Q(deadline__gt=now) | Q(status=JobStatus.RUNNING)
    )


@functools.cache
def _waiting_jobs_base() -> QuerySet[Job]:
    """`_waiting_job_rows` but for the deadline: the model's columns as annotations (a raw query
    cannot join a related row), each job's queued tasks counted."""
    queued = Task.objects.filter(status=TaskStatus.QUEUED).exclude(role=TaskRole.CANARY).order_by()
    count = queued.filter(job=OuterRef("pk")).values("job").annotate(n=Count("pk")).values("n")
    return (
        Job.objects.filter(pk__in=queued.values("job_id"), status__in=JOB_ACTIVE, model__is_active=True)
        .only(*_JOB_FIELDS)
        .annotate(
            queued=Subquery(count), **{f"model_{name}": F(f"model__{name}") for name in _MODEL_FIELDS[1:]}
        )
        .order_by()
    )


# shape → the share of the last round's seats that could take it (`fitting`)
_SHAPE_SHARES: BoundedCache[TaskView, float] = BoundedCache(limit=10_000)


def _sample_size(jobs: list[_Waiting], *, limit: int) -> int:
    """Hosts a round reads: HOST_SAMPLE_PER_TASK a waiting task, more for a shape that fewer seats
    fitted last time (a shape never seen gets HOST_SAMPLE_MAX_PER_TASK), at least HOST_SAMPLE_MIN."""
    wanted = 0.0
    for job in jobs:
        share = _SHAPE_SHARES.get(job.shape, 0.0)
        per_task = 1 / share if share else HOST_SAMPLE_MAX_PER_TASK
        wanted += job.queued * min(HOST_SAMPLE_MAX_PER_TASK, max(HOST_SAMPLE_PER_TASK, per_task))
    return max(HOST_SAMPLE_MIN, min(math.ceil(wanted), HOST_SAMPLE_MAX_PER_TASK * limit))


# shape → (time.monotonic() when read, whether some host of the fleet could serve it then)
_SHAPE_VERDICTS: BoundedCache[TaskView, tuple[float, bool]] = BoundedCache(limit=10_000)


def _fleet_serves(shapes: set[TaskView], *, now: datetime) -> set[TaskView]:
    """Of `shapes`, those that some online, verified host taking work could serve (free slots or
    not), as read at most `SHAPE_VERDICT_S` ago. A shape never read is read now; of the readings
    gone stale, one a round is read again (the oldest) and the rest serve meanwhile, so a round
    never stops to re-read them all at once."""
    clock = time.monotonic()
    unread = [shape for shape in shapes if shape not in _SHAPE_VERDICTS]
    stale = sorted(
        (
            shape
            for shape in shapes
            if shape in _SHAPE_VERDICTS and clock - _SHAPE_VERDICTS[shape][0] > SHAPE_VERDICT_S
        ),
        key=lambda shape: _SHAPE_VERDICTS[shape][0],
    )
    if len(_SHAPE_VERDICTS) + len(unread) > _SHAPE_VERDICTS.limit:
        _SHAPE_VERDICTS.clear()
        unread, stale = list(shapes), []
    for shape in [*unread, *stale[:1]]:
        _SHAPE_VERDICTS.put(shape, (clock, _fleet_serves_one(shape, now=now)))
    return {shape for shape in shapes if _SHAPE_VERDICTS[shape][1]}


def _fleet_serves_one(shape: TaskView, *, now: datetime) -> bool:
    # The database narrows the fleet by what it can tell (memory, region, a fresh power reading for
    # green-only work); `fit_rejection` and `host_takes_work` decide, stopping at the first host.
    hosts = _dispatchable_hosts().filter(memory_mb__gte=shape.min_memory_mb)
    if shape.region:
        hosts = hosts.filter(region=shape.region)
    if shape.green_only:
        hosts = hosts.filter(power_at__gte=power_fresh_since(now))
    for host in hosts.order_by().iterator(chunk_size=32):
        view = host_view(host, now=now, leased=0)
        if host_takes_work(view).allowed and fit_rejection(shape, view) is None:
            return True
    return False


def _dispatchable_hosts() -> QuerySet[Host]:
    """Hosts a batch round may seat, free slots aside: online, verified, with a live connection."""
    return (
        Host.objects.filter(
            status=Host.Status.ONLINE,
            revoked_at__isnull=True,
            verified_at__isnull=False,
            ready=True,
            draining=False,
            quarantined_at__isnull=True,
        )
        .exclude(channel_name="")
        .exclude(hardware_ok=False)
    )


# The host columns a round reads (its view, its channel, its canary rate, whether it is trusted):
# a host row has ~50, a dozen of them timestamps, and loading the rest was most of a seat's cost.
_SEAT_FIELDS = (
    "id",
    "channel_name",
    "ready",
    "slots",
    "memory_mb",
    "draining",
    "policy",
    "region",
    "power_at",
    "power_source",
    *METERS,
    "agent_work_allowed",
    "agent_work_reason",
    "quarantined_at",
    "quarantine_reason",
    "hardware_ok",
    "hardware_reason",
    "verified_at",
    "benchmark",
    "reliability",
    "pass_streak",
)


class _InFlight(TypedDict):
    in_flight: int


class _Queued(TypedDict):
    queued: int


@functools.cache
def _seat_hosts() -> QuerySet[WithAnnotations[Host, _InFlight]]:
    """What `_seats` reads, all but the round's own bounds. Built once per process and chained from
    (querysets are immutable; each round filters a copy): building and compiling this statement
    afresh took 3.1-3.9 ms, compiling a copy 1.2 ms (the copies share the resolved expressions)."""
    # Counted per host as the hosts are read (an index probe each), not by joining every task ever
    # leased: that join read the leases of hosts before the random start too.
    leases = (
        Task.objects.filter(leased_to=OuterRef("pk"), status=TaskStatus.LEASED)
        .order_by()
        .values("leased_to")
        .annotate(n=Count("pk"))
        .values("n")
    )
    hosts = (
        _dispatchable_hosts()
        .only(*_SEAT_FIELDS)
        .annotate(in_flight=Coalesce(Subquery(leases), 0))
        .filter(in_flight__lt=F("slots"))
        .order_by("pk")
    )
    if connection.features.has_select_for_update_skip_locked:
        # A host whose row another transaction holds (its own claim, a result, a disconnect) sits
        # this round out rather than make the round wait; its seat is counted under the lock.
        hosts = hosts.select_for_update(skip_locked=True, of=("self",))
    return hosts


def _seats(*, host_ids: list[uuid.UUID] | None, now: datetime, sample: int) -> list[_Seat]:
    """The round's hosts: online, verified, with a live connection and free slots; at most `sample`
    of them, read in id order from a random id on (wrapping round), so every host gets its turn."""
    start = uuid.UUID(int=_random.getrandbits(128))
    if host_ids is None:
        picked = _seat_rows(before=False, start=start, count=sample)
        if len(picked) < sample:
            picked += _seat_rows(before=True, start=start, count=sample - len(picked))
    else:
        hosts = _seat_hosts().filter(pk__in=host_ids)
        picked = list(hosts.filter(pk__gte=start)[:sample])
        if len(picked) < sample:
            picked += hosts.filter(pk__lt=start)[: sample - len(picked)]
    seats: list[_Seat] = []
    for host in picked:
        # The query above is a cheap first cut; `free_slots` is the rule (power, agent verdict, …).
        view = host_view(host, now=now, leased=host.in_flight)
        free = free_slots(view)
        if free:
            seats.append(_Seat(host=host, view=view, free=free, groups=set(), planned=[], canaries=[]))
    return seats


def _seat_rows(*, before: bool, start: uuid.UUID, count: int) -> list[WithAnnotations[Host, _InFlight]]:
    """Up to `count` of the whole fleet's seat rows in id order from `start` (`before`: below it)."""
    statement = _seat_statement(before=before)
    params = statement.bind(sql_value(Host, "id", start), limit=count)
    return list(Host.objects.raw(statement.sql, params))  # type: ignore[arg-type]


@functools.cache
def _seat_statement(*, before: bool) -> SqlTemplate:
    """The seats statement of a round over the whole fleet, compiled once per process. Reading 32
    seats took 9.3 ms a round with the statement compiled each time and 8.3 ms without; most of the
    rest is running it (~3.3 ms from Python) and turning the rows into hosts."""
    return sql_template(
        functools.partial(_seat_rows_from, before=before), (uuid.UUID(int=1), uuid.UUID(int=2)), limited=True
    )


def _seat_rows_from(start: uuid.UUID, *, before: bool) -> QuerySet[WithAnnotations[Host, _InFlight]]:
    """What `_seat_rows` reads, as the ORM builds it (unsliced)."""
    return _seat_hosts().filter(pk__lt=start) if before else _seat_hosts().filter(pk__gte=start)


def _batch_pick(candidates: QuerySet[Task], jobs: dict[uuid.UUID, _Waiting], *, slots: int) -> list[Task]:
    """`_fair_pick` for the whole round, in the order the buyers take turns: each buyer's tasks best
    first, the buyers interleaved, so when hosts run short the round still alternates buyers.
    `jobs`: the candidates' jobs, each with its queued tasks counted."""
    waiting: dict[int, tuple[int, datetime]] = {}
    for each in jobs.values():
        queued, oldest = waiting.get(each.job.buyer_id, (0, each.job.created_at))
        waiting[each.job.buyer_id] = (queued + each.queued, min(oldest, each.job.created_at))
    tasks = _fair_pick(candidates, slots=slots, with_jobs=False, waiting=waiting)
    per_buyer: dict[int, list[Task]] = {}
    for task in tasks:
        task.job = jobs[task.job_id].job
        per_buyer.setdefault(task.job.buyer_id, []).append(task)
    queues = list(per_buyer.values())
    return [
        queue[turn]
        for turn in range(max(map(len, queues), default=0))
        for queue in queues
        if turn < len(queue)
    ]


def _batch_place(
    tasks: list[Task], seats: list[_Seat], fits: dict[TaskView, list[_Seat]], *, now: datetime
) -> None:
    """Give each task, in turn, to the best-scoring host that may take it and has a slot left.
    `fits` holds, for each shape of job already looked at, the seats `fit_rejection` passes, in
    seat order; a shape not in it (its job changed since the round read it) is looked at here."""
    ran = _runs_of_groups(
        {task.group for task in tasks if task.group is not None and _group_may_have_runs(task)}
    )
    ranked: dict[TaskView, deque[_Seat]] = {}
    for task in tasks:
        wants = task_view(task.job)
        if wants not in ranked:
            if wants not in fits:
                fits[wants] = fitting(wants, seats, _seat_view)
            # Stable: equal scores keep the hosts' order, so a round is repeatable.
            ranked[wants] = deque(sorted(fits[wants], key=lambda seat: -match_score(wants, seat.view).total))
        seat = _first_seat(task, ranked[wants], ran=ran, now=now)
        if seat is None:
            continue
        seat.free -= 1
        if not task.needs_trusted and _random.random() < _canary_rate(seat.host):
            # A canary in this task's place, shaped like it; the task stays queued for the next round.
            canary = canary_lease(host=seat.host, model=task.job.model, size=task.item_count, now=now)
            if canary is not None:
                seat.canaries.append(canary)
                continue
        if task.group is not None:
            seat.groups.add(task.group)
        seat.planned.append(task)


def _seat_view(seat: _Seat) -> HostView:
    return seat.view


def _first_seat(
    task: Task, ranked: deque[_Seat], *, ran: set[tuple[uuid.UUID, uuid.UUID]], now: datetime
) -> _Seat | None:
    # Full hosts are dropped from the front as they fill, so the scan stays short in a big round.
    while ranked and ranked[0].free == 0:
        ranked.popleft()
    for seat in ranked:
        if seat.free == 0:
            continue
        if task.group is not None and (task.group in seat.groups or (task.group, seat.host.pk) in ran):
            continue
        if task.needs_trusted:
            if seat.trusted is None:
                seat.trusted = host_trusted(host=seat.host, now=now)
            if not seat.trusted:
                continue
        return seat
    return None


def _group_may_have_runs(task: Task) -> bool:
    """Whether another row of the task's group may have been leased or run. A queued primary of a
    job without verification is its group's only row: replicas of it come at submit only for `spot`
    and `redundant` jobs, and otherwise (a tie-break, a recheck after a strike) only once it has run,
    when it is no longer queued; and a queued row has no leaseholder (a requeue clears it). So the
    round skips the statement for such tasks (~1.3 ms a round of 23 fresh tasks, a third of it in
    PostgreSQL)."""
    return task.role != TaskRole.PRIMARY or task.job.verification != Verification.NONE


def _runs_of_groups(groups: set[uuid.UUID]) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """(group, host) for every host that holds or ran a task of these groups: never again there."""
    if not groups:
        return set()
    pairs: set[tuple[uuid.UUID, uuid.UUID]] = set()
    # Only the group index: a runless row is skipped below (a filter on the host columns let the
    # planner scan every leased task instead), and no order (the model's would join the jobs).
    rows = Task.objects.filter(group__in=groups).order_by()
    for group, leased_to, completed_by in rows.values_list("group", "leased_to_id", "completed_by_id"):
        if group is not None:
            pairs.update((group, host) for host in (leased_to, completed_by) if host is not None)
    return pairs


def _canary_rate(host: Host) -> float:
    return canary_rate(
        host.pass_streak, high=settings.HEARTH_CANARY_RATE_MAX, low=settings.HEARTH_CANARY_RATE_MIN
    )


# Rows per UPDATE: at 4 parameters a row, it stays far below SQLite's 32,766 and keeps statements small.
_LEASE_CHUNK = 1000


def _lease_planned(seats: list[_Seat], *, expires: datetime, now: datetime) -> dict[uuid.UUID, uuid.UUID]:
    """Lease every seat's planned tasks to its host at its price: `UPDATE … FROM (VALUES …) WHERE
    status = 'queued' RETURNING id`, a chunk of rows per statement (the ORM's UPDATE takes one set
    of values; one UPDATE per host cost more than the rest of the round). The task ids that moved,
    each with its new lease id; a row someone else moved first is not among them."""
    plan = [
        (task.pk, uuid.uuid4(), seat.host.pk, seat.view.price_per_1k_minor)
        for seat in seats
        for task in seat.planned
    ]
    moved: dict[uuid.UUID, uuid.UUID] = {}
    if not plan:
        return moved
    table = sql_table(Task)
    c = {name: f"{table}.{sql_column(Task, name)}" for name in _LEASE_COLUMNS}
    bare = {name: sql_column(Task, name) for name in _LEASE_COLUMNS}  # SET takes unqualified names
    uuid_field = Task._meta.get_field("id")
    stamp = Task._meta.get_field("assigned_at")
    row = sql_values_row("uuid", "uuid", "uuid", "integer")
    for start in range(0, len(plan), _LEASE_CHUNK):
        chunk = plan[start : start + _LEASE_CHUNK]
        sql = (
            f"WITH lease (task_id, lease_id, host_id, price) AS (VALUES {', '.join([row] * len(chunk))}) "
            f"UPDATE {table} SET {bare['status']} = %s, {bare['lease_id']} = lease.lease_id, "
            f"{bare['leased_to']} = lease.host_id, {bare['price_per_1k_minor']} = lease.price, "
            f"{bare['lease_expires_at']} = %s, {bare['assigned_at']} = %s, {bare['attempt']} = {c['attempt']} + 1 "
            f"FROM lease WHERE {c['id']} = lease.task_id AND {c['status']} = %s "
            f"RETURNING {c['id']}, {c['lease_id']}"
        )
        params: list[Any] = []
        for task_id, lease_id, host_id, price in chunk:
            params += [
                _db_uuid(uuid_field, task_id),
                _db_uuid(uuid_field, lease_id),
                _db_uuid(uuid_field, host_id),
                price,
            ]
        params += [
            TaskStatus.LEASED.value,
            stamp.get_db_prep_value(expires, connection),
            stamp.get_db_prep_value(now, connection),
            TaskStatus.QUEUED.value,
        ]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            for task_id, lease_id in cursor.fetchall():
                moved[_py_uuid(task_id)] = _py_uuid(lease_id)
    return moved


_LEASE_COLUMNS = (
    "id",
    "status",
    "lease_id",
    "leased_to",
    "price_per_1k_minor",
    "lease_expires_at",
    "assigned_at",
    "attempt",
)


def _db_uuid(field: Any, value: uuid.UUID) -> object:
    return field.get_db_prep_value(value, connection)


def _py_uuid(value: object) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _assign_message(assignments: list[Assignment]) -> dict[str, object]:
    """A channel-layer message (msgpack-safe: strings, lists) the host's consumer sends on as frames."""
    return {
        "type": "task.assign",
        "assignments": [
            {
                "task_id": str(a.task_id),
                "lease_id": str(a.lease_id),
                "model_sha256": a.model_sha256,
                "model_name": a.model_name,
                "inputs": a.inputs,
                "lease_expires_at": a.lease_expires_at.isoformat(),
            }
            for a in assignments
        ],
    }
