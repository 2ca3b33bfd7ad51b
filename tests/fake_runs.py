"""Hosts answering tasks at the service level, with vectors made to order instead of agents: what
verification and billing tests drive jobs with."""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np

from hearth_agent import protocol
from marketplace.hosts.models import Host
from marketplace.jobs.models import Job, Task
from marketplace.jobs.selectors import job_results_jsonl
from marketplace.jobs.services import check_job_spec, job_submit, task_result_accept
from marketplace.matching.services import Assignment, tasks_claim_for_host
from marketplace.trust.models import CanaryItem
from tests.factories import HostFactory

DIM = 384
_TRUTH: dict[str, np.ndarray] = {}


def truth(text: str) -> np.ndarray:
    """The "real model": a fixed unit vector per input."""
    if text not in _TRUTH:
        vector = np.random.default_rng(abs(hash(text)) % 2**32).normal(size=DIM)
        _TRUTH[text] = (vector / np.linalg.norm(vector)).astype("<f4")
    return _TRUTH[text]


def honest(inputs: list[str], *, noise: float = 1e-3) -> np.ndarray:
    """What a different but honest machine returns: the truth plus bf16-sized rounding noise."""
    rng = np.random.default_rng()
    return np.stack([truth(t) + rng.normal(scale=noise / np.sqrt(DIM), size=DIM) for t in inputs]).astype(
        "<f4"
    )


def cheat_random(inputs: list[str]) -> np.ndarray:
    return np.random.default_rng().normal(size=(len(inputs), DIM)).astype("<f4")


def payload(assignment: Assignment, vectors: np.ndarray) -> protocol.TaskResultPayload:
    b64, digest = protocol.encode_embeddings(vectors.astype("<f4").tobytes())
    return protocol.TaskResultPayload(
        task_id=str(assignment.task_id),
        lease_id=str(assignment.lease_id),
        dimension=DIM,
        count=len(vectors),
        embeddings_b64=b64,
        output_sha256=digest,
        compute_ms=1.0,
        device="cpu",
    )


def host(**fields: Any) -> Host:
    return HostFactory.create(**fields)


def claim(host: Host) -> list[Assignment]:
    return tasks_claim_for_host(host_id=host.pk, channel_name=host.channel_name)


def run(host: Host, answer: Any = honest) -> int:
    """The host claims what it can and answers every task; returns how many it ran."""
    assignments = claim(host)
    for assignment in assignments:
        assert task_result_accept(
            host_id=host.pk, payload=payload(assignment, answer(assignment.inputs))
        ).accepted
    return len(assignments)


def job(buyer: Any, n: int = 4, task_size: int = 2, **verification: Any) -> Job:
    spec = check_job_spec(
        model_name="all-MiniLM-L6-v2",
        inputs=[f"sentence {uuid.uuid4().hex[:6]} {i}" for i in range(n)],
        task_size=task_size,
        **verification,
    )
    return job_submit(buyer=buyer, spec=spec)


def served(job: Job) -> np.ndarray:
    return np.array([json.loads(line)["embedding"] for line in job_results_jsonl(job=job)], dtype="<f4")


def expected(job: Job) -> np.ndarray:
    inputs = [
        t for task in Task.objects.filter(job=job, role="primary").order_by("index") for t in task.inputs
    ]
    return np.stack([truth(t) for t in inputs])


def canary_bank(model: Any, size: int = 12) -> list[CanaryItem]:
    """Known-answer items whose answers are `truth`, as catalog_sync would compute them."""
    texts = [f"canary sentence number {i}" for i in range(size)]
    return CanaryItem.objects.bulk_create(
        CanaryItem(model=model, weights_sha256=model.weights_sha256, text=t, embedding=truth(t).tobytes())
        for t in texts
    )
