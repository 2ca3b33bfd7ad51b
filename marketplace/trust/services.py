"""Writes for trust: sessions, benchmarks, canaries, verdicts, strikes, quarantine, the score.

Every consequence for a host goes through `run_judged` or `strike`, so a verdict always updates the
counters, the score (with a reason the owner can read) and, past the strike limit, quarantine."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import mail_admins
from django.db import transaction
from django.db.models import Case, Count, F, FloatField, Q, Value, When
from django.utils import timezone

from hearth_agent import protocol
from marketplace.accounts.models import User
from marketplace.catalog.models import CatalogModel
from marketplace.gateway import notify
from marketplace.hosts.models import Host
from marketplace.jobs.metering import run_pay, run_unpay
from marketplace.jobs.models import Job, Task, TaskRole, Verdict
from marketplace.jobs.states import JobStatus, TaskStatus
from marketplace.trust.hardware import hardware_plausible
from marketplace.trust.models import CanaryItem, HostSession, ReliabilityEvent, Strike
from marketplace.trust.scoring import TrustFacts, reliability_score

logger = logging.getLogger(__name__)
_random = secrets.SystemRandom()
CANARY_ACCOUNT = "canaries@hearth.internal"
STRIKE_WINDOW = timedelta(days=30)


# ---- sessions and uptime ------------------------------------------------------


def sessions_start(*, started: Sequence[tuple[uuid.UUID, str]], now: datetime) -> None:
    """Open a session for each (host, channel) connection, closing the host's open one."""
    if started:
        HostSession.objects.filter(
            host_id__in={host_id for host_id, _ in started}, ended_at__isnull=True
        ).update(ended_at=now)
        HostSession.objects.bulk_create(
            HostSession(host_id=host_id, channel_name=channel_name, started_at=now)
            for host_id, channel_name in started
        )


def sessions_end(*, ended: Sequence[tuple[uuid.UUID, str]], now: datetime) -> None:
    """Close the open sessions of these (host, channel) connections."""
    if ended:
        # A channel names one connection of one host, so matching the two lists apart matches pairs.
        HostSession.objects.filter(
            host_id__in={host_id for host_id, _ in ended},
            channel_name__in={channel_name for _, channel_name in ended},
            ended_at__isnull=True,
        ).update(ended_at=now)


def uptime(*, host: Host, window: timedelta, now: datetime) -> float:
    """Share of the window (or of the host's life, when shorter) it had a session open."""
    return uptimes(hosts=[host], window=window, now=now)[host.pk]


def uptimes(*, hosts: Sequence[Host], window: timedelta, now: datetime) -> dict[uuid.UUID, float]:
    """`uptime` of many hosts from one read of their sessions."""
    starts = {host.pk: max(now - window, host.created_at) for host in hosts}
    covered = dict.fromkeys(starts, 0.0)
    if starts:
        sessions = HostSession.objects.filter(host_id__in=starts, started_at__lt=now).filter(
            Q(ended_at__isnull=True) | Q(ended_at__gt=min(starts.values()))
        )
        for host_id, began, ended in sessions.values_list("host_id", "started_at", "ended_at"):
            covered[host_id] += max(0.0, ((ended or now) - max(began, starts[host_id])).total_seconds())
    return {
        host_id: min(1.0, covered[host_id] / span) if (span := (now - start).total_seconds()) > 0 else 0.0
        for host_id, start in starts.items()
    }


# ---- the score ------------------------------------------------------------------


def strikes_recent(*, host_id: uuid.UUID, now: datetime) -> int:
    return Strike.objects.filter(host_id=host_id, created_at__gte=now - STRIKE_WINDOW).count()


def host_facts(*, host: Host, now: datetime) -> TrustFacts:
    return _facts(
        host,
        uptime_7d=uptime(host=host, window=timedelta(days=7), now=now),
        strikes_30d=strikes_recent(host_id=host.pk, now=now),
    )


def _facts(host: Host, *, uptime_7d: float, strikes_30d: int) -> TrustFacts:
    return TrustFacts(
        uptime_7d=uptime_7d,
        tasks_completed=host.tasks_completed,
        tasks_failed=host.tasks_failed,
        leases_expired=host.leases_expired,
        checks_passed=host.checks_passed + host.canaries_passed,
        checks_failed=host.checks_failed + host.canaries_failed,
        strikes_30d=strikes_30d,
    )


# What a score reads of the host row.
_SCORE_FIELDS = (
    "id", "created_at", "reliability", "tasks_completed", "tasks_failed", "leases_expired",
    "checks_passed", "canaries_passed", "checks_failed", "canaries_failed",
)  # fmt: skip


