"""A job through the public API comes back equal to running the model directly."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from marketplace.devstack import LocalStack

pytestmark = pytest.mark.integration

SENTENCES = [
    f"Home battery {i} charged from rooftop solar at {i % 24}:00 while the GPU idled." for i in range(150)
]


def _results(stack: LocalStack, api_key: str, job_id: str) -> list[dict[str, Any]]:
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        response = http.get(f"/api/v1/jobs/{job_id}/results")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.text.splitlines()]


def test_results_equal_embedding_the_same_sentences_directly(
    stack: LocalStack, fleet: list[Any], minilm: Any
) -> None:
    api_key = stack.buyer()
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        created = http.post(
            "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": SENTENCES, "task_size": 16}
        )
        assert created.status_code == 201, created.text
    job = stack.wait_job(api_key=api_key, job_id=created.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["items_done"] == len(SENTENCES)
    assert job["tasks"]["succeeded"] == 10

    rows = _results(stack, api_key, job["id"])
    assert [row["index"] for row in rows] == list(range(len(SENTENCES)))
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    expected = minilm.encode(SENTENCES, convert_to_numpy=True)
    cosine = (got * expected).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999, f"lowest cosine {cosine.min()} at item {cosine.argmin()}"


def test_a_jsonl_upload_runs_like_inline_inputs(stack: LocalStack, fleet: list[Any], minilm: Any) -> None:
    api_key = stack.buyer()
    lines = "\n".join(json.dumps({"text": s}) for s in SENTENCES[:20]).encode()
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        created = http.post(
            "/api/v1/jobs",
            data={"model": "all-MiniLM-L6-v2", "task_size": "7"},
            files={"file": ("inputs.jsonl", lines, "application/x-ndjson")},
        )
        assert created.status_code == 201, created.text
    job = stack.wait_job(api_key=api_key, job_id=created.json()["id"])
    assert job["status"] == "succeeded"
    rows = _results(stack, api_key, job["id"])
    expected = minilm.encode(SENTENCES[:20], convert_to_numpy=True)
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    assert np.allclose(got, expected, atol=1e-4)


def test_agents_report_the_network_isolation_they_got(
    stack: LocalStack, fleet: list[Any], owner: Any
) -> None:
    with stack.client(auth=owner) as http:
        hosts = http.get("/api/v1/hosts").json()
    assert len(hosts) >= 2
    for host in hosts:
        assert any(layer.startswith("netns") for layer in host["isolation"]), host
        assert host["device"] == "cpu"
