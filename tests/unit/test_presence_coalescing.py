"""Heartbeats land in the presence store; the sweep flushes them to the hosts table in batches."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from hearth_agent import protocol
from marketplace.config.background import sweep_once
from marketplace.hosts.models import Host
from marketplace.hosts.presence import presence_store
from marketplace.hosts.services import host_heartbeat, hosts_presence_flush
from marketplace.jobs.models import Task
from marketplace.jobs.services import check_job_spec, job_submit
from marketplace.matching.services import tasks_claim_for_host
from tests.factories import HostFactory, UserFactory

pytestmark = pytest.mark.django_db

INTERVAL_S = 10.0


@pytest.fixture(autouse=True)
def empty_store() -> Iterator[None]:
    presence_store().drain()
    with override_settings(HEARTH_HEARTBEAT_INTERVAL_S=INTERVAL_S, HEARTH_OFFLINE_AFTER_BEATS=1.5):
        yield
    presence_store().drain()


def _beat(
    host: Any, at: datetime, *, channel_name: str | None = None, running: list[str] | None = None
) -> None:
    host_heartbeat(
        host_id=host.pk,
        channel_name=host.channel_name if channel_name is None else channel_name,
        payload=protocol.HeartbeatPayload(status="idle", free_slots=host.slots, running=running or []),
        now=at,
    )


def _queries_to_beat_and_flush(hosts: list[Any], beats_each: int) -> tuple[int, int]:
    now = timezone.now()
    with CaptureQueriesContext(connection) as beating:
        for i in range(beats_each):
            for host in hosts:
                _beat(host, now + timedelta(seconds=i * INTERVAL_S))
    with CaptureQueriesContext(connection) as flushing:
        hosts_presence_flush()
    return len(beating), len(flushing)


def test_heartbeats_of_many_hosts_cost_a_few_queries_per_flush_not_per_beat() -> None:
    owner = UserFactory(role="host")
    few = HostFactory.create_batch(3, owner=owner)
    many = HostFactory.create_batch(40, owner=owner)
    assert _queries_to_beat_and_flush(few, beats_each=1) == (0, 1)
    assert _queries_to_beat_and_flush(many, beats_each=4) == (0, 1)


@override_settings(HEARTH_PRESENCE="db")
def test_the_old_write_through_path_costs_a_query_per_beat() -> None:
    hosts = HostFactory.create_batch(10, owner=UserFactory(role="host"))
    beating, flushing = _queries_to_beat_and_flush(hosts, beats_each=3)
    assert (beating, flushing) == (30, 0)


def test_a_flush_after_beats_moves_offline_after() -> None:
    host: Any = HostFactory(offline_after=timezone.now())
    at = timezone.now() + timedelta(seconds=5)
    _beat(host, at)
    host.refresh_from_db()
    assert host.offline_after < at
    assert hosts_presence_flush() == 1
    host.refresh_from_db()
    assert (host.last_seen_at, host.offline_after) == (at, at + timedelta(seconds=1.5 * INTERVAL_S))


def test_a_flush_renews_the_leases_the_beats_carried_from_the_time_of_the_beat(
    buyer: Any, catalog: Any
) -> None:
    host: Any = HostFactory()
    job_submit(
        buyer=buyer, spec=check_job_spec(model_name="all-MiniLM-L6-v2", inputs=["a", "b"], task_size=1)
    )
    held = tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name)
    at = timezone.now() + timedelta(seconds=30)
    _beat(host, at, running=[str(a.lease_id) for a in held] + ["junk"])
    hosts_presence_flush()
    for assignment in held:
        task = Task.objects.get(pk=assignment.task_id)
        assert task.lease_expires_at == at + timedelta(seconds=120)


def test_a_vanished_hosts_leases_are_requeued_by_the_sweep_within_two_heartbeat_intervals(
    buyer: Any, catalog: Any
) -> None:
    host: Any = HostFactory()
    job_submit(
        buyer=buyer, spec=check_job_spec(model_name="all-MiniLM-L6-v2", inputs=["a", "b"], task_size=1)
    )
    held = tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name)
    assert held
    last_beat = timezone.now()
    _beat(host, last_beat, running=[str(a.lease_id) for a in held])
    # Then nothing: no disconnect, no more beats (SIGSTOP, a dropped network).
    sweep_once(now=last_beat + timedelta(seconds=INTERVAL_S))
    host.refresh_from_db()
    assert host.status == Host.Status.ONLINE
    sweep_once(now=last_beat + timedelta(seconds=2 * INTERVAL_S))
    host.refresh_from_db()
    assert (host.status, host.channel_name) == (Host.Status.OFFLINE, "")
    assert {Task.objects.get(pk=a.task_id).status for a in held} == {"queued"}


def test_a_host_that_keeps_beating_is_not_swept() -> None:
    host: Any = HostFactory()
    start = timezone.now()
    for i in range(1, 6):
        _beat(host, start + timedelta(seconds=i * INTERVAL_S))
        sweep_once(now=start + timedelta(seconds=i * INTERVAL_S + 2))
    host.refresh_from_db()
    assert host.status == Host.Status.ONLINE


def test_a_stale_connections_heartbeat_cannot_revive_a_host_replaced_by_a_newer_connection() -> None:
    host: Any = HostFactory(channel_name="new.socket", offline_after=timezone.now())
    before = host.offline_after
    _beat(host, timezone.now() + timedelta(seconds=5), channel_name="old.socket")
    hosts_presence_flush()
    host.refresh_from_db()
    assert host.offline_after == before

    Host.objects.filter(pk=host.pk).update(status=Host.Status.OFFLINE, channel_name="")
    _beat(host, timezone.now() + timedelta(seconds=6), channel_name="new.socket")
    hosts_presence_flush()
    host.refresh_from_db()
    assert (host.status, host.offline_after) == (Host.Status.OFFLINE, before)
