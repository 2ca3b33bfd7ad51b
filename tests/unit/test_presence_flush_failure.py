"""A flush the database refuses loses no heartbeat: the beats go back to the presence store (the
one this run configures: memory, or Redis when REDIS_URL is set), unless their connection has
beaten again since, and the next flush writes them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import DatabaseError
from django.utils import timezone

from hearth_agent import protocol
from marketplace.hosts import services
from marketplace.hosts.services import host_heartbeat, hosts_presence_flush
from tests.factories import HostFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_presence_store")]


def _beat(host: Any, at: Any) -> None:
    host_heartbeat(
        host_id=host.pk,
        channel_name=host.channel_name,
        payload=protocol.HeartbeatPayload(status="idle", free_slots=host.slots),
        now=at,
    )


def _database_away_once(monkeypatch: pytest.MonkeyPatch, before_failing: Any = None) -> None:
    """The next batch write fails as a lost database connection would; later ones run for real."""
    real_write = services._presence_write
    failed: list[bool] = []

    def write(beats: Any) -> None:
        if not failed:
            failed.append(True)
            if before_failing is not None:
                before_failing()
            raise DatabaseError("server closed the connection unexpectedly")
        real_write(beats)

    monkeypatch.setattr(services, "_presence_write", write)


def test_beats_a_failed_flush_could_not_write_are_written_by_the_next_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosts = HostFactory.create_batch(3)
    at = timezone.now() + timedelta(seconds=5)
    for host in hosts:
        _beat(host, at)
    _database_away_once(monkeypatch)
    with pytest.raises(DatabaseError):
        hosts_presence_flush()
    assert all(host.last_seen_at != at for host in services.Host.objects.all())
    assert hosts_presence_flush() == 3
    assert {host.last_seen_at for host in services.Host.objects.all()} == {at}


def test_a_beat_that_arrives_during_a_failed_flush_wins_over_the_older_beat_put_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host: Any = HostFactory()
    older, newer = timezone.now() + timedelta(seconds=5), timezone.now() + timedelta(seconds=15)
    _beat(host, older)
    _database_away_once(monkeypatch, before_failing=lambda: _beat(host, newer))
    with pytest.raises(DatabaseError):
        hosts_presence_flush()
    assert hosts_presence_flush() == 1
    host.refresh_from_db()
    assert host.last_seen_at == newer