def score_update(
    *, host_id: uuid.UUID, reason: str, now: datetime | None = None, always: bool = False
) -> float:
    """Recompute the score; a change (or, with `always`, a milestone such as verification or
    quarantine) is recorded with `reason` and the parts that produced it."""
    return scores_update(reasons={host_id: reason}, now=now, always=always)[host_id]


def scores_update(
    *, reasons: dict[uuid.UUID, str], now: datetime | None = None, always: bool = False
) -> dict[uuid.UUID, float]:
    """`score_update` of many hosts, each with its reason, in a fixed number of statements (the
    hosts that a reconnect storm or a sweep takes offline at once)."""
    now = now or timezone.now()
    hosts = list(Host.objects.filter(pk__in=reasons).only(*_SCORE_FIELDS))
    uptime_7d = uptimes(hosts=hosts, window=timedelta(days=7), now=now)
    strikes = dict(
        Strike.objects.filter(host_id__in=reasons, created_at__gte=now - STRIKE_WINDOW)
        .order_by()
        .values("host_id")
        .annotate(n=Count("id"))
        .values_list("host_id", "n")
    )
    scores: dict[uuid.UUID, float] = {}
    events: list[ReliabilityEvent] = []
    for host in hosts:
        facts = _facts(host, uptime_7d=uptime_7d[host.pk], strikes_30d=strikes.get(host.pk, 0))
        parts = reliability_score(facts)
        scores[host.pk] = parts.score
        if always or abs(parts.score - host.reliability) >= 0.0001:
            explained = (
                f"{reasons[host.pk]} — uptime 7 d {parts.uptime:.0%}, completion {facts.tasks_completed}/"
                f"{facts.tasks_completed + facts.tasks_failed + facts.leases_expired}, verification "
                f"{facts.checks_passed}/{facts.checks_passed + facts.checks_failed} passed, "
                f"{facts.strikes_30d} strike(s) in 30 days"
            )
            events.append(
                ReliabilityEvent(
                    host=host, score_before=host.reliability, score_after=parts.score, reason=explained
                )
            )
    if events:
        ReliabilityEvent.objects.bulk_create(events)
        changed = {event.host_id: event.score_after for event in events}
        Host.objects.filter(pk__in=changed).update(
            reliability=Case(
                *(When(pk=host_id, then=Value(score)) for host_id, score in changed.items()),
                output_field=FloatField(),
            )
        )
    return scores


def host_trusted(*, host: Host, now: datetime) -> bool:
    """Trusted hosts break ties: verified, not quarantined, a good score, no recent strike."""
    return (
        host.verified_at is not None
        and host.quarantined_at is None
        and host.hardware_ok is True
        and host.reliability >= settings.HEARTH_TRUSTED_MIN_SCORE
        and strikes_recent(host_id=host.pk, now=now) == 0
    )


def _verify_if_ready(*, host_id: uuid.UUID, now: datetime) -> None:
    host = Host.objects.get(pk=host_id)
    if (
        host.verified_at is None
        and host.quarantined_at is None
        and host.hardware_ok is True
        and host.canaries_passed >= settings.HEARTH_CANARIES_TO_VERIFY
    ):
        Host.objects.filter(pk=host_id, verified_at__isnull=True).update(verified_at=now)
        score_update(
            host_id=host_id,
            reason=f"verified: benchmark plausible and {host.canaries_passed} known-answer tasks passed",
            now=now,
            always=True,
        )
        notify.on_commit_dispatch()


# ---- strikes and quarantine --------------------------------------------------------


def strike(*, host_id: uuid.UUID, kind: str, evidence: str, task: Task | None = None) -> Strike:
    """Record a strike with its evidence; past the limit in 30 days the host is quarantined."""
    now = timezone.now()
    made = Strike.objects.create(host_id=host_id, kind=kind, task=task, evidence=evidence[:4000])
    Host.objects.filter(pk=host_id).update(pass_streak=0)
    score_update(
        host_id=host_id, reason=f"strike ({Strike.Kind(kind).label.lower()}): {evidence[:300]}", now=now
    )
    from marketplace.trust.verification import host_unchecked_results_recheck

    if settings.HEARTH_RECHECK_AFTER_STRIKE and host_unchecked_results_recheck(host_id=host_id):
        notify.on_commit_dispatch()
    count = strikes_recent(host_id=host_id, now=now)
    if count >= settings.HEARTH_STRIKES_TO_QUARANTINE:
        quarantine(host_id=host_id, reason=f"{count} strikes in 30 days; last: {evidence[:300]}")
    return made


