"""The double-entry ledger: accounts, row locks and the one way to post money.

Every movement is a `LedgerTransaction` whose entries sum to zero, posted by
`ledger_post` with an idempotency key (posting the same key twice returns the
first transaction and changes nothing). PostgreSQL also enforces the zero sum
with a deferred constraint trigger (migration 0002).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F

from marketplace.accounts.models import User
from marketplace.billing.models import Account, Entry, JobEscrow, LedgerTransaction

# Balances that are somebody's money: they can never go below zero.
NON_NEGATIVE_KINDS = frozenset(
    {
        Account.Kind.BUYER_CREDIT,
        Account.Kind.BUYER_ESCROW,
        Account.Kind.HOST_PENDING,
        Account.Kind.HOST_AVAILABLE,
        Account.Kind.PAYOUTS_IN_TRANSIT,
    }
)
PLATFORM_KINDS = frozenset(
    {Account.Kind.PLATFORM_FEES, Account.Kind.STRIPE_CLEARING, Account.Kind.PAYOUTS_IN_TRANSIT}
)


class LedgerError(ValueError):
    """A transaction that must not be posted (unbalanced, empty, mixed currencies)."""


class NegativeBalance(LedgerError):
    def __init__(self, account: Account, balance_after: int) -> None:
        super().__init__(f"{account} would go to {balance_after}")
        self.account = account
        self.balance_after = balance_after


def account_get(*, kind: str, owner: User | None = None, currency: str | None = None) -> Account:
    """The account of `kind` for `owner` (None: the platform's), created on first use."""
    currency = (currency or settings.HEARTH_CURRENCY).lower()
    if (kind in PLATFORM_KINDS) != (owner is None):
        raise LedgerError(f"{kind} accounts {'belong to the platform' if owner is None else 'need an owner'}")
    lookup = {"kind": kind, "currency": currency}
    found = Account.objects.filter(owner=owner, **lookup).first()
    if found is not None:
        return found
    try:
        with transaction.atomic():
            return Account.objects.create(owner=owner, **lookup)
    except IntegrityError:
        # Someone else created it between our read and our insert.
        return Account.objects.get(owner=owner, **lookup)


def accounts_lock(accounts: Iterable[Account]) -> dict[int, Account]:
    """Lock the accounts' rows in id order (one global order, so no deadlocks); fresh copies by id.

    Must run inside a transaction. Every service that reads a balance to decide an
    amount locks all the accounts it will post to with this, before reading.
    """
    ids = sorted({a.pk for a in accounts})
    locked = {a.pk: a for a in Account.objects.select_for_update().filter(pk__in=ids).order_by("pk")}
    if len(locked) != len(ids):
        raise LedgerError("an account of this transaction does not exist")
    return locked


def ledger_post(
    *,
    kind: str,
    idempotency_key: str,
    legs: Sequence[tuple[Account, int]],
    memo: str = "",
    job_id: str = "",
    task_id: str = "",
    run_id: str = "",
    host_id: str = "",
    stripe_id: str = "",
    related: LedgerTransaction | None = None,
) -> LedgerTransaction:
    """Post one balanced transaction, or return the one already posted under `idempotency_key`.

    Each leg is (account, signed minor units); legs on one account are summed. Raises
    LedgerError when the legs do not sum to zero or mix currencies, NegativeBalance when
    a non-negative account would go below zero (nothing is posted then). Locks the
    accounts (id order) for the rest of the caller's transaction.
    """
    if not idempotency_key:
        raise LedgerError("a ledger transaction needs an idempotency key")
    deltas: dict[int, int] = {}
    by_id: dict[int, Account] = {}
    for account, amount in legs:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise LedgerError(f"amounts are integer minor units, got {amount!r}")
        deltas[account.pk] = deltas.get(account.pk, 0) + amount
        by_id[account.pk] = account
    deltas = {pk: amount for pk, amount in deltas.items() if amount}
    if not deltas:
        raise LedgerError("a ledger transaction needs at least one non-zero leg")
    if sum(deltas.values()) != 0:
        raise LedgerError(f"legs sum to {sum(deltas.values())}, not 0")
    if len({a.currency for a in by_id.values()}) != 1:
        raise LedgerError("a ledger transaction cannot mix currencies")

    with transaction.atomic():
        locked = accounts_lock(by_id[pk] for pk in deltas)
        # Checked after the locks: a concurrent poster of the same key has committed by now.
        existing = LedgerTransaction.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
        for pk, amount in deltas.items():
            after = locked[pk].balance + amount
            if after < 0 and locked[pk].kind in NON_NEGATIVE_KINDS:
                raise NegativeBalance(locked[pk], after)
        posted = LedgerTransaction.objects.create(
            kind=kind,
            idempotency_key=idempotency_key,
            memo=memo[:300],
            job_id=job_id,
            task_id=task_id,
            run_id=run_id,
            host_id=host_id,
            stripe_id=stripe_id,
            related=related,
        )
        Entry.objects.bulk_create(
            Entry(transaction=posted, account_id=pk, amount=amount) for pk, amount in sorted(deltas.items())
        )
        for pk, amount in deltas.items():
            account = locked[pk]
            account.balance += amount
            account.save(update_fields=["balance"])
            if job_id and account.kind == Account.Kind.BUYER_ESCROW:
                _job_escrow_add(account, job_id, amount)
        return posted


def _job_escrow_add(account: Account, job_id: str, amount: int) -> None:
    """Keep `JobEscrow` equal to the job's entries on `account`, whose row the caller has locked: no
    other poster on it runs meanwhile, so the row cannot appear between the update and the insert."""
    if not JobEscrow.objects.filter(account=account, job_id=job_id).update(left=F("left") + amount):
        JobEscrow.objects.create(account=account, job_id=job_id, left=amount)


def job_escrow_left(account: Account, job_id: str) -> int:
    """What the job's escrow on `account` (its buyer's escrow) holds now: one row, however many
    runs the job has paid."""
    found = JobEscrow.objects.filter(account=account, job_id=job_id).values_list("left", flat=True)
    return next(iter(found), 0)
