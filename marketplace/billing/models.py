"""Money: a double-entry ledger in integer minor units, Stripe top-ups, Connect accounts and payouts.

Entries are append-only; a correction is a new transaction. `Account.balance` is a
cache of the sum of its entries, changed only by `ledger.ledger_post` under the
account's row lock.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class Account(models.Model):
    class Kind(models.TextChoices):
        BUYER_CREDIT = "buyer_credit", "Buyer credit"
        BUYER_ESCROW = "buyer_escrow", "Buyer escrow (held for jobs)"
        HOST_PENDING = "host_pending", "Host earnings in the verification window"
        HOST_AVAILABLE = "host_available", "Host earnings ready to pay out"
        PLATFORM_FEES = "platform_fees", "Platform fees"
        STRIPE_CLEARING = "stripe_clearing", "Money at Stripe (negative: owed to buyers and hosts)"
        PAYOUTS_IN_TRANSIT = "payouts_in_transit", "Payouts sent to Stripe, not yet confirmed"

    kind = models.CharField(max_length=20, choices=Kind.choices)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="ledger_accounts",
        help_text="empty for the platform's own accounts",
    )
    currency = models.CharField(max_length=3)
    balance = models.BigIntegerField(default=0, help_text="sum of the entries, minor units")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "owner", "currency"],
                condition=models.Q(owner__isnull=False),
                name="billing_one_account_per_owner_kind_currency",
            ),
            models.UniqueConstraint(
                fields=["kind", "currency"],
                condition=models.Q(owner__isnull=True),
                name="billing_one_platform_account_per_kind_currency",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind}:{self.owner_id or 'platform'}:{self.currency}"


class LedgerTransaction(models.Model):
    class Kind(models.TextChoices):
        TOPUP = "topup", "Top-up credited"
        REFUND = "refund", "Top-up refunded"
        HOLD = "hold", "Escrow held for a job"
        CAPTURE = "capture", "Escrow captured for a verified run"
        RELEASE = "release", "Unused escrow released"
        MATURE = "mature", "Host earnings matured"
        PAYOUT_START = "payout_start", "Payout moved to transit"
        PAYOUT_SETTLE = "payout_settle", "Payout transferred"
        PAYOUT_REVERSE = "payout_reverse", "Failed payout returned"
        ADJUSTMENT = "adjustment", "Operator adjustment"
        GRANT = "grant", "Credit granted by the platform"
        PLATFORM_RUN = "platform_run", "Run paid by the platform (a check it added)"
        CLAWBACK = "clawback", "Payment for a run found wrong, reversed"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    idempotency_key = models.CharField(max_length=200, unique=True)
    memo = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # References to other contexts are plain values, not foreign keys: the ledger
    # outlives jobs and hosts and must never cascade with them.
    job_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    task_id = models.CharField(max_length=64, blank=True, default="")
    run_id = models.CharField(max_length=64, blank=True, default="")
    host_id = models.CharField(max_length=64, blank=True, default="")
    stripe_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    related = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="followers",
        help_text="the transaction this one matures, settles or reverses",
    )

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.idempotency_key}"


class Entry(models.Model):
    transaction = models.ForeignKey(LedgerTransaction, on_delete=models.PROTECT, related_name="entries")
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="entries")
    amount = models.BigIntegerField(help_text="signed minor units; a transaction's entries sum to zero")

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["account", "transaction"], name="billing_entry_account_tx")]

    def __str__(self) -> str:
        return f"{self.account} {self.amount:+d}"


class JobEscrow(models.Model):
    """What one job's escrow holds now: the sum of the job's entries on its buyer's escrow account,
    a cache kept by `ledger.ledger_post` under that account's row lock (as `Account.balance` is).
    A capture reads this row rather than summing every payment the job has had, which made paying
    a job's n runs cost O(n^2) rows read."""

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="job_escrows")
    job_id = models.CharField(max_length=64)
    left = models.BigIntegerField(default=0, help_text="minor units")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "job_id"], name="billing_one_escrow_per_account_job")
        ]

    def __str__(self) -> str:
        return f"escrow of job {self.job_id}: {self.left}"


class TopUp(models.Model):
    """A Stripe Checkout Session a buyer opened to buy credit; stored before Stripe is called."""

    class Status(models.TextChoices):
        CREATING = "creating", "Creating the session"
        OPEN = "open", "Waiting for payment"
        PAID = "paid", "Paid and credited"
        FAILED = "failed", "Session could not be created"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="topups")
    # Sent to Stripe as the idempotency key and the session's metadata.
    key = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    amount_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.CREATING)
    session_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    checkout_url = models.URLField(max_length=2000, blank=True, default="")
    payment_intent_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    credited_minor = models.BigIntegerField(default=0)
    refunded_minor = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"top-up {self.pk} {self.amount_minor} {self.currency} ({self.status})"


class StripeEvent(models.Model):
    """Every verified webhook delivery's event id, so repeats are recognised."""

    event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)
    deliveries = models.PositiveIntegerField(default=1)

    def __str__(self) -> str:
        return f"{self.event_id} {self.type}"


class ConnectAccount(models.Model):
    """A host owner's Stripe Connect Express account (one per owner)."""

    owner = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="connect_account"
    )
    stripe_account_id = models.CharField(max_length=255, unique=True)
    payouts_enabled = models.BooleanField(default=False)
    details_submitted = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.stripe_account_id} ({'payouts on' if self.payouts_enabled else 'payouts off'})"


class Payout(models.Model):
    """One transfer of a host owner's available earnings, stored before Stripe is called.

    `idempotency_key` goes to Stripe with every attempt, so a retry after a timeout
    can never create a second transfer for the same money.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "In transit"
        PAID = "paid", "Transferred"
        FAILED = "failed", "Failed; returned to available"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="payouts")
    amount_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    destination = models.CharField(max_length=255, help_text="the Stripe Connect account id")
    idempotency_key = models.CharField(max_length=200, unique=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING, db_index=True)
    transfer_id = models.CharField(max_length=255, blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    start_transaction = models.OneToOneField(
        LedgerTransaction, on_delete=models.PROTECT, related_name="payout"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # At most one payout in flight per owner and currency: the next waits for this one.
            models.UniqueConstraint(
                fields=["owner", "currency"],
                condition=models.Q(status="pending"),
                name="billing_one_pending_payout_per_owner",
            )
        ]

    def __str__(self) -> str:
        return f"payout {self.pk} {self.amount_minor} {self.currency} ({self.status})"
