"""An owner's machine list tells buyers' leases from known-answer checks among the tasks in flight."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.hosts.models import Host
from marketplace.jobs.models import Task
from marketplace.jobs.states import TaskStatus
from marketplace.trust.models import CanaryItem
from marketplace.trust.services import canary_lease

pytestmark = pytest.mark.django_db


def test_the_machine_list_counts_canaries_in_flight_apart_from_the_buyers_tasks(
    api: APIClient, owner_api: APIClient, catalog: Any, host: Host
) -> None:
    job_id = api.post(
        "/api/v1/jobs", {"model": catalog.name, "inputs": ["a", "b", "c"], "task_size": 1}, format="json"
    ).json()["id"]
    leased = Task.objects.filter(job_id=job_id).order_by("index")[:2].values_list("pk", flat=True)
    Task.objects.filter(pk__in=list(leased)).update(status=TaskStatus.LEASED, leased_to=host)
    CanaryItem.objects.create(model=catalog, weights_sha256="0" * 64, text="known", embedding=b"\0" * 1536)
    assert canary_lease(host=host, model=catalog, size=1, now=timezone.now()) is not None

    listed = owner_api.get("/api/v1/hosts").json()
    assert [(h["tasks_in_flight"], h["canaries_in_flight"]) for h in listed] == [(3, 1)]
