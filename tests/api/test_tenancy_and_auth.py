"""Unauthenticated requests get 401; another buyer's job looks like no job (404)."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def _submit(api: APIClient) -> str:
    response = api.post("/api/v1/jobs", {"model": "all-MiniLM-L6-v2", "inputs": ["a", "b"]}, format="json")
    assert response.status_code == 201
    return str(response.json()["id"])


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/api/v1/jobs"), ("post", "/api/v1/jobs"), ("get", "/api/v1/keys"), ("get", "/api/v1/hosts")],
)
def test_it_answers_401_without_credentials(method: str, path: str) -> None:
    response = getattr(APIClient(), method)(path)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_it_answers_401_for_an_unknown_api_key(catalog: Any) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer hk_not-a-real-key")
    assert client.get("/api/v1/jobs").status_code == 401


@pytest.mark.parametrize("suffix", ["", "/results", "/cancel"])
def test_it_answers_404_for_another_buyers_job(
    api: APIClient, other_api: APIClient, catalog: Any, suffix: str
) -> None:
    job_id = _submit(api)
    method = other_api.post if suffix == "/cancel" else other_api.get
    assert method(f"/api/v1/jobs/{job_id}{suffix}").status_code == 404
    assert api.get(f"/api/v1/jobs/{job_id}").json()["status"] == "queued"


def test_it_lists_only_the_buyers_own_jobs(api: APIClient, other_api: APIClient, catalog: Any) -> None:
    mine = _submit(api)
    _submit(other_api)
    assert [j["id"] for j in api.get("/api/v1/jobs").json()] == [mine]


def test_it_answers_404_for_a_job_id_that_is_not_a_uuid(api: APIClient) -> None:
    assert api.get("/api/v1/jobs/not-a-uuid").status_code == 404


def test_it_answers_409_for_results_of_an_unfinished_job(api: APIClient, catalog: Any) -> None:
    job_id = _submit(api)
    response = api.get(f"/api/v1/jobs/{job_id}/results")
    assert response.status_code == 409
    assert "queued" in response.json()["detail"]


def test_cancelling_a_queued_job_cancels_its_tasks(api: APIClient, catalog: Any) -> None:
    job_id = _submit(api)
    body = api.post(f"/api/v1/jobs/{job_id}/cancel").json()
    assert body["status"] == "cancelled"
    assert body["tasks"]["cancelled"] == 1
    assert api.post(f"/api/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
