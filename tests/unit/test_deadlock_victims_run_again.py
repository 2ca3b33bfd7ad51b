"""Database work that PostgreSQL picks as a deadlock's victim runs again and succeeds, instead of
failing the agent's frame (which closed its socket with 1011)."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import ProgrammingError, connection, connections, transaction

from marketplace.config.deadlocks import retrying_deadlocks
from marketplace.hosts.models import Host
from tests.factories import HostFactory

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks: PostgreSQL only"),
]


def test_work_that_loses_a_deadlock_runs_again_and_both_sides_complete() -> None:
    first, second = HostFactory.create(), HostFactory.create()
    other_has_first, victim_waits = threading.Event(), threading.Event()
    attempts: list[int] = []

    def other() -> None:
        """Holds `first`, then asks for `second` once the victim waits for `first`: a cycle."""
        try:
            with transaction.atomic():
                Host.objects.select_for_update().get(pk=first.pk)
                other_has_first.set()
                victim_waits.wait(10)
                time.sleep(0.3)  # the victim waits first, so PostgreSQL's check picks it
                Host.objects.filter(pk=second.pk).update(name="other")
        finally:
            connections.close_all()

    @retrying_deadlocks
    def victim() -> None:
        attempts.append(len(attempts) + 1)
        with transaction.atomic():
            Host.objects.filter(pk=second.pk).update(name="victim")
            other_has_first.wait(10)
            victim_waits.set()
            Host.objects.filter(pk=first.pk).update(name="victim")

    thread = threading.Thread(target=other)
    thread.start()
    victim()
    thread.join(30)
    assert attempts == [1, 2]
    assert dict(Host.objects.filter(pk__in=[first.pk, second.pk]).values_list("pk", "name")) == {
        first.pk: "victim",
        second.pk: "victim",  # the victim's second run wrote after the other side committed
    }


def test_other_database_errors_are_not_run_again() -> None:
    calls: list[int] = []

    @retrying_deadlocks
    def broken() -> None:
        calls.append(1)
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")

    with pytest.raises(ProgrammingError, match="no_such_table"):
        broken()
    assert calls == [1]