def quarantine(*, host_id: uuid.UUID, reason: str) -> bool:
    """No new work, its leases requeued, pending earnings withheld for review, the operator told."""
    from marketplace.jobs.services import tasks_requeue_for_host

    moved = Host.objects.filter(pk=host_id, quarantined_at__isnull=True).update(
        quarantined_at=timezone.now(), quarantine_reason=reason[:400], earnings_withheld=True
    )
    if not moved:
        return False
    tasks_requeue_for_host(host_id=host_id, reason="host quarantined")
    score_update(
        host_id=host_id, reason=f"quarantined, pending earnings withheld for review: {reason}", always=True
    )
    host = Host.objects.select_related("owner").get(pk=host_id)
    message = f"Host {host.name} ({host.pk}) of {host.owner.email} was quarantined: {reason}"
    logger.warning("%s", message)
    transaction.on_commit(
        lambda: mail_admins(f"Hearth: host {host.name} quarantined", message, fail_silently=True)
    )
    return True


def quarantine_lift(*, host_id: uuid.UUID, reviewer_note: str) -> bool:
    """The operator's decision after review: the host may work again (earnings released separately)."""
    moved = Host.objects.filter(pk=host_id, quarantined_at__isnull=False).update(
        quarantined_at=None, quarantine_reason="", earnings_withheld=False
    )
    if moved:
        score_update(
            host_id=host_id, reason=f"quarantine lifted by the operator: {reviewer_note}", always=True
        )
        notify.on_commit_dispatch()
    return bool(moved)


# ---- verdicts on runs ------------------------------------------------------------------


def run_judged(*, task: Task, passed: bool, reason: str, strike_kind: str = Strike.Kind.MISMATCH) -> None:
    """Record the verdict on one run and what it means for the host that ran it."""
    Task.objects.filter(pk=task.pk).update(
        verdict=Verdict.PASSED if passed else Verdict.FAILED, verdict_reason=reason[:2000]
    )
    host_id = task.completed_by_id
    if host_id is None:
        return
    canary = task.role == TaskRole.CANARY
    passed_field, failed_field = (
        ("canaries_passed", "canaries_failed") if canary else ("checks_passed", "checks_failed")
    )
    if passed:
        run_pay(task_id=task.pk)
        Host.objects.filter(pk=host_id).update(
            **{passed_field: F(passed_field) + 1}, pass_streak=F("pass_streak") + 1
        )
        what = "known-answer task" if canary else "result matched an independent run"
        score_update(host_id=host_id, reason=f"{what} passed (task {task.pk})")
        _verify_if_ready(host_id=host_id, now=timezone.now())
    else:
        Host.objects.filter(pk=host_id).update(**{failed_field: F(failed_field) + 1})
        run_unpay(task_id=task.pk, reason=reason)  # a run accepted unchecked, then found wrong
        kind = Strike.Kind.CANARY if canary else strike_kind
        strike(host_id=host_id, kind=kind, task=task, evidence=f"task {task.pk}: {reason}")


# ---- benchmarks -----------------------------------------------------------------------------


@transaction.atomic
def host_benchmark_record(*, host_id: uuid.UUID, report: protocol.BenchmarkReport) -> bool:
    """Store the measured numbers and check them against the claimed device; a claim that does not
    hold is a strike (once per distinct report) and keeps the host unverified."""
    host = Host.objects.get(pk=host_id)
    claims = host.capabilities or {}
    verdict = hardware_plausible(
        report,
        claimed_device=host.device or report.device,
        claimed_gpus=[str(gpu.get("name", "")) for gpu in claims.get("gpus", [])],
        memory_mb=host.memory_mb,
    )
    repeated = host.benchmark.get("key") == report.key and host.hardware_ok is verdict.ok
    Host.objects.filter(pk=host_id).update(
        benchmark=report.model_dump(mode="json"),
        benchmark_at=timezone.now(),
        hardware_ok=verdict.ok,
        hardware_reason=verdict.reason[:400],
    )
    if not verdict.ok and not repeated:
        strike(host_id=host_id, kind=Strike.Kind.HARDWARE, evidence=verdict.reason)
    elif verdict.ok:
        _verify_if_ready(host_id=host_id, now=timezone.now())
    return verdict.ok


