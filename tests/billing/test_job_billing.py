"""Jobs and money: the worst case held at submit (or 402), each accepted run paid once at its host's
price, checks the platform adds paid by the platform, canaries unpaid, a wrong run's payment taken
back, and the rest of the escrow released when the job ends — with the ledger sound after each."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from marketplace.billing.models import Account, LedgerTransaction
from marketplace.hosts.models import Host
from marketplace.jobs.metering import escrow_worst_case, run_pay
from marketplace.jobs.models import Job, Task
from marketplace.jobs.selectors import job_summary
from marketplace.jobs.services import job_cancel
from tests import fake_runs as fr
from tests.billing.conftest import assert_ledger_sound, balance
from tests.conftest import funded_buyer
from tests.fake_runs import cheat_random

pytestmark = pytest.mark.django_db
K = Account.Kind
NO_CANARIES = override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0)


@pytest.fixture
def buyer(db: Any) -> Any:
    return funded_buyer()


@pytest.fixture(autouse=True)
def fifteen_percent_fee(settings: Any) -> None:
    settings.HEARTH_PLATFORM_FEE_BPS = 1500


def priced_host(price_per_1k_minor: int, **fields: Any) -> Host:
    return fr.host(policy={"price_per_1k_items_minor": price_per_1k_minor}, **fields)


def run_until_idle(*hosts: Host, answer: Any = fr.honest) -> None:
    with NO_CANARIES:
        while sum(fr.run(host, answer=answer) for host in hosts):
            pass


def test_the_worst_case_is_every_planned_item_at_the_max_price_rounded_up() -> None:
    assert escrow_worst_case(item_counts=[10, 10, 5], max_price_per_1k_minor=500) == 13  # 12.5 → 13
    assert escrow_worst_case(item_counts=[1000], max_price_per_1k_minor=7) == 7
    assert escrow_worst_case(item_counts=[3], max_price_per_1k_minor=0) == 0


def test_a_job_the_credit_cannot_cover_is_refused_with_402_naming_the_shortfall_and_nothing_is_stored(
    catalog: Any,
) -> None:
    from rest_framework.test import APIClient

    from marketplace.accounts.services import api_key_create

    poor = funded_buyer(credit_minor=1000)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=poor, name='t').plaintext}")
    response = client.post(
        "/api/v1/jobs",
        {"model": "all-MiniLM-L6-v2", "inputs": ["a", "b"] * 10, "max_price_per_1k_minor": 100_000},
        format="json",
    )
    assert response.status_code == 402, response.content
    body = response.json()
    assert body["shortfall_minor"] == 1000  # 20 items × 1000.00 per 1k = 2000; credit 1000
    assert "10.00 USD" in body["detail"]
    assert Job.objects.count() == 0 and Task.objects.count() == 0
    assert balance(K.BUYER_CREDIT, poor) == 1000 and balance(K.BUYER_ESCROW, poor) == 0
    assert_ledger_sound()


def test_a_max_price_that_is_not_a_whole_number_of_minor_units_is_a_400_naming_the_field(
    api: Any, catalog: Any
) -> None:
    for bad in (1.5, -1, "cheap", 10**9):
        response = api.post(
            "/api/v1/jobs",
            {"model": "all-MiniLM-L6-v2", "inputs": ["a"], "max_price_per_1k_minor": bad},
            format="json",
        )
        assert response.status_code == 400, bad
        assert "max_price_per_1k_minor" in response.json(), response.json()
    assert Job.objects.count() == 0


def test_each_accepted_run_is_paid_at_its_hosts_price_with_the_fee_and_the_rest_is_released(
    buyer: Any, catalog: Any
) -> None:
    host = priced_host(1000)
    credit_before = balance(K.BUYER_CREDIT, buyer)
    job = fr.job(buyer, n=30, task_size=10, max_price_per_1k_minor=1500)
    assert job.escrow_minor == 45  # 30 items × 15.00 per 1k
    assert balance(K.BUYER_ESCROW, buyer) == 45
    run_until_idle(host)
    job.refresh_from_db()
    assert job.status == "succeeded"
    cost = job_summary(job=job)["cost"]
    assert cost == {
        "currency": "usd", "held_minor": 45, "charged_minor": 30, "reversed_minor": 0,
        "released_minor": 15, "in_escrow_minor": 0,
    }  # fmt: skip
    assert set(Task.objects.filter(job=job).values_list("price_per_1k_minor", "paid_minor")) == {(1000, 10)}
    assert balance(K.BUYER_CREDIT, buyer) == credit_before - 30
    assert balance(K.HOST_PENDING, host.owner) == 27  # 3 runs × (10 - 1 fee)
    assert LedgerTransaction.objects.filter(kind="capture", job_id=str(job.pk)).count() == 3
    assert_ledger_sound()


def test_fractions_of_a_minor_unit_carry_over_runs_instead_of_being_rounded_up_each_time(
    buyer: Any, catalog: Any
) -> None:
    host = priced_host(7)
    job = fr.job(buyer, n=150, task_size=10, max_price_per_1k_minor=7)  # 15 runs of 0.07
    assert job.escrow_minor == 2  # 1.05 → 2
    run_until_idle(host)
    paid = [p or 0 for p in Task.objects.filter(job=job).values_list("paid_minor", flat=True)]
    assert sum(paid) == 1 and len(paid) == 15  # floor(150 × 7 / 1000), not 15 × ceil(0.07)
    assert job_summary(job=job)["cost"]["charged_minor"] == 1
    assert_ledger_sound()


def test_a_host_asking_more_than_the_jobs_max_gets_none_of_its_tasks(buyer: Any, catalog: Any) -> None:
    dear, cheap = priced_host(200), priced_host(50)
    job = fr.job(buyer, n=4, task_size=2, max_price_per_1k_minor=100)
    assert fr.claim(dear) == []
    run_until_idle(cheap)
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert set(Task.objects.filter(job=job).values_list("completed_by_id", flat=True)) == {cheap.pk}


def test_a_run_is_paid_once_however_often_its_payment_is_asked_for(buyer: Any, catalog: Any) -> None:
    host = priced_host(1000)
    job = fr.job(buyer, n=2, task_size=2, max_price_per_1k_minor=1000)
    run_until_idle(host)
    task = Task.objects.get(job=job)
    before = LedgerTransaction.objects.count()
    assert run_pay(task_id=task.pk) == 0
    assert run_pay(task_id=task.pk) == 0
    assert LedgerTransaction.objects.count() == before
    assert balance(K.HOST_PENDING, host.owner) == 2  # 2 items × 10.00 per 1k = 2; the fee rounds to 0
    assert_ledger_sound()


def test_a_cheater_outvoted_is_not_paid_and_the_tie_break_the_platform_added_is_paid_by_the_platform(
    buyer: Any, catalog: Any
) -> None:
    honest, cheater = priced_host(1000), priced_host(1000)
    job = fr.job(buyer, n=10, task_size=10, verification="redundant", replicas=2, max_price_per_1k_minor=1000)
    assert job.escrow_minor == 20  # two planned runs of 10 items
    fr.run(honest)
    fr.run(cheater, answer=cheat_random)
    judge = priced_host(1000, reliability=1.0)
    run_until_idle(judge)
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert balance(K.HOST_PENDING, cheater.owner) == 0
    assert balance(K.HOST_PENDING, honest.owner) == 9  # 10 from escrow, less the 1 fee
    assert balance(K.HOST_PENDING, judge.owner) == 9  # its share, paid by the platform
    assert LedgerTransaction.objects.filter(kind="platform_run", job_id=str(job.pk)).count() == 1
    cost = job_summary(job=job)["cost"]
    assert (cost["charged_minor"], cost["released_minor"]) == (10, 10)  # the buyer pays one run, not three
    assert_ledger_sound()


def test_known_answer_tasks_are_never_paid(buyer: Any, catalog: Any) -> None:
    fr.canary_bank(catalog)
    newcomer = priced_host(1000, verified_at=None)
    fr.job(buyer, n=4, task_size=2, max_price_per_1k_minor=1000)
    while fr.run(newcomer):
        pass
    assert Task.objects.filter(role="canary", completed_by=newcomer, verdict="passed").exists()
    assert not Task.objects.filter(role="canary", paid_minor__isnull=False).exists()
    paid = Task.objects.filter(role="primary", completed_by=newcomer).values_list("paid_minor", flat=True)
    assert balance(K.HOST_PENDING, newcomer.owner) == sum(p or 0 for p in paid)


def test_cancelling_a_job_pays_what_ran_and_gives_back_the_rest_of_its_escrow(
    buyer: Any, catalog: Any
) -> None:
    host = priced_host(1000, slots=1)
    credit_before = balance(K.BUYER_CREDIT, buyer)
    job = fr.job(buyer, n=40, task_size=10, max_price_per_1k_minor=1000)
    with NO_CANARIES:
        fr.run(host)
    job_cancel(job=job)
    cost = job_summary(job=job)["cost"]
    assert cost == {
        "currency": "usd", "held_minor": 40, "charged_minor": 10, "reversed_minor": 0,
        "released_minor": 30, "in_escrow_minor": 0,
    }  # fmt: skip
    assert balance(K.BUYER_CREDIT, buyer) == credit_before - 10
    assert balance(K.BUYER_ESCROW, buyer) == 0
    assert_ledger_sound()


def test_a_result_accepted_unchecked_then_found_wrong_has_its_payment_taken_back(
    buyer: Any, catalog: Any
) -> None:
    from marketplace.trust.services import strike

    cheater = priced_host(1000, slots=2)
    credit_before = balance(K.BUYER_CREDIT, buyer)
    job = fr.job(buyer, n=40, task_size=10, max_price_per_1k_minor=1000)  # no verification asked
    with NO_CANARIES:
        fr.run(cheater, answer=cheat_random)  # two runs, accepted unchecked and paid
    assert balance(K.HOST_PENDING, cheater.owner) == 18
    strike(host_id=cheater.pk, kind="canary", evidence="failed a known-answer task")
    run_until_idle(priced_host(1000), priced_host(1000, slots=4, reliability=1.0))
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert balance(K.HOST_PENDING, cheater.owner) == 0
    clawbacks = LedgerTransaction.objects.filter(kind="clawback", job_id=str(job.pk))
    assert clawbacks.count() == 2
    cost = job_summary(job=job)["cost"]
    # The buyer paid for the two honest tasks only; the wrong runs were refunded to credit and the
    # checks that found them were the platform's.
    assert (cost["charged_minor"], cost["reversed_minor"]) == (20, 20)
    assert balance(K.BUYER_CREDIT, buyer) == credit_before - 20
    assert_ledger_sound()


def test_an_owner_sees_earnings_per_machine_as_json_and_csv(
    buyer: Any, catalog: Any, host_owner: Any
) -> None:
    from rest_framework.test import APIClient

    from marketplace.accounts.services import api_key_create

    attic = priced_host(1000, owner=host_owner, name="attic-4090")
    den = priced_host(1000, owner=host_owner, name="den-3060", slots=1)
    fr.job(buyer, n=30, task_size=10, max_price_per_1k_minor=1000)
    with NO_CANARIES:
        fr.run(den)  # one run
    run_until_idle(attic)  # the other two
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=host_owner, name='t').plaintext}")
    rows = client.get("/api/v1/billing/statements/machines").json()
    assert [(r["name"], r["runs_paid"], r["earned_minor"], r["clawed_back_minor"]) for r in rows] == [
        ("attic-4090", 2, 18, 0),
        ("den-3060", 1, 9, 0),
    ]
    csv = client.get("/api/v1/billing/statements/machines", {"format": "csv"}).content.decode().splitlines()
    assert csv[0] == "host_id,name,runs_paid,earned_minor,clawed_back_minor,currency"
    assert csv[1].startswith(f"{attic.pk},attic-4090,2,18,0,usd")
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=buyer, name='t').plaintext}")
    assert other.get("/api/v1/billing/statements/machines").json() == []
