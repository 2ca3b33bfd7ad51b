"""A batch round reads one host per waiting task, and more for work that fewer hosts can take: by
the share of the last round's seats that fitted the job's shape, at most four a task."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from marketplace.matching import services
from marketplace.matching.scoring import TaskView
from marketplace.matching.selectors import task_view
from marketplace.matching.services import tasks_claim_batch
from tests.fake_runs import host, job

ANY_HOST = TaskView(min_memory_mb=100, max_price_per_1k_minor=100)
ONE_REGION = TaskView(min_memory_mb=100, max_price_per_1k_minor=100, region="ap-south")
NEVER_SEEN = TaskView(min_memory_mb=100, max_price_per_1k_minor=100, green_only=True)


class _Job:
    def __init__(self, shape: TaskView, queued: int) -> None:
        self.shape, self.queued = shape, queued


@pytest.fixture(autouse=True)
def shares() -> Iterator[None]:
    saved = dict(services._SHAPE_SHARES)
    services._SHAPE_SHARES.clear()
    services._SHAPE_SHARES.put(ANY_HOST, 1.0)
    services._SHAPE_SHARES.put(ONE_REGION, 0.5)
    yield
    services._SHAPE_SHARES.clear()
    services._SHAPE_SHARES.update(saved)


@pytest.mark.parametrize(
    ("jobs", "limit", "sample"),
    [
        pytest.param([(ANY_HOST, 100)], 1000, 100, id="one-host-a-task-when-every-seat-fits"),
        pytest.param([(ONE_REGION, 100)], 1000, 200, id="two-a-task-when-half-the-seats-fit"),
        pytest.param([(NEVER_SEEN, 100)], 1000, 400, id="four-a-task-for-a-shape-never-seen"),
        pytest.param([(ANY_HOST, 50), (ONE_REGION, 50)], 1000, 150, id="summed-over-jobs"),
        pytest.param([(ANY_HOST, 5)], 1000, 32, id="at-least-the-minimum"),
        pytest.param([(NEVER_SEEN, 10_000)], 100, 400, id="at-most-four-times-the-round-limit"),
        pytest.param([], 1000, 32, id="no-work-the-minimum"),
    ],
)
def test_the_sample_grows_with_the_waiting_tasks_and_with_how_few_seats_fit_them(
    jobs: list[tuple[TaskView, int]], limit: int, sample: int
) -> None:
    waiting: list[Any] = [_Job(shape, queued) for shape, queued in jobs]
    assert services._sample_size(waiting, limit=limit) == sample


def test_a_shape_no_seat_fitted_last_round_gets_four_hosts_a_task() -> None:
    services._SHAPE_SHARES.put(ONE_REGION, 0.0)
    assert services._sample_size([_Job(ONE_REGION, 100)], limit=1000) == 400  # type: ignore[list-item]


@pytest.mark.django_db
@override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0)
def test_a_round_notes_the_share_of_its_seats_that_fitted_each_shape(buyer: Any, catalog: Any) -> None:
    wants_region = job(buyer, n=2, task_size=1, region="ap-south")
    [host(slots=1, region="ap-south") for _ in range(1)]
    [host(slots=1, region="eu-west") for _ in range(3)]
    tasks_claim_batch()
    assert services._SHAPE_SHARES[task_view(wants_region)] == 0.25
