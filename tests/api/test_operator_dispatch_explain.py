"""An operator asks why a host does or does not get a task: the filter that says no, and the score."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from marketplace.jobs.models import Task
from tests.factories import UserFactory
from tests.fake_runs import host, job

pytestmark = pytest.mark.django_db

URL = "/api/v1/operator/dispatch/explain"


@pytest.fixture
def operator_api(db: Any) -> APIClient:
    from marketplace.accounts.services import api_key_create

    staff = UserFactory.create(is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=staff, name='ops').plaintext}")
    return client


@pytest.fixture
def task(buyer: Any, catalog: Any) -> Task:
    return Task.objects.filter(job=job(buyer, n=2, task_size=2, region="eu-west")).get()


def _explain(client: APIClient, task: Any, machine: Any) -> Any:
    return client.get(URL, {"task": str(task.pk), "host": str(machine.pk)})


def test_it_shows_an_eligible_host_with_the_parts_of_its_score(operator_api: APIClient, task: Task) -> None:
    machine = host(region="eu-west", benchmark={"minilm_items_per_s": 300.0}, reliability=0.9)
    response = _explain(operator_api, task, machine)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["eligible"] is True and body["rejected_by"] is None
    score = body["score"]
    assert set(score) == {"price", "throughput", "reliability", "energy", "region", "total"}
    assert score["throughput"] > 0 and score["region"] > 0 and score["energy"] == 0
    assert score["total"] == pytest.approx(sum(v for k, v in score.items() if k != "total"), abs=1e-3)


@pytest.mark.parametrize(
    ("host_fields", "reason"),
    [
        ({"region": "us-east"}, "job asks region 'eu-west', host is in 'us-east'"),
        ({"region": "eu-west", "policy": {"price_per_1k_items_minor": 150}}, "host asks 150 per 1k items"),
        ({"region": "eu-west", "ready": False}, "agent is not ready"),
        ({"region": "eu-west", "memory_mb": 1}, "host has 1 MB"),
    ],
)
def test_it_names_the_filter_that_rejects_a_host(
    operator_api: APIClient, task: Task, host_fields: dict[str, Any], reason: str
) -> None:
    body = _explain(operator_api, task, host(**host_fields)).json()
    assert body["eligible"] is False
    assert body["rejected_by"].startswith(reason)
    assert "total" in body["score"]


def test_it_says_when_the_task_itself_is_not_dispatchable(operator_api: APIClient, task: Task) -> None:
    machine = host(region="eu-west")
    Task.objects.filter(pk=task.pk).update(status="leased")
    assert _explain(operator_api, task, machine).json()["rejected_by"] == "task is leased, not queued"
    Task.objects.filter(pk=task.pk).update(status="queued", needs_trusted=True)
    untrusted = host(region="eu-west", reliability=0.1)
    assert _explain(operator_api, task, untrusted).json()["rejected_by"] == (
        "a tie-break runs only on a trusted host"
    )
    Task.objects.filter(pk=task.pk).update(needs_trusted=False, completed_by=machine)
    assert _explain(operator_api, task, machine).json()["rejected_by"].startswith("host already ran these")


def test_it_answers_401_without_credentials(task: Task, host: Any) -> None:
    assert _explain(APIClient(), task, host).status_code == 401


def test_it_answers_403_to_a_buyer_who_is_not_staff(api: APIClient, task: Task, host: Any) -> None:
    assert _explain(api, task, host).status_code == 403


@pytest.mark.parametrize(
    ("query", "field", "fragment"),
    [
        ({"host": "HOST"}, "task", "task is required"),
        ({"task": "TASK"}, "host", "host is required"),
        ({"task": "not-a-uuid", "host": "HOST"}, "task", "must be a task id"),
        ({"task": "TASK", "host": "42"}, "host", "must be a host id"),
    ],
)
def test_it_answers_400_naming_a_missing_or_bad_parameter(
    operator_api: APIClient, task: Task, host: Any, query: dict[str, str], field: str, fragment: str
) -> None:
    params = {k: {"TASK": str(task.pk), "HOST": str(host.pk)}.get(v, v) for k, v in query.items()}
    response = operator_api.get(URL, params)
    assert response.status_code == 400
    assert fragment in " ".join(response.json()[field])


def test_it_answers_404_for_an_unknown_task_or_host(operator_api: APIClient, task: Task, host: Any) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    assert operator_api.get(URL, {"task": unknown, "host": str(host.pk)}).status_code == 404
    assert operator_api.get(URL, {"task": str(task.pk), "host": unknown}).status_code == 404
