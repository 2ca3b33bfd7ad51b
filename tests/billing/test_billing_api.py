"""The billing REST API: top-ups, 402 on a short hold, field errors, statements and payouts per tenant."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.accounts.services import api_key_create
from marketplace.billing.models import Payout, TopUp
from marketplace.billing.services import (
    earnings_mature,
    escrow_capture,
    escrow_hold,
    escrow_release,
    payouts_run,
)
from tests.billing.conftest import paid_topup, payable_owner


@pytest.fixture
def host_api(host_owner):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=host_owner, name='t').plaintext}")
    return client


def test_a_top_up_opens_a_checkout_session_and_returns_its_url(api, fake_stripe, buyer):
    response = api.post("/api/v1/billing/topups", {"amount_minor": 2500}, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["checkout_url"].startswith(fake_stripe.api_base)
    [session] = fake_stripe.of_type("checkout.session")
    assert (session["amount_total"], session["currency"], session["mode"]) == (2500, "usd", "payment")
    assert session["client_reference_id"] == str(buyer.pk)
    assert session["metadata"]["hearth_user_id"] == str(buyer.pk)
    assert TopUp.objects.get().session_id == session["id"] == body["session_id"]


@pytest.mark.parametrize("amount", [None, "25", 12.5, True, 0, -100, 499, 1_000_001])
def test_a_bad_top_up_amount_is_a_400_naming_the_field(api, fake_stripe, amount):
    payload = {} if amount is None else {"amount_minor": amount}
    response = api.post("/api/v1/billing/topups", payload, format="json")
    assert response.status_code == 400
    assert list(response.json()) == ["amount_minor"]
    assert not TopUp.objects.exists()
    assert fake_stripe.of_type("checkout.session") == []


def test_a_top_up_while_stripe_is_down_is_a_503_and_charges_nothing(api, fake_stripe, settings):
    settings.HEARTH_STRIPE_API_BASE = "http://127.0.0.1:9"
    response = api.post("/api/v1/billing/topups", {"amount_minor": 2500}, format="json")
    assert response.status_code == 503
    assert TopUp.objects.get().status == TopUp.Status.FAILED


def test_the_balance_shows_credit_and_escrow(api, fake_stripe, buyer):
    paid_topup(APIClient(), fake_stripe, buyer, 3000)
    escrow_hold(job_id=uuid.uuid4(), buyer=buyer, amount_minor=1200)
    body = api.get("/api/v1/billing/balance").json()
    assert (body["buyer_credit_minor"], body["buyer_escrow_minor"], body["currency"]) == (1800, 1200, "usd")


def _buyer_spends_and_host_is_paid(fake_stripe, buyer, host):
    paid_topup(APIClient(), fake_stripe, buyer, 5000)
    job = uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=4000)
    escrow_capture(
        run_id=uuid.uuid4(),
        job_id=job,
        buyer=buyer,
        host_owner=host.owner,
        host_id=host.id,
        amount_minor=1500,
    )
    escrow_capture(
        run_id=uuid.uuid4(),
        job_id=job,
        buyer=buyer,
        host_owner=host.owner,
        host_id=host.id,
        amount_minor=1000,
    )
    escrow_release(job_id=job, buyer=buyer)
    payable_owner(fake_stripe, host.owner)
    earnings_mature(now=timezone.now() + timedelta(hours=2))
    payouts_run(now=timezone.now())
    return job


def test_buyer_statements_per_job_and_month_come_from_the_ledger(api, fake_stripe, buyer, host):
    job = _buyer_spends_and_host_is_paid(fake_stripe, buyer, host)
    [row] = api.get("/api/v1/billing/statements/jobs").json()
    assert row["job_id"] == str(job)
    assert (row["held_minor"], row["spent_minor"], row["released_minor"], row["in_escrow_minor"]) == (
        4000,
        2500,
        1500,
        0,
    )
    [month] = api.get("/api/v1/billing/statements/months").json()
    assert month["month"] == timezone.now().strftime("%Y-%m")
    assert (month["topped_up_minor"], month["spent_minor"], month["refunded_minor"]) == (5000, 2500, 0)


def test_statements_download_as_csv(api, fake_stripe, buyer, host):
    job = _buyer_spends_and_host_is_paid(fake_stripe, buyer, host)
    response = api.get("/api/v1/billing/statements/jobs?format=csv")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    lines = response.content.decode().splitlines()
    assert lines[0].startswith(
        "job_id,held_at,held_minor,spent_minor,reversed_minor,released_minor,in_escrow_minor"
    )
    assert lines[1].startswith(f"{job},") and ",4000,2500,0,1500,0,usd" in lines[1]


def test_host_earnings_per_day_and_payout_history(host_api, fake_stripe, buyer, host):
    _buyer_spends_and_host_is_paid(fake_stripe, buyer, host)
    [day] = host_api.get("/api/v1/billing/statements/earnings").json()
    assert (day["earned_minor"], day["matured_minor"], day["paid_out_minor"]) == (2125, 2125, 2125)
    [payout] = host_api.get("/api/v1/billing/payouts").json()
    assert (payout["amount_minor"], payout["status"]) == (2125, "paid")
    assert host_api.get(f"/api/v1/billing/payouts/{payout['id']}").json()["transfer_id"].startswith("tr_")
    csv_lines = host_api.get("/api/v1/billing/statements/earnings?format=csv").content.decode().splitlines()
    assert csv_lines[0] == "day,earned_minor,clawed_back_minor,matured_minor,paid_out_minor,currency"


def test_another_users_statements_and_payouts_are_not_visible(api, other_api, fake_stripe, buyer, host):
    _buyer_spends_and_host_is_paid(fake_stripe, buyer, host)
    payout = Payout.objects.get()
    assert api.get(f"/api/v1/billing/payouts/{payout.pk}").status_code == 404
    assert other_api.get(f"/api/v1/billing/payouts/{payout.pk}").status_code == 404
    assert other_api.get("/api/v1/billing/payouts").json() == []
    assert other_api.get("/api/v1/billing/statements/jobs").json() == []
    assert other_api.get("/api/v1/billing/statements/months").json() == []
    assert other_api.get("/api/v1/billing/statements/earnings").json() == []
    assert other_api.get("/api/v1/billing/balance").json()["buyer_credit_minor"] == 0


def test_connect_onboarding_is_for_gpu_owners(api, host_api, fake_stripe):
    assert api.post("/api/v1/billing/connect").status_code == 403
    response = host_api.post("/api/v1/billing/connect")
    assert response.status_code == 200
    assert response.json()["onboarding_url"].startswith(fake_stripe.api_base)
    assert response.json()["payouts_enabled"] is False


def test_billing_needs_credentials_except_the_webhook(fake_stripe):
    anonymous = APIClient()
    assert anonymous.get("/api/v1/billing/balance").status_code == 401
    assert anonymous.post("/api/v1/billing/topups", {"amount_minor": 1000}, format="json").status_code == 401
    assert (
        anonymous.post(
            "/api/v1/billing/stripe/webhook", data=b"{}", content_type="application/json"
        ).status_code
        == 400
    )
