"""Money end to end on a real stack: a buyer without credit is refused, tops up through (fake) Stripe
Checkout, runs a job and sees its charge; the machines' owner sees the earnings and a payout."""

from __future__ import annotations

import time
from typing import Any

import pytest

from marketplace.devstack import LocalStack

pytestmark = pytest.mark.integration

JOB = {
    "model": "all-MiniLM-L6-v2",
    "inputs": [f"Invoice line {i}: solar export credited at the evening tariff." for i in range(1000)],
    "task_size": 100,
    "max_price_per_1k_minor": 100,
}


def test_a_buyer_tops_up_runs_a_job_and_sees_the_charge_and_the_owner_is_paid_out(
    stack: LocalStack, fleet: list[Any], owner: tuple[str, str]
) -> None:
    buyer = stack.signup(email="payer@example.com")
    with stack.client(auth=buyer) as http:
        refused = http.post("/api/v1/jobs", json=JOB)
        assert refused.status_code == 402, refused.text
        assert refused.json()["shortfall_minor"] == 100  # 1,000 items × 1.00 per 1k, no credit yet
        assert http.get("/api/v1/jobs").json() == []

    balance = stack.top_up(auth=buyer, amount_minor=500)
    assert balance["buyer_credit_minor"] == 500
    with stack.client(auth=buyer) as http:
        created = http.post("/api/v1/jobs", json=JOB)
        assert created.status_code == 201, created.text
        assert created.json()["cost"]["held_minor"] == 100
        assert http.get("/api/v1/billing/balance").json()["buyer_escrow_minor"] >= 100 - 10

    api_key = stack.api_key(email=buyer[0], password=buyer[1])
    job = stack.wait_job(api_key=api_key, job_id=created.json()["id"])
    assert job["status"] == "succeeded", job
    # The fleet asks the default 0.10 per 1k items: 10 minor units for 1,000 items, the rest released.
    assert job["cost"] == {
        "currency": "usd", "held_minor": 100, "charged_minor": 10, "reversed_minor": 0,
        "released_minor": 90, "in_escrow_minor": 0,
    }  # fmt: skip
    with stack.client(auth=buyer) as http:
        assert http.get("/api/v1/billing/balance").json()["buyer_credit_minor"] == 490
        usage = http.get("/api/v1/billing/statements/jobs", params={"format": "csv"})
        assert usage.status_code == 200 and job["id"] in usage.text

    stack.payouts_enable(owner=owner)
    deadline = time.monotonic() + 30
    with stack.client(auth=owner) as http:
        while True:
            payouts = http.get("/api/v1/billing/payouts").json()
            if any(p["status"] == "paid" for p in payouts):
                break
            assert time.monotonic() < deadline, f"no payout within 30 s: {payouts}"
            time.sleep(0.5)
        earned = sum(day["earned_minor"] for day in http.get("/api/v1/billing/statements/earnings").json())
        paid_out = sum(p["amount_minor"] for p in payouts if p["status"] == "paid")
        assert earned >= 9  # this job's 10, less the 15 % fee on each capture, at least
        assert 0 < paid_out <= earned
        assert all(p["transfer_id"].startswith("tr_") for p in payouts if p["status"] == "paid")
