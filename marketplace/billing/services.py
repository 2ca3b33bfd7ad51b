"""Writes for money: escrow for jobs, Stripe top-ups and refunds, Connect onboarding, payouts.

Every movement goes through `ledger.ledger_post` with an idempotency key derived
from what it is about (a job, a run, a Checkout Session, a Stripe refund, a
payout), so calling any of these twice changes nothing the second time. Stripe
is always called outside database transactions, and what Stripe says is
re-fetched from Stripe rather than read from a webhook body.

Calls the other apps make:
  job submit        escrow_hold(job_id=…, buyer=…, amount_minor=worst case)  → InsufficientCredit (402)
  task verified     escrow_capture(run_id=…, job_id=…, buyer=…, host_owner=…, host_id=…, amount_minor=…)
  job finished/cancelled  escrow_release(job_id=…, buyer=…)
  a check the platform added  platform_run_pay(run_id=…, job_id=…, host_owner=…, host_id=…, amount_minor=…)
  a paid run found wrong      run_payment_reverse(run_id=…, buyer=…)
  signup / operator           credit_grant(user=…, amount_minor=…, key=…, memo=…)
  periodic          earnings_mature(now=…, withheld_owner_ids=quarantined owners); payouts_run(now=…)
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

import stripe
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from marketplace.accounts.models import User
from marketplace.billing.errors import EscrowExhausted, InsufficientCredit, StripeUnavailable
from marketplace.billing.ledger import account_get, accounts_lock, job_escrow_left, ledger_post
from marketplace.billing.models import (
    Account,
    ConnectAccount,
    Entry,
    LedgerTransaction,
    Payout,
    StripeEvent,
    TopUp,
)
from marketplace.billing.stripe_api import is_retryable, stripe_client

logger = logging.getLogger(__name__)

K = Account.Kind
T = LedgerTransaction.Kind

__all__ = [
    "EscrowExhausted",
    "InsufficientCredit",
    "credit_balance",
    "credit_grant",
    "earnings_mature",
    "escrow_capture",
    "escrow_hold",
    "escrow_release",
    "fee_split",
    "payouts_run",
    "platform_run_pay",
    "run_payment_reverse",
]


def _positive_amount(amount_minor: int, *, field: str = "amount_minor") -> int:
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int) or amount_minor <= 0:
        raise ValidationError({field: [f"{field} must be a positive integer of minor units"]})
    return amount_minor


# ---- escrow: the calls jobs make ------------------------------------------


def credit_balance(user: User) -> int:
    """The user's spendable credit in minor units of HEARTH_CURRENCY (0 before the first top-up)."""
    balance = (
        Account.objects.filter(kind=K.BUYER_CREDIT, owner=user, currency=settings.HEARTH_CURRENCY)
        .values_list("balance", flat=True)
        .first()
    )
    return balance or 0


def fee_split(amount_minor: int, fee_bps: int) -> tuple[int, int]:
    """(platform fee, host share) of a capture.

    The fee is rounded down to a whole minor unit and the host gets the rest, so
    the remainder of the integer division always goes to the host and the two
    parts always add up to the amount exactly.
    """
    fee = amount_minor * fee_bps // 10_000
    return fee, amount_minor - fee


@transaction.atomic
def escrow_hold(*, job_id: str | uuid.UUID, buyer: User, amount_minor: int) -> None:
    """Move `amount_minor` (the job's worst case) from the buyer's credit to escrow for the job.

    Raises InsufficientCredit(shortfall_minor) when the credit does not cover it; nothing
    is held then. One hold per job: calling it again for the same job does nothing.
    Call it inside job submit's transaction so a refused job stores nothing.
    """
    _positive_amount(amount_minor)
    job = str(job_id)
    credit = account_get(kind=K.BUYER_CREDIT, owner=buyer)
    escrow = account_get(kind=K.BUYER_ESCROW, owner=buyer)
    locked = accounts_lock([credit, escrow])
    key = f"hold:{job}"
    if LedgerTransaction.objects.filter(idempotency_key=key).exists():
        return
    available = locked[credit.pk].balance
    if available < amount_minor:
        raise InsufficientCredit(amount_minor - available, credit.currency)
    ledger_post(
        kind=T.HOLD,
        idempotency_key=key,
        legs=[(credit, -amount_minor), (escrow, amount_minor)],
        job_id=job,
        memo=f"escrow for job {job}",
    )


