"""Reads for hosts."""

from __future__ import annotations

from django.db.models import QuerySet

from marketplace.accounts.models import User
from marketplace.hosts.models import Host


def host_list_for_owner(*, owner: User) -> QuerySet[Host]:
    return Host.objects.filter(owner=owner)


def host_list_dispatchable() -> QuerySet[Host]:
    """Hosts with a live, ready connection."""
    return Host.objects.filter(status=Host.Status.ONLINE, ready=True, revoked_at__isnull=True).exclude(
        channel_name=""
    )
