"""A dispatch round runs the statements it runs every time from SQL the ORM compiled once per process
(`sql_template`), with this round's values bound: the statement is the one the ORM compiles for
those values, and what it reads is the same."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db.models import QuerySet
from django.utils import timezone

import marketplace.matching.services as matching
from marketplace.config.sql import sql_template, sql_value
from marketplace.hosts.models import Host
from marketplace.jobs.models import Job
from tests.factories import HostFactory
from tests.fake_runs import job

pytestmark = pytest.mark.django_db


def _compiled(queryset: QuerySet[Any]) -> tuple[str, list[Any]]:
    sql, params = queryset.query.sql_with_params()
    return sql, list(params)


@pytest.mark.parametrize("before", [False, True])
def test_a_bound_seats_statement_is_the_one_the_orm_compiles_for_that_start_and_count(before: bool) -> None:
    start, count = uuid.uuid4(), 17
    template = matching._seat_statement(before=before)
    sql, params = _compiled(matching._seat_rows_from(start, before=before)[:count])
    assert template.sql.replace("LIMIT %s", f"LIMIT {count}") == sql
    assert template.limit_at is not None  # the ORM writes the LIMIT into the SQL; the template binds it
    expected = [*params[: template.limit_at], count, *params[template.limit_at :]]
    assert template.bind(sql_value(Host, "id", start), limit=count) == expected


def test_the_seats_read_from_a_start_are_the_hosts_the_orm_reads_with_their_leases_counted(
    catalog: Any,
) -> None:
    hosts = HostFactory.create_batch(6, slots=3)
    start = sorted(host.pk for host in hosts)[2]
    read = matching._seat_rows(before=False, start=start, count=3)
    expected = list(matching._seat_hosts().filter(pk__gte=start)[:3])
    assert [host.pk for host in read] == [host.pk for host in expected]
    assert [host.in_flight for host in read] == [host.in_flight for host in expected] == [0, 0, 0]
    assert [host.channel_name for host in read] == [host.channel_name for host in expected]
    below = matching._seat_rows(before=True, start=start, count=10)
    assert [host.pk for host in below] == sorted(host.pk for host in hosts)[:2]


def test_a_bound_waiting_jobs_statement_is_the_one_the_orm_compiles_for_that_instant() -> None:
    now = timezone.now()
    template = matching._waiting_jobs_statement()
    sql, params = _compiled(matching._waiting_job_rows(now))
    assert template.sql == sql
    assert template.bind(sql_value(Job, "deadline", now)) == params


def test_waiting_jobs_come_with_their_queued_count_model_and_shape_and_a_past_deadline_leaves_a_queued_job_out(
    buyer: Any, other_buyer: Any, catalog: Any
) -> None:
    mine = job(buyer, n=3, task_size=1)
    late = job(other_buyer, n=2, task_size=1)
    Job.objects.filter(pk=late.pk).update(deadline=timezone.now() - timedelta(minutes=1))
    waiting = matching._waiting_jobs(now=timezone.now())
    assert set(waiting) == {mine.pk}
    assert waiting[mine.pk].queued == 3
    read = waiting[mine.pk].job
    assert (read.buyer_id, read.status, read.max_price_per_1k_minor) == (
        buyer.pk,
        mine.status,
        mine.max_price_per_1k_minor,
    )
    assert (read.model.pk, read.model.name, read.model.weights_sha256, read.model.min_memory_mb) == (
        mine.model.pk,
        mine.model.name,
        mine.model.weights_sha256,
        mine.model.min_memory_mb,
    )
    assert waiting[mine.pk].shape == matching.task_view(mine)


def test_a_template_refuses_a_mark_that_changes_the_statement_not_only_its_values() -> None:
    def build(ids: list[uuid.UUID]) -> QuerySet[Host]:
        return Host.objects.filter(pk__in=ids)

    with pytest.raises(ValueError, match="shape"):
        sql_template(build, ([uuid.uuid4()], [uuid.uuid4(), uuid.uuid4()]))


def test_a_template_refuses_a_mark_that_fills_no_parameter() -> None:
    def build(start: datetime) -> QuerySet[Host]:
        return Host.objects.filter(status=Host.Status.ONLINE)

    with pytest.raises(ValueError, match="no parameter"):
        sql_template(build, (datetime(2001, 1, 1, tzinfo=UTC), datetime(2002, 1, 1, tzinfo=UTC)))
