"""Checking results: which tasks get more than one run, and settling a group of runs once they are in.

A job's task is a group: its primary row plus replica rows with the same inputs (`group` = the
primary's id), each leased to a different host. `spot` adds a replica to a random share f of the
tasks; `redundant` gives every task k runs. When every run of a group is in:
- they all agree (per item cosine, marketplace.trust.compare): every run passes, the primary's output
  is final;
- any disagreement: a tie-break run on a trusted host; its output is the truth, each run is judged
  against it, and a wrong run's host gets a strike and is not paid. The buyer gets the truth.
Unverified outputs never reach the buyer: results come only from settled primaries.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime

from django.conf import settings
from django.db.models import F

from marketplace.jobs.metering import job_escrow_release, run_pay
from marketplace.jobs.models import Job, Task, TaskRole, Verdict, Verification
from marketplace.jobs.states import JOB_ACTIVE, JobStatus, TaskStatus
from marketplace.trust.compare import embeddings_agree
from marketplace.trust.services import run_judged

_random = secrets.SystemRandom()
# A group that reaches this many runs without two agreeing fails its job rather than run forever.
MAX_RUNS = 8


def replicas_plan(*, verification: str, spot_fraction: float, replicas: int, tasks: int) -> list[int]:
    """How many extra runs each of `tasks` tasks gets (the sampling hosts cannot see)."""
    if verification == Verification.REDUNDANT:
        return [max(1, replicas) - 1] * tasks
    if verification == Verification.SPOT:
        return [1 if _random.random() < spot_fraction else 0 for _ in range(tasks)]
    return [0] * tasks


def replicas_build(*, primary: Task, count: int) -> list[Task]:
    return [
        Task(
            job_id=primary.job_id,
            index=primary.index,
            first_item=primary.first_item,
            inputs=primary.inputs,
            item_count=primary.item_count,
            role=TaskRole.REPLICA,
            group=primary.pk,
        )
        for _ in range(count)
    ]


def _agree(task: Task, reference: bytes) -> tuple[bool, str]:
    assert task.output is not None and task.dimension is not None
    agreement = embeddings_agree(
        bytes(task.output),
        reference,
        dimension=task.dimension,
        min_cosine=settings.HEARTH_EMBEDDING_MIN_COSINE,
    )
    return agreement.ok, agreement.reason


def canary_judge(*, task: Task) -> bool:
    assert task.expected is not None
    ok, reason = _agree(task, bytes(task.expected))
    run_judged(task=task, passed=ok, reason=f"known-answer task: {reason}")
    return ok


def _settle(*, primary: Task, output: bytes, now: datetime) -> bool:
    """The primary's output becomes final; True when that finished the job."""
    final: dict[str, object] = {"settled": True}
    if primary.output is None or bytes(primary.output) != output:
        # Another run's output wins; the primary's own (checked against its sha256 when it came in)
        # is not written again.
        final.update(output=output, output_sha256=hashlib.sha256(output).hexdigest())
    moved = Task.objects.filter(pk=primary.pk, settled=False).update(**final)
    if not moved:
        return False
    Job.objects.filter(pk=primary.job_id).update(items_done=F("items_done") + primary.item_count)
    # Runs nobody needs any more (a tie-break settled it while another replica still waited).
    Task.objects.filter(group=primary.pk, status=TaskStatus.QUEUED).update(
        status=TaskStatus.CANCELLED, last_error="group settled without it"
    )
    if Task.objects.filter(job_id=primary.job_id, role=TaskRole.PRIMARY, settled=False).exists():
        return False
    finished = Job.objects.filter(pk=primary.job_id, status__in=JOB_ACTIVE).update(
        status=JobStatus.SUCCEEDED, finished_at=now
    )
    if finished:
        job_escrow_release(job_id=primary.job_id)
    return bool(finished)


def _largest_agreeing(runs: list[Task]) -> list[Task]:
    """The biggest set of runs that agree with its first member (earliest first)."""
    best: list[Task] = []
    for anchor in runs:
        assert anchor.output is not None
        cluster = [anchor] + [
            run for run in runs if run is not anchor and _agree(run, bytes(anchor.output))[0]
        ]
        if len(cluster) > len(best):
            best = cluster
    return best


