"""One dispatch round for many hosts (`tasks_claim_batch`): the single-host claim's rules, kept at scale,
with the match score choosing the host."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from hearth_agent import protocol
from marketplace.gateway.consumers import AgentConsumer
from marketplace.jobs.models import Job, Task
from marketplace.matching.services import Assignment, tasks_claim_batch
from marketplace.trust.verification import replicas_build
from tests.fake_runs import claim, host, job

pytestmark = [
    pytest.mark.django_db,
    # Canaries take a slot at random; these tests count buyer tasks (canaries have their own tests).
    pytest.mark.usefixtures("no_canaries"),
]


@pytest.fixture
def no_canaries() -> Any:
    with override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0):
        yield


def _leased(got: dict[uuid.UUID, list[Assignment]]) -> list[uuid.UUID]:
    return [a.task_id for assignments in got.values() for a in assignments]


def big_job(buyer: Any, catalog: Any, *, items: int, task_size: int) -> Job:
    """A job of `items` short inputs, its tasks written with one bulk_create (what job_submit does,
    without building the inputs one string at a time)."""
    big = Job.objects.create(
        buyer=buyer, model=catalog, task_size=task_size, items_total=items, max_price_per_1k_minor=100
    )
    inputs = ["x"] * task_size
    tasks = [
        Task(job=big, index=i, first_item=i * task_size, inputs=inputs, item_count=task_size, billable=True)
        for i in range(items // task_size)
    ]
    for task in tasks:
        task.group = task.pk
    Task.objects.bulk_create(tasks, batch_size=2000)
    return big


def test_one_round_assigns_tasks_across_many_hosts(buyer: Any, catalog: Any) -> None:
    work = job(buyer, n=40, task_size=1)
    machines = [host(slots=2) for _ in range(20)]
    got = tasks_claim_batch()
    assert set(got) == {machine.pk for machine in machines}
    assert all(len(assignments) == 2 for assignments in got.values())
    assert Task.objects.filter(job=work, status="leased").count() == 40
    work.refresh_from_db()
    assert work.status == "running"


def test_each_lease_names_the_host_that_got_it_and_the_hosts_price(buyer: Any, catalog: Any) -> None:
    job(buyer, n=4, task_size=1)
    machine = host(slots=4, policy={"price_per_1k_items_minor": 30})
    got = tasks_claim_batch()
    for assignment in got[machine.pk]:
        task = Task.objects.get(pk=assignment.task_id)
        assert (task.leased_to_id, task.lease_id, task.price_per_1k_minor) == (
            machine.pk,
            assignment.lease_id,
            30,
        )
        assert task.attempt == 1


def test_no_task_is_leased_twice_across_rounds_and_the_per_host_claim(
    buyer: Any, other_buyer: Any, catalog: Any
) -> None:
    job(buyer, n=30, task_size=1)
    job(other_buyer, n=30, task_size=1)
    machines = [host(slots=3) for _ in range(8)]
    leased = _leased(tasks_claim_batch())
    leased += _leased(tasks_claim_batch())  # every slot is full: nothing more
    leased += [a.task_id for machine in machines for a in claim(machine)]
    assert len(leased) == len(set(leased)) == 24
    assert Task.objects.filter(status="leased").count() == 24


def test_a_round_takes_no_more_than_its_limit(buyer: Any, catalog: Any) -> None:
    job(buyer, n=20, task_size=1)
    [host(slots=4) for _ in range(5)]
    assert len(_leased(tasks_claim_batch(limit=7))) == 7


def test_a_round_keeps_the_region_price_and_memory_filters(buyer: Any, catalog: Any) -> None:
    regional = job(buyer, n=2, task_size=1, region="eu-west")
    thrifty = job(buyer, n=2, task_size=1, max_price_per_1k_minor=40)
    in_region = host(slots=4, region="eu-west", policy={"price_per_1k_items_minor": 90})
    cheap = host(slots=4, policy={"price_per_1k_items_minor": 20})
    host(slots=4, memory_mb=512)  # too small for the model: never gets anything
    host(slots=4, region="us-east", policy={"price_per_1k_items_minor": 90})
    got = tasks_claim_batch()
    by_host = {h: {Task.objects.get(pk=a.task_id).job_id for a in got[h]} for h in got}
    assert by_host == {in_region.pk: {regional.pk}, cheap.pk: {thrifty.pk}}


def test_an_unverified_host_is_left_to_its_own_claim_for_known_answer_tasks(buyer: Any, catalog: Any) -> None:
    job(buyer, n=4, task_size=1)
    host(slots=4, verified_at=None)
    assert tasks_claim_batch() == {}
    assert Task.objects.filter(status="leased").count() == 0


def test_a_host_that_is_not_ready_or_is_offline_or_full_gets_nothing(buyer: Any, catalog: Any) -> None:
    job(buyer, n=8, task_size=1)
    host(slots=2, ready=False)
    host(slots=2, status="offline")
    host(slots=2, draining=True)
    host(slots=2, channel_name="")
    assert tasks_claim_batch() == {}


def test_the_runs_of_the_same_inputs_go_to_different_hosts(buyer: Any, catalog: Any) -> None:
    job(buyer, n=3, task_size=1, verification="redundant", replicas=2)
    alone = host(slots=6)
    got = tasks_claim_batch()
    groups = [Task.objects.get(pk=a.task_id).group for a in got[alone.pk]]
    assert len(groups) == len(set(groups)) == 3
    # The other run of each input waits for another host, and goes there.
    other = host(slots=6)
    again = tasks_claim_batch()
    assert set(again) == {other.pk}
    assert sorted(str(Task.objects.get(pk=a.task_id).group) for a in again[other.pk]) == sorted(
        str(g) for g in groups
    )


def test_a_rerun_of_a_job_without_verification_never_goes_back_to_the_host_that_ran_the_primary(
    buyer: Any, catalog: Any
) -> None:
    # A recheck after a strike (or a tie-break) adds a replica to a job that asked for no verification.
    plain = job(buyer, n=1, task_size=1)
    ran = host(slots=4)
    assert len(tasks_claim_batch()) == 1
    primary = Task.objects.get(job=plain)
    replicas_build(primary=primary, count=1)[0].save(force_insert=True)
    assert tasks_claim_batch() == {}
    other = host(slots=4)
    again = tasks_claim_batch()
    assert list(again) == [other.pk]
    assert Task.objects.get(pk=again[other.pk][0].task_id).group == primary.pk
    assert Task.objects.get(pk=primary.pk).leased_to_id == ran.pk


def _reads_group_runs(queries: CaptureQueriesContext) -> bool:
    return any('SELECT "jobs_task"."group" AS "group"' in query["sql"] for query in queries.captured_queries)


@pytest.mark.parametrize("verification", [{}, {"verification": "spot", "spot_fraction": 1.0}])
def test_a_round_looks_up_earlier_runs_only_for_jobs_whose_inputs_run_more_than_once(
    buyer: Any, catalog: Any, verification: dict[str, Any]
) -> None:
    job(buyer, n=3, task_size=1, **verification)
    host(slots=8)
    with CaptureQueriesContext(connection) as queries:
        assert tasks_claim_batch()
    assert _reads_group_runs(queries) == bool(verification)


def test_a_million_item_job_cannot_starve_a_ten_item_job_of_another_buyer_in_the_first_round(
    buyer: Any, other_buyer: Any, catalog: Any
) -> None:
    big_job(buyer, catalog, items=1_000_000, task_size=100)
    small = job(other_buyer, n=10, task_size=10)
    [host(slots=2) for _ in range(4)]
    got = tasks_claim_batch()
    assert len(_leased(got)) == 8
    assert Task.objects.get(job=small).status == "leased"


def test_a_buyer_with_tasks_in_flight_yields_the_round_to_one_without(
    buyer: Any, other_buyer: Any, catalog: Any
) -> None:
    first = job(buyer, n=10, task_size=1)
    claim(host(slots=4))
    second = job(other_buyer, n=10, task_size=1)
    [host(slots=2) for _ in range(2)]
    tasks_claim_batch()
    assert Task.objects.filter(job=second, status="leased").count() == 4
    assert Task.objects.filter(job=first, status="leased").count() == 4


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        ({"policy": {"price_per_1k_items_minor": 10}}, {"policy": {"price_per_1k_items_minor": 90}}),
        ({"reliability": 0.99}, {"reliability": 0.4}),
        ({"benchmark": {"minilm_items_per_s": 900.0}}, {"benchmark": {"minilm_items_per_s": 20.0}}),
    ],
    ids=["cheaper", "more-reliable", "faster"],
)
def test_the_better_scoring_host_gets_the_task_when_two_could(
    buyer: Any, catalog: Any, better: dict[str, Any], worse: dict[str, Any]
) -> None:
    job(buyer, n=1, task_size=1)
    # The worse host is made first, so host order alone would pick it.
    host(slots=1, **worse)
    chosen = host(slots=1, **better)
    assert list(tasks_claim_batch()) == [chosen.pk]


def test_each_host_hears_of_its_tasks_on_its_own_channel_after_the_round_commits(
    buyer: Any, catalog: Any, django_capture_on_commit_callbacks: Any
) -> None:
    layer = get_channel_layer()
    assert layer is not None
    job(buyer, n=3, task_size=1)
    machines = [host(slots=2, channel_name=async_to_sync(layer.new_channel)()) for _ in range(2)]
    with django_capture_on_commit_callbacks(execute=True):
        got = tasks_claim_batch()
    for machine in machines:
        if machine.pk not in got:
            continue
        message = async_to_sync(layer.receive)(machine.channel_name)
        assert message["type"] == "task.assign"
        assert [a["task_id"] for a in message["assignments"]] == [str(a.task_id) for a in got[machine.pk]]


def test_the_consumer_forwards_a_batch_message_as_task_assign_frames() -> None:
    consumer = AgentConsumer()
    sent: list[str] = []

    async def send(text_data: str) -> None:
        sent.append(text_data)

    consumer.send = send
    assignment = {
        "task_id": str(uuid.uuid4()),
        "lease_id": str(uuid.uuid4()),
        "model_sha256": "0" * 64,
        "model_name": "all-MiniLM-L6-v2",
        "inputs": ["hello"],
        "lease_expires_at": "2030-01-01T00:00:00+00:00",
    }
    asyncio.run(consumer.task_assign({"type": "task.assign", "assignments": [assignment]}))
    [frame] = [protocol.parse_frame(text) for text in sent]
    assert isinstance(frame, protocol.TaskAssign)
    assert frame.payload.task_id == assignment["task_id"]
