"""What runs cost and who pays for them.

A job's price is per 1,000 items per run, in integer minor units. At submit the buyer's
worst case is held in escrow: every run planned then (the tasks, and the replicas its
verification level asks for) at the job's max price. A host leases a run at its own price,
which must be at most the job's max; the run carries that price from then on.

A run is paid when it is accepted: it agreed with an independent run, or (verification
`none`, or a spot check that did not sample it) it was accepted unchecked. Runs the buyer
planned are paid from the job's escrow; checks the platform adds (tie-breaks, re-runs of a
struck host's work) and runs accepted after the escrow was released are paid by the
platform. Known-answer tasks are never paid: they are the host's test. A paid run later
found wrong has its payment reversed.

Fractions of a minor unit are carried, not lost or rounded up: on each (job, host, payer)
the k-th paid run is paid floor(Σ₁..ₖ items × price / 1000) - floor(Σ₁..ₖ₋₁ / 1000), so the
host is paid exactly floor(Σ items × price / 1000) for its runs of the job, which is never
more than the hold.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable

from django.db.models import F, Sum

from marketplace.billing.errors import EscrowExhausted
from marketplace.billing.services import (
    escrow_capture,
    escrow_release,
    platform_run_pay,
    run_payment_reverse,
)
from marketplace.hosts.models import Host
from marketplace.jobs.models import Job, Task, TaskRole

logger = logging.getLogger(__name__)


def run_cost_milli(*, items: int, price_per_1k_minor: int) -> int:
    """A run's cost in thousandths of a minor unit (exact)."""
    return items * price_per_1k_minor


def escrow_worst_case(*, item_counts: Iterable[int], max_price_per_1k_minor: int) -> int:
    """What to hold for runs of these sizes at the max price: the exact cost, rounded up."""
    return math.ceil(sum(item_counts) * max_price_per_1k_minor / 1000) if max_price_per_1k_minor else 0


def _carried_amount(*, task: Task, host_id: uuid.UUID, by_buyer: bool) -> int:
    """This run's share of floor(Σ cost / 1000) on its (job, host, payer), given the runs paid before."""
    before = Task.objects.filter(
        job_id=task.job_id, completed_by_id=host_id, paid_minor__isnull=False, paid_by_buyer=by_buyer
    ).aggregate(milli=Sum(F("item_count") * F("price_per_1k_minor")))["milli"]
    prior = int(before or 0)
    mine = run_cost_milli(items=task.item_count, price_per_1k_minor=task.price_per_1k_minor or 0)
    return (prior + mine) // 1000 - prior // 1000


def run_pay(*, task_id: uuid.UUID) -> int:
    """Pay the host of an accepted run; the minor units it cost (0 for canaries and repeat calls).

    Needs the job row locked (the carry reads the runs paid before). Idempotent per run.
    """
    task = Task.objects.select_related("job__buyer").get(pk=task_id)
    if task.role == TaskRole.CANARY or task.completed_by_id is None or task.paid_minor is not None:
        return 0
    host = Host.objects.select_related("owner").get(pk=task.completed_by_id)
    by_buyer = task.billable
    amount = _carried_amount(task=task, host_id=host.pk, by_buyer=by_buyer)
    if by_buyer:
        try:
            escrow_capture(
                run_id=task.pk, job_id=task.job_id, buyer=task.job.buyer,
                host_owner=host.owner, host_id=host.pk, amount_minor=amount,
            )  # fmt: skip
        except EscrowExhausted as exc:
            # Accepted after the job ended and its escrow went back: the platform pays the host.
            logger.info("run %s: %s; the platform pays it", task.pk, exc)
            by_buyer = False
            amount = _carried_amount(task=task, host_id=host.pk, by_buyer=False)
    if not by_buyer:
        platform_run_pay(
            run_id=task.pk, job_id=task.job_id, host_owner=host.owner, host_id=host.pk, amount_minor=amount
        )
    Task.objects.filter(pk=task.pk, paid_minor__isnull=True).update(paid_minor=amount, paid_by_buyer=by_buyer)
    return amount


def run_unpay(*, task_id: uuid.UUID, reason: str) -> int:
    """A paid run was found wrong: reverse its payment (the buyer's part back to credit)."""
    task = Task.objects.select_related("job__buyer").get(pk=task_id)
    if task.paid_minor is None:
        return 0
    return run_payment_reverse(run_id=task.pk, buyer=task.job.buyer, reason=reason)


def job_escrow_release(*, job_id: uuid.UUID) -> int:
    """The job has ended (succeeded, failed or cancelled): give back what its escrow still holds."""
    job = Job.objects.select_related("buyer").get(pk=job_id)
    return escrow_release(job_id=job.pk, buyer=job.buyer)