def group_settle(*, group: uuid.UUID, now: datetime) -> bool:
    """Judge a group once its runs are in. Needs the job row locked. True when the job finished.

    A single run (no check asked or sampled) is accepted unchecked. Otherwise the group needs a
    quorum: two runs from different hosts that agree. Without one, a tie-break run on a trusted host
    is added — and since a trusted host may have turned, its run must itself agree with another to
    count. Runs outside the quorum fail; their hosts get strikes. Past MAX_RUNS the task fails.
    """
    runs = list(
        Task.objects.filter(group=group).exclude(status=TaskStatus.CANCELLED).order_by("completed_at")
    )
    primary = next(run for run in runs if run.role == TaskRole.PRIMARY)
    done = [run for run in runs if run.status == TaskStatus.SUCCEEDED]
    if primary.settled:
        # A straggler after the group settled: judge it against the final output, nothing else changes.
        assert primary.output is not None
        for run in done:
            if run.verdict == Verdict.NONE:
                ok, reason = _agree(run, bytes(primary.output))
                run_judged(task=run, passed=ok, reason=f"against the settled result: {reason}")
        return False
    if any(run.status in (TaskStatus.QUEUED, TaskStatus.LEASED) for run in runs):
        return False
    if len(runs) == 1:
        Task.objects.filter(pk=primary.pk, verdict=Verdict.NONE).update(verdict=Verdict.UNCHECKED)
        run_pay(task_id=primary.pk)
        assert primary.output is not None
        return _settle(primary=primary, output=bytes(primary.output), now=now)
    quorum = _largest_agreeing(done)
    if len(quorum) >= 2:
        reference = quorum[0]
        assert reference.output is not None
        agreeing = {run.pk for run in quorum}
        for run in done:
            if run.verdict != Verdict.NONE:
                continue
            if run.pk in agreeing:
                run_judged(task=run, passed=True, reason=f"{len(quorum)} independent runs agree")
            else:
                _, reason = _agree(run, bytes(reference.output))
                run_judged(task=run, passed=False, reason=f"against {len(quorum)} agreeing runs: {reason}")
        return _settle(primary=primary, output=bytes(reference.output), now=now)
    if len(runs) >= MAX_RUNS:
        from marketplace.jobs.services import job_fail

        job_fail(
            job_id=primary.job_id, reason=f"task {primary.index}: {len(runs)} runs and no two agree", now=now
        )
        return False
    # No two agree yet: one more run, on a trusted host.
    first = done[0]
    assert first.output is not None
    tiebreak = replicas_build(primary=primary, count=1)[0]
    tiebreak.needs_trusted = True
    tiebreak.last_error = next(_agree(run, bytes(first.output))[1] for run in done[1:])
    tiebreak.save(force_insert=True)
    return False


def host_unchecked_results_recheck(*, host_id: uuid.UUID) -> int:
    """A host just got a strike: whatever it delivered unchecked to jobs still running is suspect.
    Those results go back to unsettled with one more run elsewhere, so the buyer gets them only once
    two hosts agree. Finished jobs keep theirs (already delivered). Returns how many were reopened."""
    suspect = Task.objects.filter(
        completed_by_id=host_id, role=TaskRole.PRIMARY, settled=True, verdict=Verdict.UNCHECKED,
        job__status__in=JOB_ACTIVE,
    ).select_related("job")  # fmt: skip
    reopened = 0
    for primary in suspect:
        Job.objects.select_for_update().filter(pk=primary.job_id).first()
        if not Task.objects.filter(pk=primary.pk, settled=True).update(settled=False, verdict=Verdict.NONE):
            continue
        Job.objects.filter(pk=primary.job_id).update(items_done=F("items_done") - primary.item_count)
        replicas_build(primary=primary, count=1)[0].save(force_insert=True)
        reopened += 1
    return reopened
