"""The money invariants over random histories of real jobs: submit (held or 402), hosts running tasks
at their own prices (honestly, failing, or cheating), strikes that reverse a cheater's unchecked pay,
results reported again, cancels; and top-ups, refunds, maturing and payouts from the ledger machine."""

from __future__ import annotations

import pytest
from django.db.models import Sum
from django.test import override_settings
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule, run_state_machine_as_test

from hearth_agent import protocol
from marketplace.billing.errors import InsufficientCredit
from marketplace.billing.models import Entry, LedgerTransaction
from marketplace.billing.selectors import job_cost
from marketplace.billing.services import credit_balance, credit_grant
from marketplace.hosts.models import Host
from marketplace.jobs.metering import run_pay
from marketplace.jobs.models import Job, Task
from marketplace.jobs.services import check_job_spec, job_cancel, job_submit, task_fail
from marketplace.jobs.states import JOB_ACTIVE
from marketplace.trust.services import strike
from tests import fake_runs as fr
from tests.billing.conftest import payable_owner
from tests.billing.test_ledger_state_machine import MoneyMachine
from tests.factories import UserFactory

PRICES = (500, 2000, 1000)  # per 1k items: a cheap host, a dear one that may cheat, a trusted judge


class JobMoneyMachine(MoneyMachine):
    """MoneyMachine's top-up, refund, maturing and payout rules and invariants, with its escrow rules
    replaced by real jobs (`open_jobs` maps a job id to (buyer, its hold))."""

    def __init__(self) -> None:
        super().__init__()
        for buyer in self.buyers:  # a trial credit (platform fees → credit), so jobs run from step one
            credit_grant(user=buyer, amount_minor=5000, key=f"trial:{buyer.pk}", memo="trial")

    @rule(
        buyer=st.integers(0, 1),
        items=st.integers(1, 60),
        task_size=st.integers(1, 20),
        max_price=st.sampled_from([0, 400, 1000, 2500, 100_000]),
        redundant=st.booleans(),
    )
    def submit_job(self, buyer: int, items: int, task_size: int, max_price: int, redundant: bool) -> None:
        user = self.buyers[buyer]
        available, jobs_before = credit_balance(user), Job.objects.count()
        spec = check_job_spec(
            model_name="all-MiniLM-L6-v2",
            inputs=[f"item {i}" for i in range(items)],
            task_size=task_size,
            max_price_per_1k_minor=max_price,
            **({"verification": "redundant", "replicas": 2} if redundant else {}),
        )
        try:
            job = job_submit(buyer=user, spec=spec)
        except InsufficientCredit as refused:
            assert refused.shortfall_minor > 0 and Job.objects.count() == jobs_before
            assert credit_balance(user) == available
            return
        assert job.escrow_minor <= available
        assert credit_balance(user) == available - job.escrow_minor
        self.open_jobs[str(job.pk)] = (user, job.escrow_minor)

    @rule(host=st.integers(0, 2))
    def task_verified(self, host: int) -> None:
        with override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0):
            fr.run(self.hosts[host])

    @rule()
    def task_answered_wrongly(self) -> None:
        with override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0):
            fr.run(self.hosts[1], answer=fr.cheat_random)

    @rule()
    def cheater_caught(self) -> None:
        """The cheat fails a known-answer task: its unchecked results in running jobs are re-run by
        the honest hosts (and the trusted judge breaks ties); those found wrong have their pay reversed."""
        strike(host_id=self.hosts[1].pk, kind="canary", evidence="failed a known-answer task")
        # The judge stays trusted (its score is recomputed as it works; here it must break ties).
        Host.objects.filter(pk=self.hosts[2].pk).update(reliability=1.0)
        with override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0):
            for _ in range(20):
                if not fr.run(self.hosts[0]) + fr.run(self.hosts[2]):
                    break

    # Rules pick among database rows by an index drawn up front: what Hypothesis draws must not
    # depend on state it cannot replay exactly (row ids are random UUIDs).
    @rule(pick=st.integers(0, 49))
    def task_verified_reported_again(self, pick: int) -> None:
        paid = list(
            Task.objects.filter(paid_minor__isnull=False)
            .order_by("job__created_at", "index", "attempt")
            .values_list("pk", flat=True)[:50]
        )
        if not paid:
            return
        before = Entry.objects.count()
        assert run_pay(task_id=paid[pick % len(paid)]) == 0
        assert Entry.objects.count() == before

    @rule(host=st.integers(0, 1))
    def task_failed(self, host: int) -> None:
        before = Entry.objects.count()
        for assignment in fr.claim(self.hosts[host]):
            payload = protocol.TaskFailedPayload(
                task_id=str(assignment.task_id),
                lease_id=str(assignment.lease_id),
                reason="CUDA out of memory",
            )
            task_fail(host_id=self.hosts[host].pk, payload=payload)
        failed_jobs = Job.objects.filter(pk__in=list(self.open_jobs), status="failed").count()
        if not failed_jobs:
            assert Entry.objects.count() == before  # no pay for a failure (only a failed job's release)

    @rule(pick=st.integers(0, 19))
    def job_finished_or_cancelled(self, pick: int) -> None:
        if not self.open_jobs:
            return
        job_id = list(self.open_jobs)[pick % len(self.open_jobs)]  # in submit order
        job_cancel(job=Job.objects.get(pk=job_id))

    # ---- invariants -----------------------------------------------------------------

    @invariant()
    def each_jobs_escrow_is_what_was_held_minus_captures_and_releases(self) -> None:
        for job_id, (_buyer, hold) in list(self.open_jobs.items()):
            job = Job.objects.get(pk=job_id)
            # The selector behind the API's `cost` (job_summary's other parts read hosts, tasks and
            # energy, and cost this machine half its run).
            cost = job_cost(job_id=str(job.pk), buyer_id=job.buyer_id)
            captured = cost["charged_minor"] + cost["reversed_minor"]
            assert cost["held_minor"] == hold and captured <= hold
            buyer_paid = Task.objects.filter(job=job, paid_by_buyer=True).aggregate(s=Sum("paid_minor"))["s"]
            assert captured == (buyer_paid or 0)
            assert cost["in_escrow_minor"] == hold - captured - cost["released_minor"]
            if job.status not in JOB_ACTIVE:
                assert cost["in_escrow_minor"] == 0, (job.status, cost)
                del self.open_jobs[job_id]

    @invariant()
    def a_run_is_paid_at_most_once_and_never_for_a_known_answer_task(self) -> None:
        kinds = ("capture", "platform_run")
        runs = LedgerTransaction.objects.filter(kind__in=kinds).values_list("run_id", flat=True)
        assert len(runs) == len(set(runs))
        assert not Task.objects.filter(role="canary", paid_minor__isnull=False).exists()


@pytest.mark.timeout(900)
def test_money_invariants_hold_over_random_histories_of_real_jobs(db, fake_stripe, catalog):
    JobMoneyMachine.fake = fake_stripe
    JobMoneyMachine.buyers = [UserFactory(role="buyer"), UserFactory(role="buyer")]
    JobMoneyMachine.hosts = [
        fr.host(policy={"price_per_1k_items_minor": price}, slots=3, reliability=1.0) for price in PRICES
    ]
    for host in JobMoneyMachine.hosts:
        payable_owner(fake_stripe, host.owner)
    run_state_machine_as_test(
        JobMoneyMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
