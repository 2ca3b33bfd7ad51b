"""Scores of many hosts at once (a reconnect storm or a sweep takes hundreds offline together):
each host gets the uptime, score and reason it would get alone, in a fixed number of statements."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from marketplace.hosts.models import Host
from marketplace.trust.models import HostSession, ReliabilityEvent, Strike
from marketplace.trust.services import score_update, scores_update, uptimes
from tests.factories import HostFactory

pytestmark = pytest.mark.django_db


def _host_created(days_ago: float) -> Host:
    host = HostFactory.create()
    Host.objects.filter(pk=host.pk).update(created_at=timezone.now() - timedelta(days=days_ago))
    host.refresh_from_db()
    return host


def test_uptimes_of_hosts_of_different_ages_read_together_are_each_hosts_own_share() -> None:
    now = timezone.now()
    old, young, silent = _host_created(10), _host_created(1), _host_created(3)
    HostSession.objects.create(
        host=old, channel_name="a", started_at=now - timedelta(days=9), ended_at=now - timedelta(days=8)
    )
    HostSession.objects.create(
        host=old, channel_name="b", started_at=now - timedelta(days=2), ended_at=now - timedelta(days=1)
    )
    HostSession.objects.create(host=old, channel_name="c", started_at=now - timedelta(hours=12))
    HostSession.objects.create(
        host=young, channel_name="d", started_at=now - timedelta(hours=18), ended_at=now - timedelta(hours=6)
    )
    shares = uptimes(hosts=[old, young, silent], window=timedelta(days=7), now=now)
    # old: 1 day + 12 h of its last 7 days (the session 8 days ago is outside); young: 12 h of its 1 day.
    assert shares == pytest.approx({old.pk: 1.5 / 7, young.pk: 0.5, silent.pk: 0.0})


def test_scoring_many_hosts_at_once_records_each_its_reason_and_the_score_it_gets_alone() -> None:
    now = timezone.now()
    hosts = [_host_created(days) for days in (10, 4, 2, 1)]
    for i, host in enumerate(hosts):
        Host.objects.filter(pk=host.pk).update(tasks_completed=10 * i, tasks_failed=i, canaries_passed=i)
        HostSession.objects.create(
            host=host, channel_name=f"c{i}", started_at=now - timedelta(hours=6 * (i + 1))
        )
    Strike.objects.create(host=hosts[1], kind=Strike.Kind.MISMATCH, evidence="disagreed")
    with CaptureQueriesContext(connection) as captured:
        scores = scores_update(
            reasons={host.pk: f"went offline: socket {i}" for i, host in enumerate(hosts)}, now=now
        )
    # Hosts, sessions, strikes; the events; the new scores.
    assert len([q for q in captured.captured_queries if "SAVEPOINT" not in q["sql"]]) == 5
    assert len(set(scores.values())) == 4  # four different hosts, four different scores
    for i, host in enumerate(hosts):
        event = ReliabilityEvent.objects.get(host=host)
        assert event.reason.startswith(f"went offline: socket {i} — uptime 7 d ")
        assert (event.score_before, event.score_after) == (0.85, scores[host.pk])
        assert Host.objects.get(pk=host.pk).reliability == scores[host.pk]
        # Alone, the same host gets the same score, so nothing changes and nothing is recorded.
        assert score_update(host_id=host.pk, reason="again", now=now) == scores[host.pk]
    assert ReliabilityEvent.objects.count() == 4
