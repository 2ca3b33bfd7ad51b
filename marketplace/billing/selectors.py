"""Reads for money: balances, payouts and statements, all computed from the ledger."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import TruncDate, TruncMonth

from marketplace.accounts.models import User
from marketplace.billing.models import Account, Entry, LedgerTransaction, Payout, TopUp

K = Account.Kind
T = LedgerTransaction.Kind


def balances_for_user(*, user: User) -> dict[str, Any]:
    """The user's balance per account kind (0 for kinds never used), minor units."""
    rows = dict(
        Account.objects.filter(owner=user, currency=settings.HEARTH_CURRENCY).values_list("kind", "balance")
    )
    kinds = (K.BUYER_CREDIT, K.BUYER_ESCROW, K.HOST_PENDING, K.HOST_AVAILABLE)
    in_transit = (
        Payout.objects.filter(owner=user, status=Payout.Status.PENDING).aggregate(s=Sum("amount_minor"))["s"]
        or 0
    )
    return {
        "currency": settings.HEARTH_CURRENCY,
        **{f"{kind}_minor": rows.get(kind, 0) for kind in kinds},
        "payouts_in_transit_minor": in_transit,
    }


def topup_list_for_user(*, user: User) -> QuerySet[TopUp]:
    return TopUp.objects.filter(user=user)


def payout_list_for_owner(*, owner: User) -> QuerySet[Payout]:
    return Payout.objects.filter(owner=owner)


def _sums(entries: QuerySet[Entry], bucket: Any) -> dict[tuple[Any, str], int]:
    """Σ amount per (bucket, transaction kind)."""
    rows = entries.annotate(bucket=bucket).values("bucket", "transaction__kind").annotate(total=Sum("amount"))
    return {(r["bucket"], r["transaction__kind"]): int(r["total"]) for r in rows}


def job_cost(*, job_id: str, buyer_id: int) -> dict[str, Any]:
    """What a job cost its buyer, from the ledger: held at submit, charged for accepted runs (less
    payments reversed for runs found wrong), released unused, still held."""
    rows = (
        Entry.objects.filter(
            transaction__job_id=str(job_id),
            account__owner_id=buyer_id,
            account__kind__in=[K.BUYER_ESCROW, K.BUYER_CREDIT],
        )
        .values("account__kind", "transaction__kind")
        .annotate(total=Sum("amount"))
    )
    sums = {(r["account__kind"], r["transaction__kind"]): int(r["total"]) for r in rows}
    captured = -sums.get((K.BUYER_ESCROW, T.CAPTURE), 0)
    reversed_ = sums.get((K.BUYER_CREDIT, T.CLAWBACK), 0)
    held = sums.get((K.BUYER_ESCROW, T.HOLD), 0)
    released = -sums.get((K.BUYER_ESCROW, T.RELEASE), 0)
    return {
        "currency": settings.HEARTH_CURRENCY,
        "held_minor": held,
        "charged_minor": captured - reversed_,
        "reversed_minor": reversed_,
        "released_minor": released,
        "in_escrow_minor": held - captured - released,
    }


def usage_by_job(*, buyer: User) -> list[dict[str, Any]]:
    """Per job: escrow held, spent on accepted runs (less payments reversed for runs found wrong),
    released unused (newest job first)."""
    escrow = Entry.objects.filter(
        account__owner=buyer, account__kind=K.BUYER_ESCROW, account__currency=settings.HEARTH_CURRENCY
    )
    rows = (
        escrow.values("transaction__job_id", "transaction__kind")
        .annotate(total=Sum("amount"))
        .order_by("transaction__job_id")
    )
    jobs: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        jobs[row["transaction__job_id"]][row["transaction__kind"]] += int(row["total"])
    reversed_ = dict(
        Entry.objects.filter(
            account__owner=buyer, account__kind=K.BUYER_CREDIT, transaction__kind=T.CLAWBACK,
            account__currency=settings.HEARTH_CURRENCY,
        )
        .values("transaction__job_id")
        .annotate(total=Sum("amount"))
        .values_list("transaction__job_id", "total")
    )  # fmt: skip
    first_seen = dict(
        escrow.filter(transaction__kind=T.HOLD).values_list("transaction__job_id", "transaction__created_at")
    )
    result = [
        {
            "job_id": job_id,
            "held_at": first_seen.get(job_id),
            "held_minor": kinds[T.HOLD],
            "spent_minor": -kinds[T.CAPTURE] - int(reversed_.get(job_id) or 0),
            "reversed_minor": int(reversed_.get(job_id) or 0),
            "released_minor": -kinds[T.RELEASE],
            "in_escrow_minor": sum(kinds.values()),
            "currency": settings.HEARTH_CURRENCY,
        }
        for job_id, kinds in jobs.items()
    ]
    result.sort(key=lambda r: (r["held_at"] is not None, r["held_at"]), reverse=True)
    return result


