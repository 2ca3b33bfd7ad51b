"""Work no host can take now (green-only at night, a region with no hosts, a price below every
host's) stays queued without costing the work that can run: it takes none of a batch round's
slots and does not make the round look at more hosts."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from marketplace.jobs.models import Task
from marketplace.matching import services
from marketplace.matching.services import tasks_claim_batch
from tests.fake_runs import host, job

pytestmark = pytest.mark.django_db

UNSERVABLE = [
    pytest.param({"green_only": True}, id="green-only-and-no-host-on-solar"),
    pytest.param({"region": "ap-south"}, id="a-region-with-no-hosts"),
    pytest.param({"max_price_per_1k_minor": 5}, id="a-price-below-every-host"),
]


@pytest.fixture
def samples(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The host sample each round asks for, one host per queued task (and at least one)."""
    monkeypatch.setattr(services, "HOST_SAMPLE_MIN", 1)
    monkeypatch.setattr(services, "HOST_SAMPLE_PER_TASK", 1)
    monkeypatch.setattr(services, "HOST_SAMPLE_MAX_PER_TASK", 1)  # not widened for scarce shapes
    asked: list[int] = []
    seats = services._seats

    def spy(*, host_ids: list[uuid.UUID] | None, now: Any, sample: int) -> Any:
        asked.append(sample)
        return seats(host_ids=host_ids, now=now, sample=sample)

    monkeypatch.setattr(services, "_seats", spy)
    return asked


@override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0)
@pytest.mark.parametrize("asks", UNSERVABLE)
def test_a_job_no_host_can_serve_neither_takes_slots_nor_widens_the_sample(
    buyer: Any, catalog: Any, samples: list[int], asks: dict[str, Any]
) -> None:
    # Older and at the top priority, so it comes first in its buyer's order.
    stuck = job(buyer, n=20, task_size=1, priority=9, **asks)
    runnable = job(buyer, n=2, task_size=1)
    [host(slots=1, region="eu-west", policy={"price_per_1k_items_minor": 20}) for _ in range(6)]
    tasks_claim_batch()
    assert Task.objects.filter(job=runnable, status="leased").count() == 2
    assert Task.objects.filter(job=stuck, status="leased").count() == 0
    assert samples == [2]


@override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0)
@pytest.mark.parametrize("asks", UNSERVABLE)
def test_a_job_that_only_some_hosts_of_the_fleet_can_serve_still_widens_the_sample(
    buyer: Any, catalog: Any, samples: list[int], asks: dict[str, Any]
) -> None:
    job(buyer, n=3, task_size=1, **asks)
    [host(slots=1, region="eu-west", policy={"price_per_1k_items_minor": 20}) for _ in range(6)]
    # The one host that can: on solar now, in the region, cheap enough.
    on_solar: dict[str, Any] = {"power_at": timezone.now(), "grid_w": -100.0, "battery_soc_pct": 90.0}
    host(slots=3, region="ap-south", policy={"price_per_1k_items_minor": 5}, **on_solar)
    tasks_claim_batch()
    assert samples == [3]
