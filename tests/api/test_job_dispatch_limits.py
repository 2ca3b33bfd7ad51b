"""A job's dispatch limits over the API: priority, deadline and region at submit, and the reason a
job stays queued when no online host can take it."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.jobs.models import Job
from tests.fake_runs import claim, host

pytestmark = pytest.mark.django_db

MODEL = "all-MiniLM-L6-v2"


def _in(minutes: int) -> str:
    return (timezone.now() + timedelta(minutes=minutes)).isoformat()


def _submit(api: APIClient, **limits: Any) -> Any:
    return api.post("/api/v1/jobs", {"model": MODEL, "inputs": ["a", "b"], **limits}, format="json")


def test_it_stores_priority_deadline_and_region_and_shows_them(api: APIClient, catalog: Any) -> None:
    deadline = timezone.now() + timedelta(hours=2)
    response = _submit(api, priority=8, deadline=deadline.isoformat(), region="EU-West")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["priority"], body["region"]) == (8, "eu-west")
    job = Job.objects.get(pk=body["id"])
    assert (job.priority, job.deadline, job.region) == (8, deadline, "eu-west")


def test_it_defaults_to_priority_5_no_deadline_and_any_region(api: APIClient, catalog: Any) -> None:
    body = _submit(api).json()
    assert (body["priority"], body["deadline"], body["region"]) == (5, None, "")


def test_it_reads_a_deadline_without_an_offset_as_utc(api: APIClient, catalog: Any) -> None:
    naive = (timezone.now() + timedelta(hours=1)).replace(tzinfo=None, microsecond=0)
    job = Job.objects.get(pk=_submit(api, deadline=naive.isoformat()).json()["id"])
    assert job.deadline is not None and job.deadline.replace(tzinfo=None) == naive


def test_it_accepts_the_limits_as_form_fields_beside_a_jsonl_upload(api: APIClient, catalog: Any) -> None:
    upload = io.BytesIO(b'"first"\n"second"\n')
    upload.name = "inputs.jsonl"
    form = {"model": MODEL, "file": upload, "priority": "3", "region": "us-east", "deadline": _in(30)}
    response = api.post("/api/v1/jobs", form, format="multipart")
    assert response.status_code == 201, response.content
    assert (response.json()["priority"], response.json()["region"]) == (3, "us-east")


@pytest.mark.parametrize(
    ("limits", "field", "fragment"),
    [
        ({"priority": 10}, "priority", "from 0 to 9"),
        ({"priority": -1}, "priority", "from 0 to 9"),
        ({"priority": 2.5}, "priority", "integer"),
        ({"priority": True}, "priority", "integer"),
        ({"priority": "high"}, "priority", "priority must be a number"),
        ({"deadline": "next tuesday"}, "deadline", "ISO 8601"),
        ({"deadline": 1767225600}, "deadline", "ISO 8601"),
        ({"deadline": "2001-01-01T00:00:00Z"}, "deadline", "not in the future"),
        ({"region": "eu west!"}, "region", "lowercase letters, digits and dashes"),
        ({"region": "x" * 33}, "region", "up to 32"),
        ({"region": 7}, "region", "string"),
    ],
)
def test_it_rejects_a_bad_limit_with_400_naming_the_field(
    api: APIClient, catalog: Any, limits: dict[str, Any], field: str, fragment: str
) -> None:
    response = _submit(api, **limits)
    assert response.status_code == 400, response.content
    assert fragment in " ".join(response.json()[field])
    assert Job.objects.count() == 0


def test_a_job_no_online_host_can_serve_says_why(api: APIClient, catalog: Any) -> None:
    job_id = _submit(api).json()["id"]
    assert api.get(f"/api/v1/jobs/{job_id}").json()["queued_reason"] == "no host online"

    host(policy={"price_per_1k_items_minor": 150})
    host(policy={"price_per_1k_items_minor": 400})
    body = api.get(f"/api/v1/jobs/{job_id}").json()
    assert body["status"] == "queued"
    assert body["queued_reason"] == "no online host asks ≤ 100 per 1k items (cheapest online: 150)"


@pytest.mark.parametrize(
    ("limits", "host_fields", "reason"),
    [
        ({}, {"memory_mb": 256}, "no online host has"),
        ({"green_only": True}, {}, "no online host is on solar/battery now"),
        ({"region": "eu-west"}, {"region": "us-east"}, "no online host is in region 'eu-west'"),
        ({}, {"verified_at": None}, "no online host is verified yet"),
        ({}, {"draining": True}, "no online host takes work now (one says: owner is draining"),
    ],
)
def test_the_queued_reason_names_the_limit_no_online_host_meets(
    api: APIClient, catalog: Any, limits: dict[str, Any], host_fields: dict[str, Any], reason: str
) -> None:
    host(**host_fields)
    body = _submit(api, **limits).json()
    assert body["queued_reason"] is not None and body["queued_reason"].startswith(reason)


def test_the_queued_reason_is_null_when_a_host_can_take_the_job_or_it_runs(
    api: APIClient, catalog: Any
) -> None:
    machine = host(policy={"price_per_1k_items_minor": 20})
    job_id = _submit(api).json()["id"]
    assert api.get(f"/api/v1/jobs/{job_id}").json()["queued_reason"] is None
    claim(machine)
    body = api.get(f"/api/v1/jobs/{job_id}").json()
    assert (body["status"], body["queued_reason"]) == ("running", None)


def test_an_offline_host_does_not_count_as_able_to_serve(api: APIClient, catalog: Any) -> None:
    host(status="offline", channel_name="")
    assert _submit(api).json()["queued_reason"] == "no host online"


def test_the_job_list_reads_the_online_hosts_once_however_many_jobs_are_queued(
    api: APIClient, catalog: Any
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    host(memory_mb=256)

    def host_reads() -> tuple[int, list[Any]]:
        with CaptureQueriesContext(connection) as queries:
            body = api.get("/api/v1/jobs").json()
        return sum('FROM "hosts_host"' in q["sql"] for q in queries.captured_queries), body

    _submit(api)
    one, _ = host_reads()
    for _ in range(5):
        _submit(api)
    six, body = host_reads()
    assert len(body) == 6 and all(j["queued_reason"].startswith("no online host has") for j in body)
    assert six == one
