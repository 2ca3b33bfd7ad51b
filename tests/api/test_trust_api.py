"""The trust API: a host owner reads its machine's reliability; buyers choose a verification level."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from marketplace.jobs.models import Job, Task
from marketplace.trust.services import score_update, strike

pytestmark = pytest.mark.django_db


def test_the_owner_reads_the_score_its_parts_the_strikes_and_each_change_with_its_reason(
    owner_api: APIClient, host: Any
) -> None:
    score_update(host_id=host.pk, reason="first look")
    strike(host_id=host.pk, kind="mismatch", evidence="item 3 of 8 has cosine 0.41")
    body = owner_api.get(f"/api/v1/hosts/{host.pk}/reliability").json()
    assert body["verified"] is True and body["quarantined"] is False
    assert set(body["uptime"]) == {"24h", "7d", "30d"}
    assert set(body["score_parts"]) == {"uptime", "completion_rate", "pass_rate", "strike_penalty"}
    assert body["strikes"][0]["kind"] == "mismatch" and "cosine 0.41" in body["strikes"][0]["evidence"]
    newest = body["events"][0]
    assert newest["score_after"] < newest["score_before"]
    assert "strike" in newest["reason"] and "cosine 0.41" in newest["reason"]
    assert owner_api.get("/api/v1/hosts").json()[0]["trust"]["reliability"] == newest["score_after"]


def test_another_owners_machine_reliability_is_not_found(api: APIClient, host: Any) -> None:
    assert api.get(f"/api/v1/hosts/{host.pk}/reliability").status_code == 404


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"verification": "paranoid"}, "verification", "must be one of none, spot, redundant"),
        ({"verification": "spot", "spot_fraction": 0}, "spot_fraction", "above 0 and at most 1"),
        ({"verification": "spot", "spot_fraction": 1.5}, "spot_fraction", "above 0 and at most 1"),
        ({"verification": "spot", "spot_fraction": "lots"}, "spot_fraction", "must be a number"),
        ({"verification": "redundant", "replicas": 1}, "replicas", "from 2 to 5"),
        ({"verification": "redundant", "replicas": 9}, "replicas", "from 2 to 5"),
        ({"verification": "none", "replicas": 3}, "replicas", "redundant' only"),
        ({"spot_fraction": 0.2}, "spot_fraction", "spot' only"),
    ],
)
def test_a_bad_verification_request_is_refused_naming_the_field_and_stores_nothing(
    api: APIClient, catalog: Any, fields: dict[str, Any], field: str, words: str
) -> None:
    response = api.post(
        "/api/v1/jobs", {"model": catalog.name, "inputs": ["a", "b"], **fields}, format="json"
    )
    assert response.status_code == 400, response.content
    assert words in " ".join(response.json()[field])
    assert Job.objects.count() == 0 and Task.objects.count() == 0


def test_a_redundant_job_reports_its_level_and_its_extra_runs(api: APIClient, catalog: Any) -> None:
    response = api.post(
        "/api/v1/jobs",
        {
            "model": catalog.name,
            "inputs": ["a", "b", "c"],
            "task_size": 1,
            "verification": "redundant",
            "replicas": 3,
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    verification = response.json()["verification"]
    assert (verification["level"], verification["replicas"], verification["extra_runs"]) == (
        "redundant",
        3,
        6,
    )
    assert response.json()["tasks"]["queued"] == 3
