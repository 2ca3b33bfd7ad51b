"""The presence flush never waits for one row while it holds others. On PostgreSQL its batch
statements pass over rows another transaction has locked (such waits closed deadlock cycles with
results and quarantines, which lock a job and then a host): a host's beat is written once its row
is free, one row per statement; a lease whose task row is busy (a result or a requeue is changing
it) is not renewed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.hosts.models import Host
from marketplace.hosts.presence import Beat
from marketplace.hosts.services import _hosts_seen, _hosts_seen_write
from marketplace.jobs.models import Task
from marketplace.jobs.services import check_job_spec, job_submit, leases_renew_many
from marketplace.matching.services import tasks_claim_for_host
from tests.factories import HostFactory
from tests.locks import held_elsewhere

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks: PostgreSQL only"),
]


def test_a_presence_write_passes_over_a_locked_host_row_and_writes_its_beat_once_it_is_free() -> None:
    busy, idle = HostFactory.create(), HostFactory.create()
    at = timezone.now() + timedelta(seconds=5)
    beats = [Beat(host.pk, host.channel_name, at) for host in (busy, idle)]
    with held_elsewhere(lambda: Host.objects.select_for_update().get(pk=busy.pk)):
        # Returns at once with the free row written, the locked one passed over.
        assert _hosts_seen_write(beats, skip_locked=True) == {idle.pk}
        assert Host.objects.get(pk=idle.pk).last_seen_at == at
        assert Host.objects.get(pk=busy.pk).last_seen_at != at
    _hosts_seen(beats)
    assert {host.last_seen_at for host in Host.objects.filter(pk__in=[busy.pk, idle.pk])} == {at}


def test_a_lease_renewal_passes_over_a_task_row_another_transaction_is_changing(
    buyer: Any, catalog: Any
) -> None:
    job_submit(
        buyer=buyer, spec=check_job_spec(model_name="all-MiniLM-L6-v2", inputs=["a", "b"], task_size=1)
    )
    host = HostFactory.create()
    busy, free = tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name)
    later = timezone.now() + timedelta(minutes=1)
    held = {(host.pk, later): [str(busy.lease_id), str(free.lease_id)]}
    with held_elsewhere(lambda: Task.objects.select_for_update().get(pk=busy.task_id)):
        assert leases_renew_many(held=held) == 1
    renewed = dict(
        Task.objects.filter(pk__in=[busy.task_id, free.task_id]).values_list("pk", "lease_expires_at")
    )
    free_until, busy_until = renewed[free.task_id], renewed[busy.task_id]
    assert free_until is not None and busy_until is not None and free_until > busy_until