@transaction.atomic
def escrow_capture(
    *,
    run_id: str | uuid.UUID,
    job_id: str | uuid.UUID,
    buyer: User,
    host_owner: User,
    host_id: str | uuid.UUID,
    amount_minor: int,
) -> None:
    """Pay a verified run: the job's escrow → the host owner's pending earnings + the platform fee.

    Idempotent per `run_id` (one verified execution of a task on one host): a run paid
    once is never paid again, whatever the arguments of later calls. The split is
    `fee_split(amount, HEARTH_PLATFORM_FEE_BPS)`. A zero amount does nothing. Raises
    EscrowExhausted when the job's escrow left is smaller than the amount.
    """
    if amount_minor == 0:
        return
    _positive_amount(amount_minor)
    job, run = str(job_id), str(run_id)
    escrow = account_get(kind=K.BUYER_ESCROW, owner=buyer)
    pending = account_get(kind=K.HOST_PENDING, owner=host_owner)
    fees = account_get(kind=K.PLATFORM_FEES)
    accounts_lock([escrow, pending, fees])
    key = f"capture:{run}"
    if LedgerTransaction.objects.filter(idempotency_key=key).exists():
        return
    left = job_escrow_left(escrow, job)
    if left < amount_minor:
        raise EscrowExhausted(job, amount_minor, left)
    fee, host_share = fee_split(amount_minor, settings.HEARTH_PLATFORM_FEE_BPS)
    ledger_post(
        kind=T.CAPTURE,
        idempotency_key=key,
        legs=[(escrow, -amount_minor), (pending, host_share), (fees, fee)],
        job_id=job,
        run_id=run,
        host_id=str(host_id),
        memo=f"run {run} of job {job}",
    )


@transaction.atomic
def platform_run_pay(
    *,
    run_id: str | uuid.UUID,
    job_id: str | uuid.UUID,
    host_owner: User,
    host_id: str | uuid.UUID,
    amount_minor: int,
) -> None:
    """Pay a verified run the buyer does not pay for (a check the platform added, or one that
    finished after the job's escrow was released): the host's share of `amount_minor`, from the
    platform's fees. Idempotent per `run_id`; a zero share does nothing."""
    _, host_share = fee_split(amount_minor, settings.HEARTH_PLATFORM_FEE_BPS)
    if host_share == 0:
        return
    _positive_amount(host_share)
    job, run = str(job_id), str(run_id)
    ledger_post(
        kind=T.PLATFORM_RUN,
        idempotency_key=f"platform-run:{run}",
        legs=[
            (account_get(kind=K.PLATFORM_FEES), -host_share),
            (account_get(kind=K.HOST_PENDING, owner=host_owner), host_share),
        ],
        job_id=job,
        run_id=run,
        host_id=str(host_id),
        memo=f"run {run} of job {job}, a check paid by the platform",
    )


@transaction.atomic
def run_payment_reverse(*, run_id: str | uuid.UUID, buyer: User, reason: str = "") -> int:
    """Undo what a run was paid once it is found wrong: the buyer gets back (to credit) what it paid,
    the platform its fee and anything it paid, taken from the host's pending earnings. What the host
    no longer has pending (matured or paid out) the platform absorbs. Idempotent per run; returns
    the minor units taken back from the host."""
    run = str(run_id)
    paid = (
        LedgerTransaction.objects.filter(idempotency_key__in=[f"capture:{run}", f"platform-run:{run}"])
        .prefetch_related("entries__account")
        .first()
    )
    if paid is None:
        return 0
    key = f"clawback:{run}"
    pending_entry = next(e for e in paid.entries.all() if e.account.kind == K.HOST_PENDING)
    pending = pending_entry.account
    fees = account_get(kind=K.PLATFORM_FEES, currency=pending.currency)
    credit = account_get(kind=K.BUYER_CREDIT, owner=buyer, currency=pending.currency)
    locked = accounts_lock([pending, fees, credit])
    if LedgerTransaction.objects.filter(idempotency_key=key).exists():
        return 0
    # A share that has matured is no longer pending: taking it from the pending balance would take
    # other runs' shares, which then could not mature. The platform absorbs it.
    matured = paid.followers.filter(kind=T.MATURE).exists()
    taken = 0 if matured else min(pending_entry.amount, locked[pending.pk].balance)
    buyer_paid = -sum(e.amount for e in paid.entries.all() if e.account.kind == K.BUYER_ESCROW)
    legs = [(pending, -taken), (credit, buyer_paid), (fees, taken - buyer_paid)]
    if not any(amount for _, amount in legs):
        return 0
    ledger_post(
        kind=T.CLAWBACK,
        idempotency_key=key,
        legs=legs,
        related=paid,
        job_id=paid.job_id,
        run_id=run,
        host_id=paid.host_id,
        memo=(f"run {run} found wrong" + (f": {reason}" if reason else ""))[:300],
    )
    return taken


