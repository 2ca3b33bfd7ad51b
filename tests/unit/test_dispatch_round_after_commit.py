"""Work that is queued (a submit, a requeue) goes out in one dispatch round after the commit, to the
best free hosts, each told on its own channel; no host is poked to claim for itself. The round and a
host's own claim lock the host row, so the two never fill the same slots."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection, connections
from django.test import override_settings

from marketplace.config.celery import app as celery_app
from marketplace.hosts.models import Host
from marketplace.jobs.models import Task
from marketplace.jobs.states import TaskStatus
from marketplace.matching.services import tasks_claim_batch, tasks_claim_for_host
from marketplace.matching.tasks import dispatch_round
from tests.fake_runs import host, job
from tests.locks import held_elsewhere


@pytest.fixture
def no_canaries() -> Iterator[None]:
    with override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0):
        yield


@pytest.fixture
def rounds_run_here() -> Iterator[None]:
    """The round runs in this process when the commit enqueues it (as with HEARTH_BACKGROUND=inprocess),
    whatever broker this run configures."""
    eager = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    try:
        yield
    finally:
        celery_app.conf.task_always_eager = eager


@pytest.mark.django_db
@pytest.mark.usefixtures("no_canaries", "rounds_run_here")
def test_a_submitted_job_goes_out_in_one_round_after_the_commit_each_host_told_on_its_own_channel(
    buyer: Any, catalog: Any, django_capture_on_commit_callbacks: Any
) -> None:
    layer = get_channel_layer()
    assert layer is not None
    machines = [host(slots=2, channel_name=async_to_sync(layer.new_channel)()) for _ in range(2)]
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        work = job(buyer, n=3, task_size=1)
    # The round (enqueued by the submit's commit), then the messages it sends once its own commits:
    # no poke per host.
    assert [callback.__qualname__.split(".")[0] for callback in callbacks] == [
        "on_commit_dispatch",
        "on_commit_send_many",
    ]
    leased = Task.objects.filter(job=work, status=TaskStatus.LEASED)
    assert leased.count() == 3
    for machine in machines:
        mine = sorted(str(pk) for pk in leased.filter(leased_to=machine).values_list("pk", flat=True))
        assert mine, "each host has a free slot and the round spreads by score"
        message = async_to_sync(layer.receive)(machine.channel_name)
        assert message["type"] == "task.assign"
        assert sorted(a["task_id"] for a in message["assignments"]) == mine


@pytest.mark.django_db
@pytest.mark.usefixtures("no_canaries")
def test_a_second_round_leases_nothing_the_first_one_leased(buyer: Any, catalog: Any) -> None:
    job(buyer, n=6, task_size=1)
    host(slots=2)
    assert dispatch_round() == 2
    assert dispatch_round() == 0  # the host is full; the rest stays queued for a free slot
    assert Task.objects.filter(status=TaskStatus.QUEUED).count() == 4


postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks: PostgreSQL only")


@postgres_only
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("no_canaries")
def test_a_round_passes_over_a_host_whose_row_another_transaction_holds(buyer: Any, catalog: Any) -> None:
    job(buyer, n=4, task_size=1)
    busy, free = host(slots=2), host(slots=2)
    with held_elsewhere(lambda: Host.objects.select_for_update().get(pk=busy.pk)):
        got = tasks_claim_batch()
    assert set(got) == {free.pk}


@postgres_only
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("no_canaries")
def test_a_hosts_own_claim_waits_for_a_round_that_holds_its_row_and_then_counts_the_rounds_leases(
    buyer: Any, catalog: Any
) -> None:
    job(buyer, n=4, task_size=1)
    machine = host(slots=2)
    claimed: list[int] = []

    def claim() -> None:
        try:
            claimed.append(len(tasks_claim_for_host(host_id=machine.pk, channel_name=machine.channel_name)))
        finally:
            connections.close_all()

    with held_elsewhere(lambda: tasks_claim_batch(host_ids=[machine.pk])):
        claimer = threading.Thread(target=claim)
        claimer.start()
        claimer.join(1.0)
        assert claimer.is_alive(), "the claim waits for the round's transaction"
    claimer.join(30)
    assert claimed == [0]  # the round filled both slots
    assert Task.objects.filter(leased_to=machine, status=TaskStatus.LEASED).count() == 2