def usage_by_month(*, buyer: User) -> list[dict[str, Any]]:
    """Per calendar month (UTC): credit bought, granted, refunded, spent on accepted runs (less
    payments reversed for runs found wrong)."""
    credit = _sums(
        Entry.objects.filter(
            account__owner=buyer, account__kind=K.BUYER_CREDIT, account__currency=settings.HEARTH_CURRENCY
        ),
        TruncMonth("transaction__created_at"),
    )
    escrow = _sums(
        Entry.objects.filter(
            account__owner=buyer, account__kind=K.BUYER_ESCROW, account__currency=settings.HEARTH_CURRENCY
        ),
        TruncMonth("transaction__created_at"),
    )
    months = sorted({m for m, _ in credit} | {m for m, _ in escrow}, reverse=True)
    return [
        {
            "month": month.strftime("%Y-%m"),
            "topped_up_minor": credit.get((month, T.TOPUP), 0),
            "granted_minor": credit.get((month, T.GRANT), 0),
            "refunded_minor": -credit.get((month, T.REFUND), 0),
            "spent_minor": -escrow.get((month, T.CAPTURE), 0) - credit.get((month, T.CLAWBACK), 0),
            "currency": settings.HEARTH_CURRENCY,
        }
        for month in months
    ]


def earnings_by_day(*, owner: User) -> list[dict[str, Any]]:
    """Per day (UTC): earned on verified runs (after fees), matured to available, paid out."""
    pending = _sums(
        Entry.objects.filter(
            account__owner=owner, account__kind=K.HOST_PENDING, account__currency=settings.HEARTH_CURRENCY
        ),
        TruncDate("transaction__created_at"),
    )
    available = _sums(
        Entry.objects.filter(
            account__owner=owner, account__kind=K.HOST_AVAILABLE, account__currency=settings.HEARTH_CURRENCY
        ),
        TruncDate("transaction__created_at"),
    )
    days = sorted({d for d, _ in pending} | {d for d, _ in available}, reverse=True)
    return [
        {
            "day": day.isoformat(),
            "earned_minor": pending.get((day, T.CAPTURE), 0) + pending.get((day, T.PLATFORM_RUN), 0),
            "clawed_back_minor": -pending.get((day, T.CLAWBACK), 0),
            "matured_minor": available.get((day, T.MATURE), 0),
            "paid_out_minor": -(
                available.get((day, T.PAYOUT_START), 0) + available.get((day, T.PAYOUT_REVERSE), 0)
            ),
            "currency": settings.HEARTH_CURRENCY,
        }
        for day in days
    ]


def earnings_by_machine(*, owner: User, host_names: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per machine (the ledger keeps host ids, `host_names` names them): runs paid, earned after fees,
    clawed back for runs found wrong. Most earned first."""
    rows = (
        Entry.objects.filter(
            account__owner=owner, account__kind=K.HOST_PENDING, account__currency=settings.HEARTH_CURRENCY,
            transaction__kind__in=[T.CAPTURE, T.PLATFORM_RUN, T.CLAWBACK],
        )
        .values("transaction__host_id", "transaction__kind")
        .annotate(total=Sum("amount"), runs=Count("id"))
    )  # fmt: skip
    machines: dict[str, dict[str, Any]] = {}
    for row in rows:
        host_id = row["transaction__host_id"]
        machine = machines.setdefault(
            host_id,
            {
                "host_id": host_id,
                "name": host_names.get(host_id, "(removed machine)"),
                "runs_paid": 0,
                "earned_minor": 0,
                "clawed_back_minor": 0,
                "currency": settings.HEARTH_CURRENCY,
            },
        )
        if row["transaction__kind"] == T.CLAWBACK:
            machine["clawed_back_minor"] -= int(row["total"])
        else:
            machine["earned_minor"] += int(row["total"])
            machine["runs_paid"] += int(row["runs"])
    return sorted(machines.values(), key=lambda m: (-m["earned_minor"], m["name"]))