def hosts_request_benchmark(*, now: datetime | None = None) -> int:
    """Ask online hosts to measure again: when their numbers are old, and at random; at most
    `HEARTH_REBENCHMARK_PER_SWEEP` a sweep, the oldest numbers first, the rest at the next sweeps.

    One SELECT of the hosts due (not of every online host: reading 10,000 of them to pick the few due
    took 83 ms a sweep, every sweep), one UPDATE and one trip into the event loop for all of them.
    The cap spreads a fleet whose numbers all went stale together (one that reconnected after a
    deploy a day ago, or one that never measured) over several sweeps: 10,000 requests in one sweep
    were 10,000 channel sends in one burst on the event loop every socket shares (heartbeat acks
    waited up to 2 s)."""
    now = now or timezone.now()
    chance = settings.HEARTH_SWEEP_INTERVAL_S / settings.HEARTH_REBENCHMARK_RANDOM_MEAN_S
    stale_before = now - timedelta(seconds=settings.HEARTH_REBENCHMARK_S)
    recently_asked = now - timedelta(seconds=max(60.0, 10 * settings.HEARTH_HEARTBEAT_INTERVAL_S))
    hosts = Host.objects.filter(status=Host.Status.ONLINE, ready=True).exclude(channel_name="")
    hosts = hosts.exclude(benchmark_requested_at__gte=recently_asked)
    stale = Q(benchmark_at__isnull=True) | Q(benchmark_at__lt=stale_before)
    if chance < 1:
        hosts = hosts.filter(stale | _random_ids(chance))
    # Never measured first, then the oldest numbers.
    due = hosts.order_by(F("benchmark_at").asc(nulls_first=True)).values_list(
        "pk", "channel_name", "benchmark_at"
    )
    asked = [
        (
            host_id,
            channel_name,
            "periodic re-benchmark" if at is None or at < stale_before else "random re-benchmark",
        )
        for host_id, channel_name, at in due[: settings.HEARTH_REBENCHMARK_PER_SWEEP]
    ]
    if asked:
        Host.objects.filter(pk__in=[host_id for host_id, _, _ in asked]).update(benchmark_requested_at=now)
        notify.send_many(
            [(channel_name, {"type": "agent.benchmark", "reason": why}) for _, channel_name, why in asked]
        )
    return len(asked)


_IDS = 1 << 128


def _random_ids(chance: float) -> Q:
    """Host ids in a window of `chance` (below 1) of the id space from a random start, wrapping
    round: each host is in it with probability `chance`, whatever its id, since the start is drawn
    from the system's randomness, which no host can predict. The database finds them through the
    primary key rather than Python drawing a number for every host."""
    start = _random.randrange(_IDS)
    end = start + int(chance * _IDS)
    if end < _IDS:
        return Q(pk__gte=uuid.UUID(int=start), pk__lt=uuid.UUID(int=end))
    return Q(pk__gte=uuid.UUID(int=start)) | Q(pk__lt=uuid.UUID(int=end - _IDS))


# ---- canaries ---------------------------------------------------------------------------------


def canary_job(*, model: CatalogModel) -> Job:
    """The hidden job that holds a model's canaries; owned by a system account, never finished."""
    owner, _ = User.objects.get_or_create(
        username=CANARY_ACCOUNT, defaults={"email": CANARY_ACCOUNT, "is_active": False}
    )
    job = Job.objects.filter(buyer=owner, model=model, status=JobStatus.RUNNING).first()
    if job is None:
        job = Job.objects.create(
            buyer=owner,
            model=model,
            status=JobStatus.RUNNING,
            task_size=settings.HEARTH_DEFAULT_TASK_SIZE,
            items_total=0,
            started_at=timezone.now(),
        )
    return job


def canary_lease(*, host: Host, model: CatalogModel, size: int, now: datetime) -> Task | None:
    """A known-answer task leased straight to `host`, cut from the model's bank at random, shaped
    like the real work around it. None when the model has no bank."""
    # The bank's keys first, then only the chosen rows: not every embedding of the bank per lease.
    bank = list(CanaryItem.objects.filter(model=model).values_list("pk", flat=True))
    if not bank:
        return None
    picked = _random.sample(bank, min(size, len(bank)))
    chosen = list(CanaryItem.objects.filter(pk__in=picked).values_list("text", "embedding"))
    task = Task(
        job=canary_job(model=model),
        index=0,
        first_item=0,
        inputs=[text for text, _ in chosen],
        item_count=len(chosen),
        role=TaskRole.CANARY,
        expected=b"".join(bytes(vector) for _, vector in chosen),
        status=TaskStatus.LEASED,
        lease_id=uuid.uuid4(),
        leased_to=host,
        lease_expires_at=now + timedelta(seconds=settings.HEARTH_LEASE_SECONDS),
        assigned_at=now,
        attempt=1,
    )
    task.group = task.pk
    task.save(force_insert=True)
    return task
