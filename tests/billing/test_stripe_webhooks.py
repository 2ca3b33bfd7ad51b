"""Stripe webhooks: signed, deduplicated, re-fetched; any order and repetition gives the same ledger."""

from __future__ import annotations

import json
import random
import uuid

import pytest
from django.db import transaction
from rest_framework.test import APIClient

from marketplace.billing.models import Account, ConnectAccount, LedgerTransaction, StripeEvent, TopUp
from marketplace.billing.services import connect_onboarding_start, escrow_hold, topup_create
from tests.billing.conftest import (
    assert_ledger_sound,
    balance,
    deliver,
    events_of,
    ledger_snapshot,
    paid_topup,
)

K = Account.Kind


@pytest.fixture
def client():
    return APIClient()


def _history(fake, buyer, host_owner):
    """Two paid top-ups, one unpaid, two partial refunds of the first, a host finishing onboarding."""
    first = topup_create(user=buyer, amount_minor=5000)
    second = topup_create(user=buyer, amount_minor=2000)
    topup_create(user=buyer, amount_minor=1000)  # opened, never paid
    fake.pay_session(first.session_id)
    fake.pay_session(second.session_id)
    intent = fake.of_type("checkout.session")[0]["payment_intent"]
    fake.refund(intent, 1500)
    fake.refund(intent, 500)
    account, _ = connect_onboarding_start(owner=host_owner)
    fake.enable_payouts(account.stripe_account_id)
    return list(fake.events)


def test_every_webhook_delivered_three_times_in_shuffled_order_gives_the_identical_ledger(
    client, fake_stripe, buyer, host_owner
):
    events = _history(fake_stripe, buyer, host_owner)
    assert sorted({e["type"] for e in events}) == [
        "account.updated",
        "charge.refunded",
        "checkout.session.completed",
        "refund.created",
    ]

    snapshots = []
    for seed in [None, 1, 2, 3]:
        deliveries = events if seed is None else events * 3
        if seed is not None:
            random.Random(seed).shuffle(deliveries)
        with transaction.atomic():
            for event in deliveries:
                assert deliver(client, fake_stripe, event).status_code == 200
            snapshots.append(ledger_snapshot())
            assert_ledger_sound()
            assert balance(K.BUYER_CREDIT, buyer) == 5000 + 2000 - 1500 - 500
            assert balance(K.STRIPE_CLEARING) == -5000
            assert sorted(LedgerTransaction.objects.values_list("kind", flat=True)) == [
                "refund",
                "refund",
                "topup",
                "topup",
            ]
            assert StripeEvent.objects.count() == len(events)
            assert ConnectAccount.objects.get(owner=host_owner).payouts_enabled
            transaction.set_rollback(True)
    assert all(snapshot == snapshots[0] for snapshot in snapshots)


def test_a_forged_signature_is_refused_and_credits_nothing(client, fake_stripe, buyer):
    topup = topup_create(user=buyer, amount_minor=5000)
    fake_stripe.pay_session(topup.session_id)
    event = events_of(fake_stripe, "checkout.session.completed")[0]

    assert deliver(client, fake_stripe, event, secret="whsec_someone_else").status_code == 400
    payload, signature = fake_stripe.signed(event, "whsec_test_hearth")
    tampered = payload.replace(b'"amount_total": 5000', b'"amount_total": 9999')
    response = client.post(
        "/api/v1/billing/stripe/webhook",
        data=tampered,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=signature,
    )
    assert response.status_code == 400
    unsigned = client.post("/api/v1/billing/stripe/webhook", data=payload, content_type="application/json")
    assert unsigned.status_code == 400

    assert not LedgerTransaction.objects.exists()
    assert not StripeEvent.objects.exists()
    assert balance(K.BUYER_CREDIT, buyer) == 0


def test_without_a_webhook_secret_every_delivery_is_refused(client, fake_stripe, buyer, settings):
    topup = topup_create(user=buyer, amount_minor=5000)
    fake_stripe.pay_session(topup.session_id)
    settings.HEARTH_STRIPE_WEBHOOK_SECRET = ""
    assert deliver(client, fake_stripe, fake_stripe.events[-1], secret="").status_code == 400
    assert balance(K.BUYER_CREDIT, buyer) == 0


def test_the_amount_comes_from_stripe_not_from_the_event_body(client, fake_stripe, buyer):
    topup = topup_create(user=buyer, amount_minor=5000)
    fake_stripe.pay_session(topup.session_id)
    event = json.loads(json.dumps(fake_stripe.events[-1]))
    event["data"]["object"]["amount_total"] = 999_999  # validly signed, e.g. a replayed edited event
    assert deliver(client, fake_stripe, event).status_code == 200
    assert balance(K.BUYER_CREDIT, buyer) == 5000


def test_a_completed_event_for_an_unpaid_session_credits_nothing(client, fake_stripe, buyer):
    topup = topup_create(user=buyer, amount_minor=5000)
    session = fake_stripe.objects[topup.session_id]
    fake_stripe._emit("checkout.session.completed", session)  # e.g. an async payment still processing
    assert deliver(client, fake_stripe, fake_stripe.events[-1]).status_code == 200
    assert balance(K.BUYER_CREDIT, buyer) == 0
    fake_stripe.pay_session(topup.session_id)
    assert deliver(client, fake_stripe, fake_stripe.events[-1]).status_code == 200
    assert balance(K.BUYER_CREDIT, buyer) == 5000
    assert TopUp.objects.get(pk=topup.pk).status == TopUp.Status.PAID


def test_a_refund_of_credit_already_spent_is_absorbed_by_the_platform_not_taken_from_escrow(
    client, fake_stripe, buyer
):
    topup = paid_topup(client, fake_stripe, buyer, 5000)
    escrow_hold(job_id=uuid.uuid4(), buyer=buyer, amount_minor=4000)
    fake_stripe.refund(topup.payment_intent_id)  # the whole 5000
    for event in events_of(fake_stripe, "charge.refunded"):
        assert deliver(client, fake_stripe, event).status_code == 200
    assert balance(K.BUYER_CREDIT, buyer) == 0
    assert balance(K.BUYER_ESCROW, buyer) == 4000
    assert balance(K.PLATFORM_FEES) == -4000
    assert balance(K.STRIPE_CLEARING) == 0
    topup.refresh_from_db()
    assert topup.refunded_minor == 5000
    assert_ledger_sound()


def test_a_refund_delivered_before_the_payment_event_still_credits_then_refunds(client, fake_stripe, buyer):
    topup = topup_create(user=buyer, amount_minor=3000)
    fake_stripe.pay_session(topup.session_id)
    intent = fake_stripe.objects[topup.session_id]["payment_intent"]
    fake_stripe.refund(intent, 1000)
    assert deliver(client, fake_stripe, events_of(fake_stripe, "refund.created")[0]).status_code == 200
    assert balance(K.BUYER_CREDIT, buyer) == 2000
    assert balance(K.PLATFORM_FEES) == 0
