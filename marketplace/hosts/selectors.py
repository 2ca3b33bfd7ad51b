"""Reads for hosts."""

from __future__ import annotations

from django.db.models import Count, Q, QuerySet

from marketplace.accounts.models import User
from marketplace.hosts.models import Host
from marketplace.jobs.models import TaskRole
from marketplace.jobs.states import TaskStatus


def host_list_for_owner(*, owner: User) -> QuerySet[Host]:
    """The owner's machines, each annotated with `tasks_in_flight` (leases it holds now) and
    `canaries_in_flight` (those of them that are known-answer checks, not buyers' work)."""
    return Host.objects.filter(owner=owner).annotate(
        tasks_in_flight=Count("leased_tasks", filter=Q(leased_tasks__status=TaskStatus.LEASED)),
        canaries_in_flight=Count(
            "leased_tasks",
            filter=Q(leased_tasks__status=TaskStatus.LEASED, leased_tasks__role=TaskRole.CANARY),
        ),
    )
