"""Owners set a policy the dispatcher obeys; power readings are kept small and per host."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from hearth_agent import protocol
from marketplace.hosts.models import Host, PowerSample
from marketplace.hosts.power import power_record, power_rollup
from marketplace.jobs.models import Task
from marketplace.jobs.services import check_job_spec, job_submit, task_release
from marketplace.matching.services import tasks_claim_for_host
from tests.factories import HostFactory

pytestmark = pytest.mark.django_db


def _owner_client(host: Host) -> APIClient:
    client = APIClient()
    client.force_authenticate(host.owner)
    return client


def _power(**readings: Any) -> protocol.PowerPayload:
    return protocol.PowerPayload(**{"source": "simulator", "work_allowed": True, **readings})


def _job(buyer: Any, *, n: int = 4, green_only: bool = False) -> None:
    spec = check_job_spec(
        model_name="all-MiniLM-L6-v2", inputs=[f"s{i}" for i in range(n)], task_size=1, green_only=green_only
    )
    job_submit(buyer=buyer, spec=spec)


def test_an_owner_updates_the_policy_and_the_version_goes_up(host: Host) -> None:
    client = _owner_client(host)
    response = client.put(
        f"/api/v1/hosts/{host.pk}/policy",
        {"battery_reserve_pct": 35, "allowed_hours": [22, 7, 7]},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["battery_reserve_pct"] == 35
    assert response.json()["allowed_hours"] == [7, 22]
    assert response.json()["version"] == 1
    assert (
        client.put(f"/api/v1/hosts/{host.pk}/policy", {"solar_surplus_only": True}, format="json").json()[
            "version"
        ]
        == 2
    )
    stored = client.get(f"/api/v1/hosts/{host.pk}/policy").json()
    assert (stored["battery_reserve_pct"], stored["solar_surplus_only"]) == (35, True)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"battery_reserve_pct": 120}, "battery_reserve_pct"),
        ({"allowed_hours": [24]}, "allowed_hours"),
        ({"max_gpu_watts": 0}, "max_gpu_watts"),
        ({"price_per_1k_items_minor": 1.5}, "price_per_1k_items_minor"),
        ({"colour": "green"}, "colour"),
    ],
)
def test_a_bad_policy_value_gets_400_naming_the_field_and_changes_nothing(
    host: Host, change: dict[str, Any], field: str
) -> None:
    client = _owner_client(host)
    before = client.get(f"/api/v1/hosts/{host.pk}/policy").json()
    response = client.put(f"/api/v1/hosts/{host.pk}/policy", change, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert client.get(f"/api/v1/hosts/{host.pk}/policy").json() == before


def test_another_owners_machine_policy_is_404(host: Host) -> None:
    stranger = APIClient()
    stranger.force_authenticate(HostFactory.create().owner)
    assert stranger.get(f"/api/v1/hosts/{host.pk}/policy").status_code == 404
    assert (
        stranger.put(f"/api/v1/hosts/{host.pk}/policy", {"battery_reserve_pct": 1}, format="json").status_code
        == 404
    )


def test_a_battery_under_the_reserve_stops_new_work(buyer: Any, catalog: Any, host: Host) -> None:
    _job(buyer)
    power_record(
        host_id=host.pk,
        channel_name=host.channel_name,
        payload=_power(battery_soc_pct=12.0, grid_w=0),
        at=timezone.now(),
    )
    assert tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name) == []
    power_record(
        host_id=host.pk,
        channel_name=host.channel_name,
        payload=_power(battery_soc_pct=45.0, grid_w=0),
        at=timezone.now(),
    )
    assert len(tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name)) == 2


def test_an_agent_that_says_no_gets_no_work(buyer: Any, catalog: Any, host: Host) -> None:
    _job(buyer)
    payload = _power(work_allowed=False, reason="04:00 is outside the allowed hours")
    power_record(host_id=host.pk, channel_name=host.channel_name, payload=payload, at=timezone.now())
    assert tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name) == []


def test_a_draining_host_gets_no_work(buyer: Any, catalog: Any) -> None:
    host = HostFactory.create(draining=True)
    _job(buyer)
    assert tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name) == []


def test_green_only_jobs_go_only_to_hosts_running_on_their_own_power(buyer: Any, catalog: Any) -> None:
    on_grid, on_solar = HostFactory.create(slots=4), HostFactory.create(slots=4)
    _job(buyer, n=2, green_only=True)
    now = timezone.now()
    power_record(
        host_id=on_grid.pk,
        channel_name=on_grid.channel_name,
        payload=_power(grid_w=900.0, solar_w=0.0, load_w=900.0),
        at=now,
    )
    power_record(
        host_id=on_solar.pk,
        channel_name=on_solar.channel_name,
        payload=_power(grid_w=-400.0, solar_w=1800.0, load_w=1400.0),
        at=now,
    )
    assert tasks_claim_for_host(host_id=on_grid.pk, channel_name=on_grid.channel_name) == []
    assert len(tasks_claim_for_host(host_id=on_solar.pk, channel_name=on_solar.channel_name)) == 2


def test_a_stale_power_reading_does_not_make_a_host_green(buyer: Any, catalog: Any, host: Host) -> None:
    _job(buyer, n=1, green_only=True)
    long_ago = timezone.now() - timedelta(hours=1)
    power_record(host_id=host.pk, channel_name=host.channel_name, payload=_power(grid_w=-500.0), at=long_ago)
    assert tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name) == []


def test_a_released_task_is_requeued_without_spending_an_attempt(
    buyer: Any, catalog: Any, host: Host
) -> None:
    _job(buyer, n=1)
    assignment = tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name)[0]
    release = protocol.TaskReleasePayload(
        task_id=str(assignment.task_id), lease_id=str(assignment.lease_id), reason="owner is draining"
    )
    assert task_release(host_id=host.pk, payload=release).accepted
    task = Task.objects.get(pk=assignment.task_id)
    assert (task.status, task.attempt, task.last_error) == (
        "queued",
        0,
        "released by the agent: owner is draining",
    )
    assert not task_release(host_id=host.pk, payload=release).accepted


def test_readings_in_one_minute_share_one_bucket_with_per_meter_averages(host: Host) -> None:
    start = timezone.now().replace(second=0, microsecond=0)
    for second, soc in ((1, 50.0), (20, 52.0), (40, 54.0)):
        power_record(
            host_id=host.pk,
            channel_name=host.channel_name,
            payload=_power(battery_soc_pct=soc),
            at=start + timedelta(seconds=second),
        )
    power_record(
        host_id=host.pk,
        channel_name=host.channel_name,
        payload=_power(gpu_w=120.0),
        at=start + timedelta(seconds=50),
    )
    bucket = PowerSample.objects.get(host=host)
    assert bucket.samples == 4
    assert bucket.average("battery_soc_pct") == 52.0
    assert bucket.average("gpu_w") == 120.0
    assert bucket.average("solar_w") is None
    host.refresh_from_db()
    assert host.gpu_w == 120.0 and host.battery_soc_pct is None


def test_old_minute_buckets_roll_up_into_hours_and_the_rollup_is_idempotent(host: Host) -> None:
    now = timezone.now()
    three_days_ago = (now - timedelta(days=3)).replace(minute=0, second=0, microsecond=0)
    for minute in range(60):
        power_record(
            host_id=host.pk,
            channel_name=host.channel_name,
            payload=_power(solar_w=float(minute)),
            at=three_days_ago + timedelta(minutes=minute),
        )
    power_record(host_id=host.pk, channel_name=host.channel_name, payload=_power(solar_w=7.0), at=now)
    assert PowerSample.objects.filter(host=host, resolution_s=60).count() == 61
    assert power_rollup(now=now) == 60
    assert power_rollup(now=now) == 0
    hour = PowerSample.objects.get(host=host, resolution_s=3600)
    assert (hour.samples, hour.average("solar_w")) == (60, 29.5)
    assert PowerSample.objects.filter(host=host, resolution_s=60).count() == 1
    history = _owner_client(host).get(f"/api/v1/hosts/{host.pk}/power?hours=100").json()
    assert [row["resolution_s"] for row in history] == [3600, 60]


def test_the_power_history_names_a_bad_hours_parameter(host: Host) -> None:
    response = _owner_client(host).get(f"/api/v1/hosts/{host.pk}/power?hours=soon")
    assert response.status_code == 400
    assert "hours" in response.json()


def test_a_job_reports_the_energy_of_its_tasks(buyer: Any, catalog: Any, host: Host, api: APIClient) -> None:
    _job(buyer, n=2)
    job_id = api.get("/api/v1/jobs").json()[0]["id"]
    Task.objects.filter(job_id=job_id, index=0).update(
        status="succeeded", energy_wh=0.25, energy_source="estimate"
    )
    Task.objects.filter(job_id=job_id, index=1).update(
        status="succeeded", energy_wh=0.5, energy_source="nvml"
    )
    energy = api.get(f"/api/v1/jobs/{job_id}").json()["energy"]
    assert (energy["wh"], energy["measured_wh"], energy["estimated_wh"]) == (0.75, 0.5, 0.25)


def test_green_only_must_be_a_boolean(api: APIClient, catalog: Any) -> None:
    response = api.post(
        "/api/v1/jobs", {"model": "all-MiniLM-L6-v2", "inputs": ["a"], "green_only": "maybe"}, format="json"
    )
    assert response.status_code == 400
    assert "green_only" in response.json()
