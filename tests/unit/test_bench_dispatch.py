"""`python -m bench.dispatch` at a toy scale on the test database: it runs, and it leases each task once."""

from __future__ import annotations

import pytest
from django.db import connection

from bench.dispatch import run
from marketplace.jobs.models import Task

KEYS = {
    "tasks_per_s",
    "p50_assign_ms",
    "p99_assign_ms",
    "baseline_tasks_per_s",
    "ratio_vs_baseline",
    "ratio_vs_boinc",
    "batch_assigned",
    "baseline_assigned",
    "half_load_submitted",
    "half_load_assigned",
    "left_queued",
    "restricted_rounds_mean",
    "restricted_rounds_max",
    "restricted_burst_p99_ms",
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="the bench is PostgreSQL's: its buyers and hosts run in a second process, which SQLite's "
    "in-memory test database cannot be shared with",
)
def test_the_dispatch_bench_reports_its_figures_and_leases_every_task_exactly_once() -> None:
    figures = run(
        hosts=50,
        tasks=500,
        buyers=5,
        jobs=10,
        limit=200,
        baseline_tasks=20,
        latency_s=0.3,
        restricted_bursts_n=3,
    )
    assert set(figures) >= KEYS
    assert figures["assigned_once"] is True
    assert figures["baseline_assigned"] == 20
    assert figures["batch_assigned"] > 0
    assert figures["half_load_assigned"] == figures["half_load_submitted"]
    # Every burst for the one region was placed, each within the rounds the bench allows it.
    assert figures["restricted_bursts"] == 3 and figures["restricted_burst_tasks"] > 0
    assert figures["restricted_placed"] == figures["restricted_submitted"]
    assert 1 <= figures["restricted_rounds_mean"] <= figures["restricted_rounds_max"] < 50
    burst_hosts = Task.objects.filter(job__region="ap-south").values_list("leased_to__region", flat=True)
    assert set(burst_hosts) == {"ap-south"}
    leased = (
        figures["batch_assigned"]
        + figures["baseline_assigned"]
        + figures["half_load_assigned"]
        + figures["restricted_placed"]
    )
    assert Task.objects.exclude(status="queued").count() == leased
    assert not Task.objects.filter(attempt__gt=1).exists()
    assert Task.objects.filter(status="queued").count() == figures["left_queued"]