@transaction.atomic
def credit_grant(*, user: User, amount_minor: int, key: str, memo: str) -> None:
    """Give `user` credit paid by the platform (sign-up credit, an operator's goodwill).
    Idempotent per `key`."""
    _positive_amount(amount_minor)
    ledger_post(
        kind=T.GRANT,
        idempotency_key=f"grant:{key}",
        legs=[
            (account_get(kind=K.PLATFORM_FEES), -amount_minor),
            (account_get(kind=K.BUYER_CREDIT, owner=user), amount_minor),
        ],
        memo=memo,
    )


@transaction.atomic
def escrow_release(*, job_id: str | uuid.UUID, buyer: User) -> int:
    """Return whatever escrow the job still holds to the buyer's credit; the minor units returned.

    Call when the job finishes, fails or is cancelled. Idempotent: a second call finds
    nothing left and returns 0. A capture after the release raises EscrowExhausted.
    """
    job = str(job_id)
    credit = account_get(kind=K.BUYER_CREDIT, owner=buyer)
    escrow = account_get(kind=K.BUYER_ESCROW, owner=buyer)
    accounts_lock([credit, escrow])
    left = job_escrow_left(escrow, job)
    if left <= 0:
        return 0
    ledger_post(
        kind=T.RELEASE,
        idempotency_key=f"release:{job}",
        legs=[(escrow, -left), (credit, left)],
        job_id=job,
        memo=f"unused escrow of job {job}",
    )
    return left


def earnings_mature(*, now: datetime, withheld_owner_ids: Collection[int] = frozenset()) -> int:
    """Move each run's host share (paid by the buyer, or by the platform for a check it added) older
    than HEARTH_EARNINGS_HOLD_S from pending to available. A share clawed back first (the run was
    found wrong) never matures: the clawback took all of it, since an unmatured share is still in
    the pending balance it takes from.

    Owners in `withheld_owner_ids` (e.g. owners of quarantined hosts) are skipped; their
    earnings stay pending until a later run without them. Returns the minor units moved.
    Idempotent per share; safe to run concurrently.
    """
    cutoff = now - timedelta(seconds=settings.HEARTH_EARNINGS_HOLD_S)
    ended = (T.MATURE, T.CLAWBACK)
    due = (
        Entry.objects.filter(
            account__kind=K.HOST_PENDING,
            amount__gt=0,
            transaction__kind__in=(T.CAPTURE, T.PLATFORM_RUN),
            transaction__created_at__lte=cutoff,
        )
        .exclude(account__owner_id__in=list(withheld_owner_ids))
        .exclude(transaction__followers__kind__in=ended)
        .select_related("account__owner", "transaction")
        .order_by("id")
    )
    moved = 0
    for entry in due.iterator(chunk_size=500):
        owner = entry.account.owner
        assert owner is not None
        with transaction.atomic():
            available = account_get(kind=K.HOST_AVAILABLE, owner=owner, currency=entry.account.currency)
            accounts_lock([entry.account, available])
            # Matured, or clawed back, since the query read it (both lock the pending account).
            if entry.transaction.followers.filter(kind__in=ended).exists():
                continue
            ledger_post(
                kind=T.MATURE,
                idempotency_key=f"mature:{entry.transaction_id}",
                legs=[(entry.account, -entry.amount), (available, entry.amount)],
                related=entry.transaction,
                job_id=entry.transaction.job_id,
                run_id=entry.transaction.run_id,
                host_id=entry.transaction.host_id,
            )
            moved += entry.amount
    return moved


# ---- top-ups: Stripe Checkout ---------------------------------------------


