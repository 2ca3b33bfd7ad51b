"""What claims and results cost the server's database thread: work it can tell it does not need is
skipped (the buyers' leases counted when nobody contests the slots, a result's vectors read back
and written a second time), and the outcome is the same."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

import marketplace.matching.services as matching
from marketplace.jobs.models import Task
from marketplace.jobs.services import task_result_accept
from marketplace.matching.services import tasks_claim_batch
from tests.factories import HostFactory
from tests.fake_runs import claim, honest, job, payload

pytestmark = pytest.mark.django_db


@pytest.fixture
def leases_counted(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Each time a claim counts the buyers' leases, the buyers it counted."""
    calls: list[list[int]] = []
    count = matching._buyers_in_flight

    def spy(buyer_ids: Any) -> dict[int, int]:
        calls.append(sorted(buyer_ids))
        return count(buyer_ids)

    monkeypatch.setattr(matching, "_buyers_in_flight", spy)
    return calls


def test_a_claim_with_one_buyer_waiting_leases_without_counting_the_buyers_leases(
    buyer: Any, catalog: Any, leases_counted: list[list[int]]
) -> None:
    job(buyer, n=6, task_size=2)
    host = HostFactory.create(slots=2)
    assert len(claim(host)) == 2
    assert leases_counted == []
    assert Task.objects.filter(leased_to=host, status="leased").count() == 2


def test_a_round_whose_waiting_tasks_all_fit_does_not_count_the_buyers_leases(
    buyer: Any, other_buyer: Any, catalog: Any, leases_counted: list[list[int]]
) -> None:
    job(buyer, n=2, task_size=1)
    job(other_buyer, n=2, task_size=1)
    HostFactory.create_batch(2, slots=2)
    got = tasks_claim_batch()
    assert sum(map(len, got.values())) == 4
    assert leases_counted == []


def test_two_buyers_contesting_one_slot_still_have_their_leases_counted(
    buyer: Any, other_buyer: Any, catalog: Any, leases_counted: list[list[int]]
) -> None:
    job(buyer, n=4, task_size=1)
    busy = HostFactory.create(slots=1)
    assert len(claim(busy)) == 1  # the first buyer now has a task in flight
    job(other_buyer, n=4, task_size=1)
    leases_counted.clear()
    host = HostFactory.create(slots=1)
    [assignment] = claim(host)
    assert leases_counted == [sorted([buyer.pk, other_buyer.pk])]
    # The slot goes to the buyer with nothing in flight, though the other's job is older.
    assert Task.objects.get(pk=assignment.task_id).job.buyer_id == other_buyer.pk


def test_a_result_accepted_unchecked_writes_its_vectors_once(buyer: Any, catalog: Any, host: Any) -> None:
    job(buyer, n=2, task_size=2)
    [assignment] = claim(host)
    vectors = honest(assignment.inputs)
    with CaptureQueriesContext(connection) as captured:
        outcome = task_result_accept(host_id=host.pk, payload=payload(assignment, vectors))
    assert outcome.accepted and outcome.job_finished
    writes = [
        q["sql"]
        for q in captured.captured_queries
        if q["sql"].startswith("UPDATE") and '"output" =' in q["sql"]
    ]
    assert len(writes) == 1, writes
    task = Task.objects.get(pk=assignment.task_id)
    raw = vectors.astype("<f4").tobytes()
    assert (task.settled, task.verdict, task.output) == (True, "unchecked", raw)
    assert task.output_sha256 == hashlib.sha256(raw).hexdigest()
