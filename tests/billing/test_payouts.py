"""Host payouts: Connect onboarding once, payouts stored before Stripe is called, exactly one transfer."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.billing.models import Account, ConnectAccount, LedgerTransaction, Payout
from marketplace.billing.services import (
    connect_onboarding_start,
    earnings_mature,
    escrow_capture,
    escrow_hold,
    payouts_run,
)
from tests.billing.conftest import assert_ledger_sound, balance, deliver, paid_topup, payable_owner

K = Account.Kind


def earn(client, fake, buyer, host, amount):
    """The host owner earns `amount` after fees, matured to available."""
    paid_topup(client, fake, buyer, 10_000)
    job = uuid.uuid4()
    gross = amount * 100 // 85
    escrow_hold(job_id=job, buyer=buyer, amount_minor=gross)
    escrow_capture(
        run_id=uuid.uuid4(),
        job_id=job,
        buyer=buyer,
        host_owner=host.owner,
        host_id=host.id,
        amount_minor=gross,
    )
    earnings_mature(now=timezone.now() + timedelta(hours=2))
    return balance(K.HOST_AVAILABLE, host.owner)


@pytest.fixture
def client():
    return APIClient()


def test_onboarding_creates_one_express_account_per_owner_and_a_fresh_link_each_time(fake_stripe, host_owner):
    first, first_url = connect_onboarding_start(owner=host_owner)
    again, again_url = connect_onboarding_start(owner=host_owner)
    assert first.pk == again.pk
    assert first_url.startswith(fake_stripe.api_base) and again_url.startswith(fake_stripe.api_base)
    assert [a["type"] for a in fake_stripe.of_type("account")] == ["express"]
    assert not first.payouts_enabled


def test_account_updated_records_payouts_enabled_from_a_fresh_fetch(client, fake_stripe, host_owner):
    account, _ = connect_onboarding_start(owner=host_owner)
    fake_stripe.enable_payouts(account.stripe_account_id)
    assert deliver(client, fake_stripe, fake_stripe.events[-1]).status_code == 200
    assert ConnectAccount.objects.get(owner=host_owner).payouts_enabled


def test_an_owner_at_the_threshold_is_paid_their_whole_available_balance(client, fake_stripe, buyer, host):
    destination = payable_owner(fake_stripe, host.owner)
    available = earn(client, fake_stripe, buyer, host, 1700)
    assert payouts_run(now=timezone.now()) == 1
    payout = Payout.objects.get()
    assert (payout.status, payout.amount_minor) == (Payout.Status.PAID, available)
    [transfer] = fake_stripe.of_type("transfer")
    assert (transfer["destination"], transfer["amount"], transfer["id"]) == (
        destination,
        available,
        payout.transfer_id,
    )
    assert balance(K.HOST_AVAILABLE, host.owner) == 0
    assert balance(K.PAYOUTS_IN_TRANSIT) == 0
    assert payouts_run(now=timezone.now()) == 0
    assert len(fake_stripe.of_type("transfer")) == 1
    assert_ledger_sound()


def test_nobody_is_paid_below_the_threshold_or_without_payouts_enabled(
    client, fake_stripe, buyer, host, settings
):
    connect_onboarding_start(owner=host.owner)  # onboarding not finished
    earn(client, fake_stripe, buyer, host, 1700)
    assert payouts_run(now=timezone.now()) == 0
    settings.HEARTH_PAYOUT_THRESHOLD_MINOR = 10_000
    ConnectAccount.objects.update(payouts_enabled=True)
    assert payouts_run(now=timezone.now()) == 0
    assert not Payout.objects.exists()
    assert fake_stripe.of_type("transfer") == []


@pytest.mark.parametrize("client_retries", [0, 2])
def test_a_transfer_whose_response_times_out_is_made_exactly_once(
    client, fake_stripe, buyer, host, settings, client_retries
):
    """The fake carries out the transfer but answers after the client gave up; with no
    client retries the next run finds it, with retries the replayed key returns it."""
    payable_owner(fake_stripe, host.owner)
    available = earn(client, fake_stripe, buyer, host, 1700)
    settings.HEARTH_STRIPE_TIMEOUT_S = 0.3
    settings.HEARTH_STRIPE_MAX_NETWORK_RETRIES = client_retries
    fake_stripe.hold_transfer_responses(1, seconds=1.0)

    first = payouts_run(now=timezone.now())
    for _ in range(3):
        payouts_run(now=timezone.now())

    assert first == (1 if client_retries else 0)
    assert len(fake_stripe.of_type("transfer")) == 1
    [payout] = Payout.objects.all()
    assert payout.status == Payout.Status.PAID
    assert payout.amount_minor == available
    assert payout.transfer_id == fake_stripe.of_type("transfer")[0]["id"]
    assert LedgerTransaction.objects.filter(kind="payout_start").count() == 1
    assert LedgerTransaction.objects.filter(kind="payout_settle").count() == 1
    assert balance(K.PAYOUTS_IN_TRANSIT) == 0
    assert_ledger_sound()


def test_a_payout_stays_pending_in_transit_while_stripe_cannot_be_reached(
    client, fake_stripe, buyer, host, settings
):
    payable_owner(fake_stripe, host.owner)
    available = earn(client, fake_stripe, buyer, host, 1700)
    settings.HEARTH_STRIPE_API_BASE = "http://127.0.0.1:9"  # nothing listens there
    assert payouts_run(now=timezone.now()) == 0
    assert payouts_run(now=timezone.now()) == 0
    [payout] = Payout.objects.all()
    assert (payout.status, payout.attempts) == (Payout.Status.PENDING, 2)
    assert balance(K.PAYOUTS_IN_TRANSIT) == available
    settings.HEARTH_STRIPE_API_BASE = fake_stripe.api_base
    assert payouts_run(now=timezone.now()) == 1
    assert Payout.objects.get().status == Payout.Status.PAID
    assert len(fake_stripe.of_type("transfer")) == 1


def test_a_transfer_stripe_refuses_returns_the_money_to_available(client, fake_stripe, buyer, host):
    destination = payable_owner(fake_stripe, host.owner)
    available = earn(client, fake_stripe, buyer, host, 1700)
    fake_stripe.refusing_destinations.add(destination)
    assert payouts_run(now=timezone.now()) == 0
    payout = Payout.objects.get()
    assert payout.status == Payout.Status.FAILED
    assert "capabilities" in payout.last_error
    assert balance(K.HOST_AVAILABLE, host.owner) == available
    assert balance(K.PAYOUTS_IN_TRANSIT) == 0
    fake_stripe.refusing_destinations.clear()
    assert payouts_run(now=timezone.now()) == 1
    assert Payout.objects.filter(status=Payout.Status.PAID).count() == 1
    assert_ledger_sound()