def check_topup_amount(amount: Any) -> int:
    """The amount of a top-up request, or ValidationError naming `amount_minor`."""
    low, high = settings.HEARTH_TOPUP_MIN_MINOR, settings.HEARTH_TOPUP_MAX_MINOR
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ValidationError({"amount_minor": ["amount_minor must be an integer of minor units (cents)"]})
    if not low <= amount <= high:
        raise ValidationError({"amount_minor": [f"amount_minor must be between {low} and {high}"]})
    return amount


def topup_create(*, user: User, amount_minor: int) -> TopUp:
    """Open a Stripe Checkout Session for `amount_minor` of credit; the row is stored first.

    Raises StripeUnavailable when Stripe refuses or cannot be reached (the row is
    marked failed). Credit arrives later, from the webhook.
    """
    amount = check_topup_amount(amount_minor)
    topup = TopUp.objects.create(user=user, amount_minor=amount, currency=settings.HEARTH_CURRENCY)
    base = settings.HEARTH_PUBLIC_URL.rstrip("/")
    metadata = {"hearth_user_id": str(user.pk), "hearth_topup": str(topup.key)}
    try:
        session = stripe_client().v1.checkout.sessions.create(
            params={
                "mode": "payment",
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {
                            "currency": topup.currency,
                            "unit_amount": amount,
                            "product_data": {"name": "Hearth credit"},
                        },
                    }
                ],
                "client_reference_id": str(user.pk),
                "customer_email": user.email,
                "metadata": metadata,
                "payment_intent_data": {"metadata": metadata},
                "success_url": f"{base}/dashboard/?topup=success&session_id={{CHECKOUT_SESSION_ID}}",
                "cancel_url": f"{base}/dashboard/?topup=cancelled",
            },
            options={"idempotency_key": f"hearth-topup-{topup.key}"},
        )
    except stripe.StripeError as exc:
        TopUp.objects.filter(pk=topup.pk).update(status=TopUp.Status.FAILED)
        logger.warning("top-up %s: Stripe refused the Checkout Session: %s", topup.pk, exc)
        raise StripeUnavailable("the payment provider is unavailable; nothing was charged") from exc
    TopUp.objects.filter(pk=topup.pk).update(
        session_id=session.id, checkout_url=session.url or "", status=TopUp.Status.OPEN
    )
    topup.refresh_from_db()
    return topup


