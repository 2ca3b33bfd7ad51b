"""Every bad job request gets its documented status, names the field, and stores nothing."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.test import override_settings

from marketplace.jobs.models import Job, Task

pytestmark = pytest.mark.django_db

MODEL = "all-MiniLM-L6-v2"


def _stored() -> tuple[int, int]:
    return Job.objects.count(), Task.objects.count()


def _jsonl(lines: list[str]) -> io.BytesIO:
    upload = io.BytesIO("\n".join(lines).encode())
    upload.name = "inputs.jsonl"
    return upload


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"model": MODEL, "inputs": []}, "inputs", "non-empty"),
        ({"model": MODEL}, "inputs", "required"),
        ({"model": MODEL, "inputs": "one string"}, "inputs", "list of strings"),
        ({"model": MODEL, "inputs": ["ok", 7]}, "inputs", "item 1 is int"),
        ({"model": MODEL, "inputs": ["ok", None]}, "inputs", "item 1 is NoneType"),
        ({"model": MODEL, "inputs": ["ok", "   "]}, "inputs", "item 1 is empty"),
        ({"model": "gpt-17", "inputs": ["ok"]}, "model", "unknown model 'gpt-17'"),
        ({"inputs": ["ok"]}, "model", "required"),
        ({"model": MODEL, "inputs": ["ok"], "task_size": 0}, "task_size", "from 1 to"),
        ({"model": MODEL, "inputs": ["ok"], "task_size": "big"}, "task_size", "integer"),
        ({"model": MODEL, "inputs": ["ok"], "task_size": True}, "task_size", "integer"),
    ],
)
def test_it_rejects_a_bad_inline_job_with_400_naming_the_field(
    api: Any, catalog: Any, body: dict[str, Any], field: str, fragment: str
) -> None:
    before = _stored()
    response = api.post("/api/v1/jobs", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert fragment in " ".join(response.json()[field])
    assert _stored() == before


def test_it_names_the_line_of_a_malformed_jsonl_upload(api: Any, catalog: Any) -> None:
    before = _stored()
    upload = _jsonl(['"first"', '{"text": "second"}', '{"text": unquoted}', '"fourth"'])
    response = api.post("/api/v1/jobs", {"model": MODEL, "file": upload}, format="multipart")
    assert response.status_code == 400
    assert response.json()["file"] == ["line 3: not valid JSON (Expecting value)"]
    assert _stored() == before


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['"ok"', "42"], "line 2: expected a string, got int"),
        (['{"txt": "typo"}'], 'line 1: expected a string or {"text": "..."}'),
        (["", "  "], "file holds no inputs"),
    ],
)
def test_it_rejects_jsonl_lines_that_are_not_texts(
    api: Any, catalog: Any, lines: list[str], message: str
) -> None:
    before = _stored()
    response = api.post("/api/v1/jobs", {"model": MODEL, "file": _jsonl(lines)}, format="multipart")
    assert response.status_code == 400
    assert response.json()["file"] == [message]
    assert _stored() == before


def test_it_rejects_inline_inputs_and_a_file_together(api: Any, catalog: Any) -> None:
    response = api.post(
        "/api/v1/jobs", {"model": MODEL, "inputs": "x", "file": _jsonl(['"a"'])}, format="multipart"
    )
    assert response.status_code == 400
    assert "inputs" in response.json()


@override_settings(HEARTH_MAX_JOB_ITEMS=5)
def test_it_answers_413_for_too_many_items(api: Any, catalog: Any) -> None:
    before = _stored()
    response = api.post("/api/v1/jobs", {"model": MODEL, "inputs": ["x"] * 6}, format="json")
    assert response.status_code == 413
    assert "limit is 5" in response.json()["detail"]
    assert _stored() == before


@override_settings(HEARTH_MAX_ITEM_CHARS=10)
def test_it_answers_413_for_an_item_that_is_too_long(api: Any, catalog: Any) -> None:
    response = api.post("/api/v1/jobs", {"model": MODEL, "inputs": ["short", "x" * 11]}, format="json")
    assert response.status_code == 413
    assert "item 1" in response.json()["detail"]


@override_settings(HEARTH_MAX_UPLOAD_BYTES=2048)
def test_it_answers_413_for_an_upload_over_the_byte_limit(api: Any, catalog: Any) -> None:
    before = _stored()
    upload = _jsonl([json.dumps("a sentence of some length " * 4)] * 40)
    response = api.post("/api/v1/jobs", {"model": MODEL, "file": upload}, format="multipart")
    assert response.status_code == 413
    assert _stored() == before


def test_it_accepts_a_jsonl_upload_and_splits_it_into_tasks(api: Any, catalog: Any) -> None:
    upload = _jsonl([json.dumps(f"sentence {i}") for i in range(10)])
    response = api.post(
        "/api/v1/jobs", {"model": MODEL, "file": upload, "task_size": "4"}, format="multipart"
    )
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    assert [t.item_count for t in job.tasks.order_by("index")] == [4, 4, 2]
    assert [t.inputs for t in job.tasks.order_by("index")][-1] == ["sentence 8", "sentence 9"]
    assert response.json()["tasks"]["queued"] == 3
