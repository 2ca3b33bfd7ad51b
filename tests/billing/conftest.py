"""Billing fixtures: the local fake Stripe behind the real `stripe` client, and ledger helpers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum

from marketplace.billing.fake_stripe import FakeStripe
from marketplace.billing.ledger import NON_NEGATIVE_KINDS
from marketplace.billing.models import Account, Entry, JobEscrow, LedgerTransaction
from marketplace.billing.services import connect_account_sync, connect_onboarding_start, topup_create

WEBHOOK_SECRET = "whsec_test_hearth"
WEBHOOK_URL = "/api/v1/billing/stripe/webhook"


@pytest.fixture
def buyer(db: Any) -> Any:
    """Billing tests start buyers from nothing: every minor unit they have, they topped up here."""
    from tests.conftest import funded_buyer

    return funded_buyer(credit_minor=0)


@pytest.fixture
def other_buyer(db: Any) -> Any:
    from tests.conftest import funded_buyer

    return funded_buyer(credit_minor=0)


@pytest.fixture
def fake_stripe(settings: Any) -> Iterator[FakeStripe]:
    """A fresh fake Stripe on a loopback port; settings point the client and webhooks at it."""
    fake = FakeStripe().start()
    settings.HEARTH_STRIPE_API_KEY = "sk_test_hearth"
    settings.HEARTH_STRIPE_API_BASE = fake.api_base
    settings.HEARTH_STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.HEARTH_STRIPE_TIMEOUT_S = 5.0
    settings.HEARTH_STRIPE_MAX_NETWORK_RETRIES = 0
    settings.HEARTH_PLATFORM_FEE_BPS = 1500
    settings.HEARTH_PAYOUT_THRESHOLD_MINOR = 1000
    settings.HEARTH_EARNINGS_HOLD_S = 3600
    yield fake
    fake.stop()


def deliver(client: Any, fake: FakeStripe, event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> Any:
    payload, signature = fake.signed(event, secret)
    return client.post(
        WEBHOOK_URL, data=payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=signature
    )


def events_of(fake: FakeStripe, event_type: str) -> list[dict[str, Any]]:
    return [e for e in fake.events if e["type"] == event_type]


def paid_topup(client: Any, fake: FakeStripe, user: Any, amount_minor: int) -> Any:
    """A top-up the buyer paid, credited through the signed checkout.session.completed webhook."""
    topup = topup_create(user=user, amount_minor=amount_minor)
    assert topup.session_id is not None
    fake.pay_session(topup.session_id)
    assert deliver(client, fake, fake.events[-1]).status_code == 200
    topup.refresh_from_db()
    return topup


def payable_owner(fake: FakeStripe, owner: Any) -> str:
    """The owner onboarded to Connect Express with payouts enabled (as after account.updated)."""
    account, _ = connect_onboarding_start(owner=owner)
    fake.enable_payouts(account.stripe_account_id)
    connect_account_sync(stripe_account_id=account.stripe_account_id)
    return account.stripe_account_id


def ledger_snapshot() -> list[tuple[Any, ...]]:
    """The ledger without row ids and times: what it says, in posting order."""
    return [
        (
            tx.kind,
            tx.idempotency_key,
            tx.job_id,
            tx.stripe_id,
            tuple((e.account.kind, e.account.owner_id, e.amount) for e in tx.entries.all()),
        )
        for tx in LedgerTransaction.objects.prefetch_related("entries__account").order_by("id")
    ]


def assert_ledger_sound() -> None:
    """Each transaction sums to 0, all entries sum to 0, cached balances match (each account's, and
    each job's escrow), none forbidden below 0."""
    unbalanced = (
        Entry.objects.values("transaction_id")
        .annotate(total=Sum("amount"))
        .exclude(total=0)
        .values_list("transaction_id", "total")
    )
    assert list(unbalanced) == []
    assert (Entry.objects.aggregate(s=Sum("amount"))["s"] or 0) == 0
    for account in Account.objects.all():
        total = Entry.objects.filter(account=account).aggregate(s=Sum("amount"))["s"] or 0
        assert account.balance == total, account
        if account.kind in NON_NEGATIVE_KINDS:
            assert account.balance >= 0, account
    per_job = {
        (row["account_id"], row["transaction__job_id"]): row["left"]
        for row in Entry.objects.filter(account__kind=Account.Kind.BUYER_ESCROW)
        .exclude(transaction__job_id="")
        .values("account_id", "transaction__job_id")
        .annotate(left=Sum("amount"))
        .order_by()
    }
    assert {(e.account_id, e.job_id): e.left for e in JobEscrow.objects.all()} == per_job
    assert all(left >= 0 for left in per_job.values()), per_job


def balance(kind: str, owner: Any = None) -> int:
    found = Account.objects.filter(kind=kind, owner=owner).values_list("balance", flat=True).first()
    return found or 0


requires_postgres = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs PostgreSQL (set DATABASE_URL=postgres://...)"
)
