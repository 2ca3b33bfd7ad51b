"""Claims, leases and results at the service level: the rules every agent meets."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import time_machine
from django.test import override_settings
from django.utils import timezone

from hearth_agent import protocol
from marketplace.hosts.models import Host
from marketplace.hosts.services import SessionGone, host_disconnect, hosts_disconnect
from marketplace.jobs.models import Job, Task
from marketplace.jobs.services import (
    check_job_spec,
    job_submit,
    leases_renew,
    leases_requeue_expired,
    task_fail,
    task_result_accept,
)
from marketplace.matching.services import Assignment, tasks_claim_for_host
from tests.factories import HostFactory

pytestmark = pytest.mark.django_db


def _job(buyer: Any, n: int = 4, task_size: int = 2) -> Job:
    spec = check_job_spec(
        model_name="all-MiniLM-L6-v2", inputs=[f"s{i}" for i in range(n)], task_size=task_size
    )
    return job_submit(buyer=buyer, spec=spec)


def _result(
    assignment: Assignment, *, dimension: int = 384, count: int | None = None
) -> protocol.TaskResultPayload:
    count = len(assignment.inputs) if count is None else count
    raw = np.ones((count, dimension), dtype="<f4").tobytes()
    b64, digest = protocol.encode_embeddings(raw)
    return protocol.TaskResultPayload(
        task_id=str(assignment.task_id),
        lease_id=str(assignment.lease_id),
        dimension=dimension,
        count=count,
        embeddings_b64=b64,
        output_sha256=digest,
        compute_ms=1.0,
        device="cpu",
    )


def _claim(host: Any) -> list[Assignment]:
    return tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name)


def test_a_host_claims_no_more_tasks_than_it_has_free_slots(buyer: Any, catalog: Any, host: Any) -> None:
    _job(buyer, n=10, task_size=2)
    first = _claim(host)
    assert len(first) == host.slots == 2
    assert _claim(host) == []
    assert Task.objects.filter(status="leased", leased_to=host).count() == 2


def test_two_hosts_never_claim_the_same_task(buyer: Any, catalog: Any, host: Any) -> None:
    other = HostFactory()
    _job(buyer, n=6, task_size=2)
    ids = [a.task_id for a in _claim(host)] + [a.task_id for a in _claim(other)]
    assert len(ids) == 3
    assert len(set(ids)) == 3


def test_a_stale_connection_cannot_claim(buyer: Any, catalog: Any, host: Any) -> None:
    _job(buyer)
    assert tasks_claim_for_host(host_id=host.pk, channel_name="an.old.channel") == []


def test_a_host_that_is_not_ready_gets_nothing(buyer: Any, catalog: Any) -> None:
    host = HostFactory(ready=False)
    _job(buyer)
    assert _claim(host) == []


def test_a_host_without_enough_memory_gets_nothing(buyer: Any, catalog: Any) -> None:
    host = HostFactory(memory_mb=512)
    _job(buyer)
    assert _claim(host) == []


def test_the_job_succeeds_when_its_last_task_reports(buyer: Any, catalog: Any, host: Any) -> None:
    job = _job(buyer, n=4, task_size=2)
    for assignment in _claim(host):
        assert task_result_accept(host_id=host.pk, payload=_result(assignment)).accepted
    job.refresh_from_db()
    assert (job.status, job.items_done) == ("succeeded", 4)
    assert job.finished_at is not None


def test_a_result_from_a_host_that_is_not_the_leaseholder_is_rejected(
    buyer: Any, catalog: Any, host: Any
) -> None:
    intruder = HostFactory.create()
    _job(buyer)
    assignment = _claim(host)[0]
    outcome = task_result_accept(host_id=intruder.pk, payload=_result(assignment))
    assert not outcome.accepted
    assert "leaseholder" in outcome.reason
    assert Task.objects.get(pk=assignment.task_id).status == "leased"


def test_a_result_with_the_wrong_lease_id_is_rejected(buyer: Any, catalog: Any, host: Any) -> None:
    _job(buyer)
    assignment = _claim(host)[0]
    forged = Assignment(**{**assignment.__dict__, "lease_id": __import__("uuid").uuid4()})
    assert not task_result_accept(host_id=host.pk, payload=_result(forged)).accepted


def test_a_result_delivered_twice_is_stored_once(buyer: Any, catalog: Any, host: Any) -> None:
    job = _job(buyer, n=2, task_size=2)
    assignment = _claim(host)[0]
    assert task_result_accept(host_id=host.pk, payload=_result(assignment)).accepted
    assert not task_result_accept(host_id=host.pk, payload=_result(assignment)).accepted
    job.refresh_from_db()
    assert job.items_done == 2


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"count": 1}, "1 vectors for 2 inputs"), ({"dimension": 128}, "dimension 128")],
)
def test_a_result_of_the_wrong_shape_is_rejected(
    buyer: Any, catalog: Any, host: Any, kwargs: dict[str, int], reason: str
) -> None:
    _job(buyer, n=2, task_size=2)
    outcome = task_result_accept(host_id=host.pk, payload=_result(_claim(host)[0], **kwargs))
    assert not outcome.accepted
    assert reason in outcome.reason


def test_a_result_whose_digest_does_not_match_is_rejected(buyer: Any, catalog: Any, host: Any) -> None:
    _job(buyer, n=2, task_size=2)
    payload = _result(_claim(host)[0]).model_copy(update={"output_sha256": hashlib.sha256(b"x").hexdigest()})
    outcome = task_result_accept(host_id=host.pk, payload=payload)
    assert not outcome.accepted
    assert "output_sha256" in outcome.reason


def test_an_expired_lease_is_requeued_and_the_late_result_rejected(
    buyer: Any, catalog: Any, host: Any
) -> None:
    _job(buyer, n=2, task_size=2)
    assignment = _claim(host)[0]
    with time_machine.travel(timezone.now() + timedelta(hours=1)):
        assert leases_requeue_expired() == 1
    task = Task.objects.get(pk=assignment.task_id)
    assert (task.status, task.lease_id, task.last_error) == ("queued", None, "lease expired")
    assert not task_result_accept(host_id=host.pk, payload=_result(assignment)).accepted


def test_a_heartbeat_renews_only_the_hosts_own_leases(buyer: Any, catalog: Any, host: Any) -> None:
    other = HostFactory()
    _job(buyer, n=8, task_size=2)
    mine, theirs = _claim(host)[0], _claim(other)[0]
    later = timezone.now() + timedelta(minutes=30)
    renewed = leases_renew(
        host_id=host.pk, lease_ids=[str(mine.lease_id), str(theirs.lease_id), "junk"], now=later
    )
    assert renewed == 1
    expires = Task.objects.get(pk=theirs.task_id).lease_expires_at
    assert expires is not None and expires < later


def test_a_disconnect_requeues_the_hosts_leases_for_another_host(buyer: Any, catalog: Any, host: Any) -> None:
    _job(buyer, n=4, task_size=2)
    taken = {a.task_id for a in _claim(host)}
    assert host_disconnect(host_id=host.pk, channel_name=host.channel_name, reason="agent disconnected")
    other = HostFactory()
    assert {a.task_id for a in _claim(other)} == taken


def test_a_disconnect_of_a_replaced_connection_changes_nothing(buyer: Any, catalog: Any, host: Any) -> None:
    _job(buyer)
    _claim(host)
    assert not host_disconnect(host_id=host.pk, channel_name="an.old.channel", reason="old socket closed")
    assert Task.objects.filter(status="leased").count() == 2


def test_sessions_ending_together_requeue_each_hosts_leases_with_its_own_reason_and_spare_a_replaced_one(
    buyer: Any, catalog: Any
) -> None:
    _job(buyer, n=12, task_size=2)
    hosts = [HostFactory.create() for _ in range(3)]
    held = {host.pk: {a.task_id for a in _claim(host)} for host in hosts}
    first, second, replaced = hosts
    gone = hosts_disconnect(
        sessions=[
            SessionGone(first.pk, first.channel_name, "agent disconnected (code 1006)"),
            SessionGone(second.pk, second.channel_name, "heartbeats stopped"),
            SessionGone(replaced.pk, "an.old.channel", "old socket closed"),
        ]
    )
    assert set(gone) == {first.pk, second.pk}
    for host, reason in ((first, "agent disconnected (code 1006)"), (second, "heartbeats stopped")):
        tasks = Task.objects.filter(pk__in=held[host.pk])
        assert {(t.status, t.leased_to_id, t.last_error) for t in tasks} == {("queued", None, reason)}
        assert Host.objects.get(pk=host.pk).status == Host.Status.OFFLINE
    assert set(Task.objects.filter(leased_to=replaced).values_list("pk", flat=True)) == held[replaced.pk]
    assert Host.objects.get(pk=replaced.pk).status == Host.Status.ONLINE


@override_settings(HEARTH_MAX_ATTEMPTS=2)
def test_a_task_that_keeps_failing_fails_its_job_with_a_reason(buyer: Any, catalog: Any) -> None:
    job = _job(buyer, n=4, task_size=2)
    for _attempt in range(2):
        host = HostFactory.create(slots=1)
        assignment = _claim(host)[0]
        failure = protocol.TaskFailedPayload(
            task_id=str(assignment.task_id), lease_id=str(assignment.lease_id), reason="worker crashed"
        )
        assert task_fail(host_id=host.pk, payload=failure).accepted
    job.refresh_from_db()
    assert job.status == "failed"
    assert "task 0 failed after 2 attempts" in job.failure_reason
    assert "worker crashed" in job.failure_reason
    assert set(job.tasks.values_list("status", flat=True)) == {"failed"}


def test_a_new_session_of_a_host_releases_the_leases_of_its_previous_session(
    buyer: Any, catalog: Any, host: Any
) -> None:
    from marketplace.hosts.services import host_connect

    _job(buyer, n=4, task_size=2)
    taken = {a.task_id for a in _claim(host)}
    hello = protocol.HelloPayload(
        agent_version="t", protocol_version=1, hostname="h", os="linux", cpu_model="c", cpu_count=2,
        memory_mb=8192, device="cpu", slots=2,
    )  # fmt: skip
    host_connect(host_id=host.pk, channel_name="a.new.channel", hello=hello)
    tasks = Task.objects.filter(pk__in=taken)
    assert set(tasks.values_list("status", flat=True)) == {"queued"}
    assert set(tasks.values_list("last_error", flat=True)) == {"agent started a new session"}
