"""Celery tasks for money: thin, idempotent wrappers (they take ids and times, never objects)."""

from __future__ import annotations

from collections.abc import Iterable

from celery import shared_task
from django.utils import timezone

from marketplace.billing.services import earnings_mature, payouts_run


@shared_task(name="marketplace.billing.tasks.payouts_run", ignore_result=True)
def payouts_run_task() -> int:
    """Open and send due payouts; a payout whose Stripe call timed out is re-sent with its own key."""
    return payouts_run(now=timezone.now())


@shared_task(name="marketplace.billing.tasks.earnings_mature", ignore_result=True)
def earnings_mature_task(withheld_owner_ids: Iterable[int] = ()) -> int:
    """Move earnings past the verification window to available, except the withheld owners'."""
    return earnings_mature(now=timezone.now(), withheld_owner_ids=frozenset(withheld_owner_ids))
