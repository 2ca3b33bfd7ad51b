"""Escrow for jobs: hold at submit, capture per verified run, release at the end, maturing earnings."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from marketplace.billing.errors import EscrowExhausted, InsufficientCredit
from marketplace.billing.ledger import account_get, ledger_post
from marketplace.billing.models import Account, JobEscrow, LedgerTransaction
from marketplace.billing.services import (
    credit_balance,
    earnings_mature,
    escrow_capture,
    escrow_hold,
    escrow_release,
    fee_split,
    platform_run_pay,
    run_payment_reverse,
)
from tests.billing.conftest import assert_ledger_sound, balance

K = Account.Kind


@pytest.fixture(autouse=True)
def _fees(settings):
    settings.HEARTH_PLATFORM_FEE_BPS = 1500
    settings.HEARTH_EARNINGS_HOLD_S = 3600


def credit(user, amount):
    ledger_post(
        kind="topup",
        idempotency_key=f"test-topup-{uuid.uuid4()}",
        legs=[
            (account_get(kind=K.STRIPE_CLEARING), -amount),
            (account_get(kind=K.BUYER_CREDIT, owner=user), amount),
        ],
    )


def capture(job, buyer, host, amount, run=None):
    escrow_capture(
        run_id=run or uuid.uuid4(),
        job_id=job,
        buyer=buyer,
        host_owner=host.owner,
        host_id=host.id,
        amount_minor=amount,
    )


def test_a_hold_moves_the_worst_case_from_credit_to_the_jobs_escrow(buyer):
    credit(buyer, 1000)
    job = uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=600)
    assert credit_balance(buyer) == 400
    assert balance(K.BUYER_ESCROW, buyer) == 600
    assert LedgerTransaction.objects.get(kind="hold").job_id == str(job)


def test_a_hold_larger_than_the_credit_names_the_shortfall_and_holds_nothing(buyer):
    credit(buyer, 1000)
    with pytest.raises(InsufficientCredit) as refused:
        escrow_hold(job_id=uuid.uuid4(), buyer=buyer, amount_minor=1250)
    assert refused.value.shortfall_minor == 250
    assert "2.50 USD" in str(refused.value)
    assert credit_balance(buyer) == 1000
    assert not LedgerTransaction.objects.filter(kind="hold").exists()


def test_holding_twice_for_the_same_job_holds_once(buyer):
    credit(buyer, 1000)
    job = uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=300)
    escrow_hold(job_id=job, buyer=buyer, amount_minor=300)
    assert credit_balance(buyer) == 700


@pytest.mark.parametrize(
    ("amount", "bps", "fee", "host_share"),
    [
        (1000, 1500, 150, 850),
        (999, 1500, 149, 850),
        (1, 1500, 0, 1),
        (7, 1250, 0, 7),
        (100, 0, 0, 100),
        (3, 10000, 3, 0),
    ],
)
def test_the_fee_is_rounded_down_and_the_remainder_goes_to_the_host(amount, bps, fee, host_share):
    assert fee_split(amount, bps) == (fee, host_share)


def test_a_capture_pays_the_host_owner_pending_and_the_platform_its_fee(buyer, host):
    credit(buyer, 1000)
    job = uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=1000)
    capture(job, buyer, host, 999)
    assert balance(K.BUYER_ESCROW, buyer) == 1
    assert balance(K.HOST_PENDING, host.owner) == 850
    assert balance(K.PLATFORM_FEES) == 149
    assert_ledger_sound()


def test_a_run_is_paid_once_however_often_it_is_reported(buyer, host):
    credit(buyer, 1000)
    job, run = uuid.uuid4(), uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=1000)
    for _ in range(3):
        capture(job, buyer, host, 400, run=run)
    assert balance(K.BUYER_ESCROW, buyer) == 600
    assert LedgerTransaction.objects.filter(kind="capture").count() == 1


def test_a_capture_beyond_the_jobs_escrow_is_refused(buyer, host):
    credit(buyer, 2000)
    job, other_job = uuid.uuid4(), uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=500)
    escrow_hold(job_id=other_job, buyer=buyer, amount_minor=1000)
    with pytest.raises(EscrowExhausted):
        capture(job, buyer, host, 501)  # the other job's escrow is not this job's
    assert balance(K.BUYER_ESCROW, buyer) == 1500


def test_a_capture_reads_the_jobs_escrow_left_from_one_row_however_many_runs_the_job_has_paid(buyer, host):
    credit(buyer, 10_000)
    job, other_job = uuid.uuid4(), uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=5_000)
    escrow_hold(job_id=other_job, buyer=buyer, amount_minor=4_000)
    for _ in range(60):
        capture(job, buyer, host, 7)
    with CaptureQueriesContext(connection) as queries:
        capture(job, buyer, host, 7)
    # Summing the job's entries grew with every run it had paid: paying n runs read O(n^2) rows.
    assert not [q["sql"] for q in queries.captured_queries if 'FROM "billing_entry"' in q["sql"]]
    assert JobEscrow.objects.get(job_id=str(job)).left == 5_000 - 61 * 7
    assert JobEscrow.objects.get(job_id=str(other_job)).left == 4_000
    with pytest.raises(EscrowExhausted):
        capture(job, buyer, host, 5_000 - 61 * 7 + 1)
    assert escrow_release(job_id=job, buyer=buyer) == 5_000 - 61 * 7
    assert JobEscrow.objects.get(job_id=str(job)).left == 0
    assert_ledger_sound()


def test_a_failed_task_captures_nothing(buyer, host):
    credit(buyer, 1000)
    job = uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=1000)
    capture(job, buyer, host, 0)
    assert balance(K.BUYER_ESCROW, buyer) == 1000
    assert not LedgerTransaction.objects.filter(kind="capture").exists()


def test_release_returns_what_the_job_did_not_spend_once(buyer, host):
    credit(buyer, 1000)
    job = uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=800)
    capture(job, buyer, host, 300)
    assert escrow_release(job_id=job, buyer=buyer) == 500
    assert escrow_release(job_id=job, buyer=buyer) == 0
    assert credit_balance(buyer) == 700
    assert balance(K.BUYER_ESCROW, buyer) == 0
    with pytest.raises(EscrowExhausted):
        capture(job, buyer, host, 1)


def test_earnings_mature_after_the_verification_window_except_for_withheld_owners(buyer, host, other_buyer):
    from tests.factories import HostFactory

    other_host: Any = HostFactory()
    credit(buyer, 2000)
    job = uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=2000)
    capture(job, buyer, host, 1000)
    capture(job, buyer, other_host, 1000)
    now = timezone.now()
    assert earnings_mature(now=now + timedelta(seconds=3500)) == 0
    later = now + timedelta(seconds=3700)
    assert earnings_mature(now=later, withheld_owner_ids={other_host.owner_id}) == 850
    assert earnings_mature(now=later, withheld_owner_ids={other_host.owner_id}) == 0
    assert balance(K.HOST_AVAILABLE, host.owner) == 850
    assert balance(K.HOST_PENDING, other_host.owner) == 850
    assert earnings_mature(now=later) == 850
    assert balance(K.HOST_AVAILABLE, other_host.owner) == 850
    assert_ledger_sound()


def test_a_share_clawed_back_before_it_matures_never_matures_and_the_hosts_other_shares_still_do(buyer, host):
    credit(buyer, 2000)
    job = uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=2000)
    wrong, right = uuid.uuid4(), uuid.uuid4()
    capture(job, buyer, host, 1000, run=wrong)
    capture(job, buyer, host, 1000, run=right)
    assert run_payment_reverse(run_id=wrong, buyer=buyer, reason="found wrong") == 850
    later = timezone.now() + timedelta(seconds=3700)
    assert earnings_mature(now=later) == 850  # the right run's share; the wrong one's is gone
    assert earnings_mature(now=later) == 0
    assert (balance(K.HOST_PENDING, host.owner), balance(K.HOST_AVAILABLE, host.owner)) == (0, 850)
    assert_ledger_sound()


def test_a_run_found_wrong_after_its_share_matured_takes_nothing_from_the_hosts_other_pending_shares(
    buyer, host
):
    credit(buyer, 2000)
    job = uuid.uuid4()
    escrow_hold(job_id=job, buyer=buyer, amount_minor=2000)
    wrong = uuid.uuid4()
    capture(job, buyer, host, 1000, run=wrong)
    now = timezone.now()
    assert earnings_mature(now=now + timedelta(seconds=3700)) == 850
    capture(job, buyer, host, 1000)  # a later run, still pending
    # The matured share is the platform's loss, not the later run's: that one matures in full.
    assert run_payment_reverse(run_id=wrong, buyer=buyer, reason="found wrong") == 0
    assert credit_balance(buyer) == 1000  # the buyer is refunded either way
    assert earnings_mature(now=now + timedelta(seconds=7400)) == 850
    assert (balance(K.HOST_PENDING, host.owner), balance(K.HOST_AVAILABLE, host.owner)) == (0, 1700)
    assert_ledger_sound()


def test_a_hosts_share_of_a_check_the_platform_paid_for_matures_like_a_buyers_capture(host):
    platform_run_pay(
        run_id=uuid.uuid4(), job_id=uuid.uuid4(), host_owner=host.owner, host_id=host.id, amount_minor=1000
    )
    assert balance(K.HOST_PENDING, host.owner) == 850
    later = timezone.now() + timedelta(seconds=3700)
    assert earnings_mature(now=later) == 850
    assert earnings_mature(now=later) == 0
    assert (balance(K.HOST_PENDING, host.owner), balance(K.HOST_AVAILABLE, host.owner)) == (0, 850)
    assert_ledger_sound()
