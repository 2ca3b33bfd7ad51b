"""Whose task a host gets: fair shares across buyers, priority within a buyer, region, deadlines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from marketplace.billing.selectors import balances_for_user
from marketplace.jobs.models import Job, Task
from marketplace.jobs.services import jobs_fail_past_deadline
from marketplace.matching.scoring import BuyerQueue, fair_shares
from marketplace.matching.services import tasks_claim_for_host
from tests.fake_runs import claim, host, job

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _queue(leased: int, queued: int, minutes: int = 0) -> BuyerQueue:
    return BuyerQueue(leased=leased, queued=queued, oldest=T0 + timedelta(minutes=minutes))


@pytest.mark.parametrize(
    ("queues", "slots", "shares"),
    [
        ({}, 4, {}),
        ({"big": _queue(0, 200), "small": _queue(0, 1, minutes=5)}, 2, {"big": 1, "small": 1}),
        ({"big": _queue(0, 200), "small": _queue(0, 1, minutes=5)}, 8, {"big": 7, "small": 1}),
        # The buyer with most in flight waits until the others catch up.
        ({"busy": _queue(5, 50), "idle": _queue(0, 50, minutes=5)}, 4, {"idle": 4}),
        ({"busy": _queue(2, 50), "idle": _queue(0, 50, minutes=5)}, 4, {"busy": 1, "idle": 3}),
        # Equal loads: the buyer who has waited longer goes first.
        ({"late": _queue(0, 9, minutes=5), "early": _queue(0, 9)}, 1, {"early": 1}),
        # Fewer tasks waiting than slots: everything is given, nothing more.
        ({"a": _queue(0, 1), "b": _queue(0, 2)}, 10, {"a": 1, "b": 2}),
    ],
)
def test_slots_go_one_at_a_time_to_the_buyer_with_the_fewest_tasks_in_flight(
    queues: dict[str, BuyerQueue], slots: int, shares: dict[str, int]
) -> None:
    assert fair_shares(queues, slots) == shares


def _buyers_of(assignments: list[Any]) -> list[int]:
    return [Task.objects.get(pk=a.task_id).job.buyer_id for a in assignments]


@pytest.mark.django_db
def test_a_big_job_cannot_starve_a_small_job_of_another_buyer_submitted_later(
    buyer: Any, other_buyer: Any, catalog: Any
) -> None:
    big = job(buyer, n=200, task_size=1)
    small = job(other_buyer, n=1, task_size=1)
    assert big.created_at <= small.created_at
    machine = host(slots=2)
    first_round = claim(machine)
    assert sorted(_buyers_of(first_round)) == sorted([buyer.pk, other_buyer.pk])
    assert Task.objects.get(job=small).status == "leased"


@pytest.mark.django_db
def test_buyers_with_equal_loads_share_a_round_evenly(buyer: Any, other_buyer: Any, catalog: Any) -> None:
    job(buyer, n=10, task_size=1)
    job(other_buyer, n=10, task_size=1)
    assignments = claim(host(slots=4))
    assert sorted(_buyers_of(assignments)) == sorted([buyer.pk] * 2 + [other_buyer.pk] * 2)


@pytest.mark.django_db
def test_a_buyer_with_tasks_in_flight_elsewhere_yields_to_one_without(
    buyer: Any, other_buyer: Any, catalog: Any
) -> None:
    job(buyer, n=10, task_size=1)
    assert _buyers_of(claim(host(slots=2))) == [buyer.pk, buyer.pk]
    job(other_buyer, n=10, task_size=1)
    assert _buyers_of(claim(host(slots=2))) == [other_buyer.pk, other_buyer.pk]
    assert sorted(_buyers_of(claim(host(slots=2)))) == sorted([buyer.pk, other_buyer.pk])


@pytest.mark.django_db
def test_within_a_buyer_the_higher_priority_job_goes_first(buyer: Any, catalog: Any) -> None:
    job(buyer, n=4, task_size=1, priority=2)
    urgent = job(buyer, n=1, task_size=1, priority=9)
    [assignment] = claim(host(slots=1))
    assert Task.objects.get(pk=assignment.task_id).job_id == urgent.pk


@pytest.mark.django_db
def test_priority_does_not_jump_ahead_of_another_buyers_fair_share(
    buyer: Any, other_buyer: Any, catalog: Any
) -> None:
    job(buyer, n=4, task_size=1, priority=0)
    job(other_buyer, n=4, task_size=1, priority=9)
    assert sorted(_buyers_of(claim(host(slots=2)))) == sorted([buyer.pk, other_buyer.pk])


@pytest.mark.django_db
def test_a_job_that_asks_a_region_goes_only_to_a_host_in_it(buyer: Any, catalog: Any) -> None:
    regional = job(buyer, n=2, task_size=1, region="eu-west")
    assert claim(host(region="us-east")) == []
    assert claim(host()) == []
    assert len(claim(host(region="eu-west"))) == 2
    assert Task.objects.filter(job=regional, status="leased").count() == 2


@pytest.mark.django_db
def test_a_job_without_a_region_goes_to_any_host(buyer: Any, catalog: Any) -> None:
    job(buyer, n=1, task_size=1)
    assert len(claim(host(region="us-east"))) == 1


@pytest.mark.django_db
def test_the_lease_keeps_the_hosts_price(buyer: Any, catalog: Any) -> None:
    job(buyer, n=1, task_size=1, max_price_per_1k_minor=80)
    assert claim(host(policy={"price_per_1k_items_minor": 90})) == []
    [assignment] = claim(host(policy={"price_per_1k_items_minor": 30}))
    assert Task.objects.get(pk=assignment.task_id).price_per_1k_minor == 30


@pytest.mark.django_db
def test_a_queued_job_past_its_deadline_is_not_started(buyer: Any, catalog: Any) -> None:
    late = job(buyer, n=1, task_size=1, deadline=(timezone.now() + timedelta(minutes=5)).isoformat())
    machine = host()
    after = timezone.now() + timedelta(minutes=6)
    assert tasks_claim_for_host(host_id=machine.pk, channel_name=machine.channel_name, now=after) == []
    late.refresh_from_db()
    assert late.status == "queued"


@pytest.mark.django_db
def test_the_sweep_fails_a_queued_job_past_its_deadline_and_releases_its_escrow(
    buyer: Any, catalog: Any
) -> None:
    credit = balances_for_user(user=buyer)["buyer_credit_minor"]
    late = job(buyer, n=4, task_size=2, deadline=(timezone.now() + timedelta(minutes=5)).isoformat())
    on_time = job(buyer, n=2, task_size=2, deadline=(timezone.now() + timedelta(hours=5)).isoformat())
    open_ended = job(buyer, n=2, task_size=2)
    assert late.escrow_minor > 0
    after = timezone.now() + timedelta(minutes=6)

    assert jobs_fail_past_deadline(now=after) == 1
    assert jobs_fail_past_deadline(now=after) == 0  # safe to run twice

    late.refresh_from_db()
    assert (late.status, late.failure_reason) == ("failed", "deadline passed")
    assert set(Task.objects.filter(job=late).values_list("status", flat=True)) == {"failed"}
    assert Job.objects.get(pk=on_time.pk).status == "queued"
    assert Job.objects.get(pk=open_ended.pk).status == "queued"
    held_by_others = on_time.escrow_minor + open_ended.escrow_minor
    assert balances_for_user(user=buyer)["buyer_credit_minor"] == credit - held_by_others


@pytest.mark.django_db
def test_the_sweep_leaves_a_started_job_alone_after_its_deadline(buyer: Any, catalog: Any) -> None:
    started = job(buyer, n=2, task_size=1, deadline=(timezone.now() + timedelta(minutes=5)).isoformat())
    claim(host(slots=1))
    assert jobs_fail_past_deadline(now=timezone.now() + timedelta(minutes=6)) == 0
    started.refresh_from_db()
    assert started.status == "running"
    # Its remaining task is still dispatched: the deadline is about starting.
    machine = host(slots=1)
    after = timezone.now() + timedelta(minutes=6)
    assert len(tasks_claim_for_host(host_id=machine.pk, channel_name=machine.channel_name, now=after)) == 1
