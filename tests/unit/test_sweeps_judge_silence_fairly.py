"""Sweeps judge silence fairly. They take turns: one that starts while another holds drained but
unwritten heartbeats skips its turn instead of sweeping the hosts those beats came from (Celery runs
several sweeps at once when a worker has more than one process). And a slow flush does not make the
beats it wrote look old. The store is the one this run configures: memory, or Redis
when REDIS_URL is set."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from hearth_agent import protocol
from marketplace.config.background import sweep_once
from marketplace.hosts import services
from marketplace.hosts.models import Host
from marketplace.hosts.services import host_heartbeat
from tests.factories import HostFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_presence_store")]


def test_a_sweep_that_starts_while_another_writes_heartbeats_leaves_live_hosts_online(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The host's last flushed beat is old: only the beat in the store shows it is alive.
    host: Any = HostFactory(offline_after=timezone.now() - timedelta(seconds=1))
    host_heartbeat(
        host_id=host.pk,
        channel_name=host.channel_name,
        payload=protocol.HeartbeatPayload(status="idle", free_slots=host.slots),
    )
    real_write = services._presence_write
    overlapping: list[tuple[int, int]] = []

    def write_after_another_sweep(beats: Any) -> None:
        # The first sweep has drained the beat and not written it yet when the second one runs.
        overlapping.append(sweep_once())
        real_write(beats)

    monkeypatch.setattr(services, "_presence_write", write_after_another_sweep)

    assert sweep_once() == (0, 0)

    assert overlapping == [(0, 0)]
    host.refresh_from_db()
    assert host.status == Host.Status.ONLINE
    assert host.channel_name != ""
    assert host.offline_after > timezone.now()


def test_the_next_sweep_runs_once_the_previous_one_has_finished() -> None:
    host: Any = HostFactory(offline_after=timezone.now() - timedelta(seconds=1))

    assert sweep_once() == (0, 1)

    host.refresh_from_db()
    assert host.status == Host.Status.OFFLINE
    silent: Any = HostFactory(offline_after=timezone.now() - timedelta(seconds=1))
    assert sweep_once() == (0, 1)
    silent.refresh_from_db()
    assert silent.status == Host.Status.OFFLINE


def test_a_flush_slower_than_the_offline_window_does_not_sweep_the_hosts_whose_beats_it_wrote(
    monkeypatch: pytest.MonkeyPatch, time_machine: Any
) -> None:
    # A sweep judges silence as of the moment it took the beats: a flush that waited on a busy
    # disk longer than the offline window must not make the beats it carried look too old.
    time_machine.move_to(timezone.now(), tick=False)
    host: Any = HostFactory(offline_after=timezone.now() - timedelta(seconds=1))
    host_heartbeat(
        host_id=host.pk,
        channel_name=host.channel_name,
        payload=protocol.HeartbeatPayload(status="idle", free_slots=host.slots),
    )
    window = timedelta(seconds=settings.HEARTH_OFFLINE_AFTER_BEATS * settings.HEARTH_HEARTBEAT_INTERVAL_S)
    real_write = services._presence_write

    def slow_write(beats: Any) -> None:
        real_write(beats)
        time_machine.shift(window + timedelta(seconds=1))

    monkeypatch.setattr(services, "_presence_write", slow_write)

    assert sweep_once() == (0, 0)

    host.refresh_from_db()
    assert host.status == Host.Status.ONLINE