def _stripe_id(value: Any) -> str:
    """An expandable Stripe field as its id (it may be an id or an expanded object)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value.id)


def topup_sync(*, session_id: str) -> None:
    """Bring one top-up in line with Stripe: credit it once when paid, post its refunds.

    Everything is re-fetched from Stripe; the event that caused the call is not trusted.
    Idempotent, and the result does not depend on the order of the calls.
    """
    client = stripe_client()
    session = client.v1.checkout.sessions.retrieve(session_id)
    topup = TopUp.objects.filter(session_id=session.id).select_related("user").first()
    if topup is None:
        logger.warning("Checkout Session %s is not one of our top-ups; ignored", session.id)
        return
    metadata = session.metadata.to_dict() if session.metadata else {}
    if metadata.get("hearth_topup") != str(topup.key) or session.currency != topup.currency:
        logger.error("Checkout Session %s does not match top-up %s; not credited", session.id, topup.pk)
        return
    payment_intent = _stripe_id(session.payment_intent)
    if session.payment_status == "paid":
        _topup_credit(topup=topup, amount_minor=int(session.amount_total or 0), payment_intent=payment_intent)
    if payment_intent:
        refunds = client.v1.refunds.list(params={"payment_intent": payment_intent, "limit": 100})
        for refund in sorted(refunds.data, key=lambda r: (r.created, r.id)):
            if refund.status == "succeeded":
                _topup_refund(topup=topup, refund_id=refund.id, amount_minor=int(refund.amount))


@transaction.atomic
def _topup_credit(*, topup: TopUp, amount_minor: int, payment_intent: str) -> None:
    if amount_minor != topup.amount_minor:
        logger.warning("top-up %s: Stripe collected %s, asked %s", topup.pk, amount_minor, topup.amount_minor)
    posted = ledger_post(
        kind=T.TOPUP,
        idempotency_key=f"topup:{topup.session_id}",
        legs=[
            (account_get(kind=K.STRIPE_CLEARING, currency=topup.currency), -amount_minor),
            (account_get(kind=K.BUYER_CREDIT, owner=topup.user, currency=topup.currency), amount_minor),
        ],
        stripe_id=topup.session_id or "",
        memo=f"top-up {topup.pk}",
    )
    credited = sum(e.amount for e in posted.entries.all() if e.amount > 0)
    TopUp.objects.filter(pk=topup.pk).update(
        status=TopUp.Status.PAID, credited_minor=credited, payment_intent_id=payment_intent
    )


@transaction.atomic
def _topup_refund(*, topup: TopUp, refund_id: str, amount_minor: int) -> None:
    """Reverse a refunded amount out of the buyer's credit, as far as the credit goes.

    When the buyer already spent part of it (held in escrow, or captured and paid to
    hosts), that part is NOT clawed back from escrow or from hosts: the platform
    absorbs it, as a debit of platform_fees in the same transaction (visible to the
    operator as a refund whose legs include platform_fees).
    """
    clearing = account_get(kind=K.STRIPE_CLEARING, currency=topup.currency)
    credit = account_get(kind=K.BUYER_CREDIT, owner=topup.user, currency=topup.currency)
    fees = account_get(kind=K.PLATFORM_FEES, currency=topup.currency)
    locked = accounts_lock([clearing, credit, fees])
    key = f"refund:{refund_id}"
    if LedgerTransaction.objects.filter(idempotency_key=key).exists():
        return
    covered = min(amount_minor, locked[credit.pk].balance)
    ledger_post(
        kind=T.REFUND,
        idempotency_key=key,
        legs=[(clearing, amount_minor), (credit, -covered), (fees, -(amount_minor - covered))],
        stripe_id=refund_id,
        memo=f"refund of top-up {topup.pk}"
        + (
            f"; {amount_minor - covered} already spent, absorbed by the platform"
            if covered < amount_minor
            else ""
        ),
    )
    TopUp.objects.filter(pk=topup.pk).update(refunded_minor=F("refunded_minor") + amount_minor)


# ---- webhooks -----------------------------------------------------------------


class WebhookRejected(Exception):
    """The delivery is not a genuine Stripe event (bad signature or payload); answer 400."""


_TOPUP_SESSION_EVENTS = {
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
}
_REFUND_EVENTS = {"charge.refunded", "charge.refund.updated", "refund.created", "refund.updated"}


def stripe_webhook_receive(*, payload: bytes, signature: str | None) -> StripeEvent:
    """Verify one webhook delivery, record its event id, and act on it unless already done.

    Raises WebhookRejected for a forged or malformed delivery (nothing is stored). An
    exception from Stripe while acting propagates, so the delivery fails and Stripe
    retries it; the event stays unprocessed until then.
    """
    secret = settings.HEARTH_STRIPE_WEBHOOK_SECRET
    if not secret:
        raise WebhookRejected("webhooks are disabled: HEARTH_STRIPE_WEBHOOK_SECRET is not set")
    try:
        event = stripe.Webhook.construct_event(payload, signature or "", secret)
    except stripe.SignatureVerificationError as exc:
        raise WebhookRejected("invalid Stripe-Signature") from exc
    except ValueError as exc:
        raise WebhookRejected("the payload is not a Stripe event") from exc
    record, created = StripeEvent.objects.get_or_create(event_id=event.id, defaults={"type": event.type})
    if not created:
        StripeEvent.objects.filter(pk=record.pk).update(deliveries=F("deliveries") + 1)
        if record.processed_at is not None:
            return record
    stripe_event_process(event_type=event.type, object_id=str(getattr(event.data.object, "id", "")))
    StripeEvent.objects.filter(pk=record.pk, processed_at__isnull=True).update(processed_at=timezone.now())
    record.refresh_from_db()
    return record


def stripe_event_process(*, event_type: str, object_id: str) -> None:
    """Act on an event by type, using only the id of its object and fetching the rest from Stripe."""
    if event_type in _TOPUP_SESSION_EVENTS:
        topup_sync(session_id=object_id)
    elif event_type in _REFUND_EVENTS:
        client = stripe_client()
        fetched: Any = (
            client.v1.charges.retrieve(object_id)
            if event_type == "charge.refunded"
            else client.v1.refunds.retrieve(object_id)
        )
        payment_intent = _stripe_id(fetched.payment_intent)
        if not payment_intent:
            return
        sessions = client.v1.checkout.sessions.list(params={"payment_intent": payment_intent, "limit": 1})
        for session in sessions.data:
            topup_sync(session_id=session.id)
    elif event_type == "account.updated":
        connect_account_sync(stripe_account_id=object_id)
    else:
        logger.info("Stripe event %s ignored", event_type)


# ---- Connect onboarding -----------------------------------------------------


def connect_onboarding_start(*, owner: User) -> tuple[ConnectAccount, str]:
    """The owner's Express account (created once) and a fresh onboarding link's URL."""
    client = stripe_client()
    connect = ConnectAccount.objects.filter(owner=owner).first()
    if connect is None:
        try:
            created = client.v1.accounts.create(
                params={
                    "type": "express",
                    "email": owner.email,
                    "capabilities": {"transfers": {"requested": True}},
                    "metadata": {"hearth_user_id": str(owner.pk)},
                },
                # One account per owner even when two requests race (or the client retries).
                options={"idempotency_key": f"hearth-connect-{owner.pk}-{owner.date_joined.timestamp():.0f}"},
            )
        except stripe.StripeError as exc:
            raise StripeUnavailable("the payment provider is unavailable") from exc
        try:
            with transaction.atomic():
                connect = ConnectAccount.objects.create(owner=owner, stripe_account_id=created.id)
        except IntegrityError:
            connect = ConnectAccount.objects.get(owner=owner)
    base = settings.HEARTH_PUBLIC_URL.rstrip("/")
    try:
        link = client.v1.account_links.create(
            params={
                "account": connect.stripe_account_id,
                "type": "account_onboarding",
                "refresh_url": f"{base}/dashboard/?connect=refresh",
                "return_url": f"{base}/dashboard/?connect=done",
            },
            options={"idempotency_key": f"hearth-link-{uuid.uuid4()}"},
        )
    except stripe.StripeError as exc:
        raise StripeUnavailable("the payment provider is unavailable") from exc
    return connect, str(link.url)


def connect_account_sync(*, stripe_account_id: str) -> None:
    """Record whether Stripe lets us pay this Connect account (re-fetched, not from the event)."""
    account = stripe_client().v1.accounts.retrieve(stripe_account_id)
    ConnectAccount.objects.filter(stripe_account_id=account.id).update(
        payouts_enabled=bool(account.payouts_enabled),
        details_submitted=bool(account.details_submitted),
        updated_at=timezone.now(),
    )


# ---- payouts ------------------------------------------------------------------


def payouts_run(*, now: datetime) -> int:
    """Pay host owners: open a payout for each available balance at or above the threshold,
    then send every pending payout to Stripe. Returns how many payouts completed in this run.

    A payout is opened (row + available → in transit) in one DB transaction before any
    Stripe call, and always sent with its own idempotency key: a timeout leaves it
    pending and the next run sends the same payout again, so the money is never sent
    twice and never lost. Safe to run concurrently and repeatedly.
    """
    due = Account.objects.filter(
        kind=K.HOST_AVAILABLE,
        balance__gte=settings.HEARTH_PAYOUT_THRESHOLD_MINOR,
        owner__connect_account__payouts_enabled=True,
    ).select_related("owner__connect_account")
    for available in due:
        assert available.owner is not None
        payout_open(owner=available.owner, currency=available.currency)
    completed = 0
    for payout_id in Payout.objects.filter(status=Payout.Status.PENDING).values_list("pk", flat=True):
        if payout_send(payout_id=payout_id, now=now) == Payout.Status.PAID:
            completed += 1
    return completed


@transaction.atomic
def payout_open(*, owner: User, currency: str) -> Payout | None:
    """Move the owner's whole available balance to transit and record the payout (not yet sent).

    None when the balance is under the threshold, the owner cannot be paid yet, or a
    payout of theirs is already pending (it must finish first).
    """
    connect = ConnectAccount.objects.filter(owner=owner, payouts_enabled=True).first()
    if connect is None:
        return None
    available = account_get(kind=K.HOST_AVAILABLE, owner=owner, currency=currency)
    transit = account_get(kind=K.PAYOUTS_IN_TRANSIT, currency=currency)
    locked = accounts_lock([available, transit])
    if Payout.objects.filter(owner=owner, currency=currency, status=Payout.Status.PENDING).exists():
        return None
    amount = locked[available.pk].balance
    if amount < settings.HEARTH_PAYOUT_THRESHOLD_MINOR:
        return None
    key = f"hearth-payout-{uuid.uuid4()}"
    start = ledger_post(
        kind=T.PAYOUT_START,
        idempotency_key=f"payout-start:{key}",
        legs=[(available, -amount), (transit, amount)],
        memo=f"payout to {connect.stripe_account_id}",
    )
    return Payout.objects.create(
        owner=owner,
        amount_minor=amount,
        currency=currency,
        destination=connect.stripe_account_id,
        idempotency_key=key,
        start_transaction=start,
    )


def payout_send(*, payout_id: int, now: datetime) -> str:
    """Send one pending payout to Stripe (again); returns its status afterwards.

    Outside any DB transaction: the Stripe call may take long or time out. An unknown
    outcome (timeout, connection loss, 409/429/5xx) leaves the payout pending for the
    next run; Stripe's definitive refusal (4xx) fails it and returns the money to the
    owner's available balance.
    """
    payout = Payout.objects.get(pk=payout_id)
    if payout.status != Payout.Status.PENDING:
        return payout.status
    tried_before = payout.attempts > 0
    Payout.objects.filter(pk=payout.pk).update(attempts=F("attempts") + 1, last_attempt_at=now)
    client = stripe_client()
    try:
        transfer: Any = None
        if tried_before:
            # Idempotency keys expire after 24 hours at Stripe; the transfer group does not.
            found = client.v1.transfers.list(params={"transfer_group": payout.idempotency_key, "limit": 1})
            transfer = found.data[0] if found.data else None
        if transfer is None:
            transfer = client.v1.transfers.create(
                params={
                    "amount": payout.amount_minor,
                    "currency": payout.currency,
                    "destination": payout.destination,
                    "transfer_group": payout.idempotency_key,
                    "metadata": {"hearth_payout_id": str(payout.pk)},
                },
                options={"idempotency_key": payout.idempotency_key},
            )
    except stripe.StripeError as exc:
        if is_retryable(exc):
            Payout.objects.filter(pk=payout.pk).update(last_error=f"will retry: {exc}"[:2000])
            logger.warning("payout %s: outcome unknown, will retry with the same key: %s", payout.pk, exc)
            return Payout.Status.PENDING
        _payout_fail(payout=payout, reason=str(exc))
        return Payout.Status.FAILED
    _payout_settle(payout=payout, transfer_id=str(transfer.id))
    return Payout.Status.PAID


@transaction.atomic
def _payout_settle(*, payout: Payout, transfer_id: str) -> None:
    won = Payout.objects.filter(pk=payout.pk, status=Payout.Status.PENDING).update(
        status=Payout.Status.PAID, transfer_id=transfer_id, last_error=""
    )
    if not won:
        return
    ledger_post(
        kind=T.PAYOUT_SETTLE,
        idempotency_key=f"payout-settle:{payout.idempotency_key}",
        legs=[
            (account_get(kind=K.PAYOUTS_IN_TRANSIT, currency=payout.currency), -payout.amount_minor),
            (account_get(kind=K.STRIPE_CLEARING, currency=payout.currency), payout.amount_minor),
        ],
        related=payout.start_transaction,
        stripe_id=transfer_id,
    )


@transaction.atomic
def _payout_fail(*, payout: Payout, reason: str) -> None:
    won = Payout.objects.filter(pk=payout.pk, status=Payout.Status.PENDING).update(
        status=Payout.Status.FAILED, last_error=reason[:2000]
    )
    if not won:
        return
    logger.warning("payout %s failed at Stripe, money returned to available: %s", payout.pk, reason)
    ledger_post(
        kind=T.PAYOUT_REVERSE,
        idempotency_key=f"payout-reverse:{payout.idempotency_key}",
        legs=[
            (account_get(kind=K.PAYOUTS_IN_TRANSIT, currency=payout.currency), -payout.amount_minor),
            (
                account_get(kind=K.HOST_AVAILABLE, owner=payout.owner, currency=payout.currency),
                payout.amount_minor,
            ),
        ],
        related=payout.start_transaction,
    )
