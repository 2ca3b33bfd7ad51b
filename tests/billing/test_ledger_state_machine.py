"""Random sequences of everything money does, with the ledger's invariants checked after every step.

Top-ups (paid through the fake Stripe and its signed webhook), holds at job
submit, captures of verified runs (some reported twice), failed tasks, releases,
maturing, payouts and refunds. Money in is counted from the fake Stripe's side
(paid sessions minus refunds, transfers out), not from the ledger under test.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from marketplace.billing.errors import EscrowExhausted, InsufficientCredit
from marketplace.billing.fake_stripe import FakeStripe
from marketplace.billing.models import Account, Entry, LedgerTransaction, Payout, TopUp
from marketplace.billing.services import (
    credit_balance,
    earnings_mature,
    escrow_capture,
    escrow_hold,
    escrow_release,
    payouts_run,
    stripe_webhook_receive,
    topup_create,
)
from tests.billing.conftest import WEBHOOK_SECRET, assert_ledger_sound, payable_owner
from tests.factories import HostFactory, UserFactory

K = Account.Kind


class MoneyMachine(RuleBasedStateMachine):
    fake: FakeStripe
    buyers: list[Any]
    hosts: list[Any]

    def __init__(self) -> None:
        super().__init__()
        # Each example runs in a savepoint that teardown rolls back; the fake Stripe
        # keeps its objects, so the checks count only this example's.
        self._atomic = transaction.atomic()
        self._atomic.__enter__()
        self.now = timezone.now()
        self.sessions: list[str] = []
        self.paid_intents: list[str] = []
        self.open_jobs: dict[str, tuple[Any, int]] = {}  # job id → (buyer, escrow left by our own count)
        self.captured_runs: list[tuple[str, str, Any, Any, int]] = []
        self.events_seen = len(self.fake.events)

    def teardown(self) -> None:
        transaction.set_rollback(True)
        self._atomic.__exit__(None, None, None)

    def _deliver_new_events(self) -> None:
        for event in self.fake.events[self.events_seen :]:
            payload, signature = self.fake.signed(event, WEBHOOK_SECRET)
            stripe_webhook_receive(payload=payload, signature=signature)
        self.events_seen = len(self.fake.events)

    # ---- rules -----------------------------------------------------------------

    @rule(buyer=st.integers(0, 1), amount=st.integers(500, 20_000))
    def top_up(self, buyer: int, amount: int) -> None:
        topup = topup_create(user=self.buyers[buyer], amount_minor=amount)
        assert topup.session_id is not None
        self.sessions.append(topup.session_id)
        session = self.fake.pay_session(topup.session_id)
        self.paid_intents.append(session["payment_intent"])
        before = credit_balance(self.buyers[buyer])
        self._deliver_new_events()
        assert credit_balance(self.buyers[buyer]) == before + amount

    @rule(buyer=st.integers(0, 1), amount=st.integers(1, 12_000))
    def submit_job(self, buyer: int, amount: int) -> None:
        user = self.buyers[buyer]
        available = credit_balance(user)
        job = str(uuid.uuid4())
        try:
            escrow_hold(job_id=job, buyer=user, amount_minor=amount)
        except InsufficientCredit as refused:
            assert amount > available
            assert refused.shortfall_minor == amount - available
            return
        assert amount <= available
        self.open_jobs[job] = (user, amount)

    @precondition(lambda self: self.open_jobs)
    @rule(data=st.data(), host=st.integers(0, 1), amount=st.integers(1, 5_000))
    def task_verified(self, data: st.DataObject, host: int, amount: int) -> None:
        job = data.draw(st.sampled_from(sorted(self.open_jobs)))
        buyer, left = self.open_jobs[job]
        run = str(uuid.uuid4())
        owner = self.hosts[host].owner
        try:
            escrow_capture(
                run_id=run,
                job_id=job,
                buyer=buyer,
                host_owner=owner,
                host_id=self.hosts[host].id,
                amount_minor=amount,
            )
        except EscrowExhausted:
            assert amount > left
            return
        assert amount <= left
        self.open_jobs[job] = (buyer, left - amount)
        self.captured_runs.append((run, job, buyer, self.hosts[host], amount))

    @precondition(lambda self: self.captured_runs)
    @rule(data=st.data())
    def task_verified_reported_again(self, data: st.DataObject) -> None:
        run, job, buyer, host, amount = data.draw(st.sampled_from(self.captured_runs))
        before = Entry.objects.count()
        escrow_capture(
            run_id=run, job_id=job, buyer=buyer, host_owner=host.owner, host_id=host.id, amount_minor=amount
        )
        assert Entry.objects.count() == before

    @precondition(lambda self: self.open_jobs)
    @rule(data=st.data())
    def task_failed(self, data: st.DataObject) -> None:
        """A wrong or failed result: the run is not paid (the lead captures 0 or nothing)."""
        job = data.draw(st.sampled_from(sorted(self.open_jobs)))
        buyer, _ = self.open_jobs[job]
        before = Entry.objects.count()
        escrow_capture(
            run_id=uuid.uuid4(),
            job_id=job,
            buyer=buyer,
            host_owner=self.hosts[0].owner,
            host_id="h",
            amount_minor=0,
        )
        assert Entry.objects.count() == before

    @precondition(lambda self: self.open_jobs)
    @rule(data=st.data())
    def job_finished_or_cancelled(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(sorted(self.open_jobs)))
        buyer, left = self.open_jobs.pop(job)
        assert escrow_release(job_id=job, buyer=buyer) == left
        assert escrow_release(job_id=job, buyer=buyer) == 0

    @rule(withhold_second_owner=st.booleans())
    def verification_window_passes(self, withhold_second_owner: bool) -> None:
        self.now += timedelta(seconds=3601)
        withheld = {self.hosts[1].owner_id} if withhold_second_owner else set()
        earnings_mature(now=self.now, withheld_owner_ids=withheld)

    @rule()
    def payouts(self) -> None:
        payouts_run(now=self.now)

    @precondition(lambda self: self.paid_intents)
    @rule(data=st.data(), part=st.sampled_from([None, 0.1, 0.5]))
    def refund(self, data: st.DataObject, part: float | None) -> None:
        intent = data.draw(st.sampled_from(self.paid_intents))
        charge = self.fake.objects[self.fake.objects[intent]["latest_charge"]]
        left = charge["amount"] - charge["amount_refunded"]
        if left <= 0:
            return
        amount = left if part is None else max(1, int(left * part))
        self.fake.refund(intent, amount)
        self._deliver_new_events()

    # ---- invariants ---------------------------------------------------------------

    @invariant()
    def ledger_is_sound(self) -> None:
        assert_ledger_sound()

    @invariant()
    def money_in_equals_money_held_spent_and_paid(self) -> None:
        fake = self.fake
        sessions = [fake.objects[s] for s in self.sessions]
        paid_in = sum(s["amount_total"] for s in sessions if s["payment_status"] == "paid")
        intents = {s["payment_intent"] for s in sessions if s["payment_intent"]}
        refunded = sum(r["amount"] for r in fake.of_type("refund") if r["payment_intent"] in intents)
        keys = set(Payout.objects.values_list("idempotency_key", flat=True))
        paid_out = sum(t["amount"] for t in fake.of_type("transfer") if t["transfer_group"] in keys)

        def total(kind: str) -> int:
            return int(Account.objects.filter(kind=kind).aggregate(s=Sum("balance"))["s"] or 0)

        held_and_spent = (
            total(K.BUYER_CREDIT)
            + total(K.BUYER_ESCROW)
            + total(K.HOST_PENDING)
            + total(K.HOST_AVAILABLE)
            + total(K.PAYOUTS_IN_TRANSIT)
            + paid_out
            + total(K.PLATFORM_FEES)
        )
        assert paid_in - refunded == held_and_spent
        assert (TopUp.objects.aggregate(s=Sum("refunded_minor"))["s"] or 0) == refunded

    @invariant()
    def each_jobs_escrow_is_what_was_held_minus_captures_and_releases(self) -> None:
        for job, (buyer, left) in self.open_jobs.items():
            held = Entry.objects.filter(
                account__kind=K.BUYER_ESCROW, account__owner=buyer, transaction__job_id=job
            ).aggregate(s=Sum("amount"))["s"]
            assert (held or 0) == left

    @invariant()
    def one_transfer_per_paid_payout(self) -> None:
        for payout in Payout.objects.all():
            transfers = [
                t for t in self.fake.of_type("transfer") if t["transfer_group"] == payout.idempotency_key
            ]
            assert len(transfers) == (1 if payout.status == Payout.Status.PAID else 0)
        assert (
            LedgerTransaction.objects.filter(kind="payout_settle").count()
            == Payout.objects.filter(status=Payout.Status.PAID).count()
        )


@pytest.mark.timeout(600)
def test_money_invariants_hold_after_every_step_of_random_histories(db, fake_stripe):
    MoneyMachine.fake = fake_stripe
    MoneyMachine.buyers = [UserFactory(role="buyer"), UserFactory(role="buyer")]
    MoneyMachine.hosts = [HostFactory(), HostFactory()]
    for host in MoneyMachine.hosts:
        payable_owner(fake_stripe, host.owner)
    run_state_machine_as_test(
        MoneyMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
