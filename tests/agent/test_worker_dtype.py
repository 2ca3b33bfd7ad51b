"""The worker's precision, an honest host's choice: a bfloat16 worker's vectors are within 0.999
cosine of float32's (a cheaper model's are not), yet not the same bytes; `hearth-agent run
--worker-dtype` reaches the worker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from hearth_agent.protocol import (
    CloseCode,
    Ready,
    TaskAssign,
    TaskAssignPayload,
    TaskResult,
    decode_embeddings,
)
from hearth_agent.supervisor import EmbedResult, WorkerSupervisor
from hearth_agent.worker import cheat_layers, worker_dtype

from .conftest import AgentRun, Conversation, WarmWorker, agent_run_against, model_routes

SENTENCES = [
    "The cat sits on the mat.",
    "A feline rests on a rug.",
    "Quarterly revenue grew by twelve percent.",
    "Hearth runs inference on home GPUs.",
    "",
    "naïve café — unicode ✓",
    "Solar panels on the roof charge the home battery at noon, and the car at night. " * 4,
]


def _rows(result: EmbedResult) -> np.ndarray:
    return np.frombuffer(result.embeddings, dtype="<f4").reshape(result.count, result.dimension)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def _embed(worker: WarmWorker, supervisor: WorkerSupervisor) -> EmbedResult:
    return worker.loop.run(
        supervisor.embed(model_dir=worker.model_dir, model_sha256=worker.model_sha, inputs=SENTENCES)
    )


@pytest.fixture(scope="module")
def float32(minilm_worker: WarmWorker) -> EmbedResult:
    return _embed(minilm_worker, minilm_worker.supervisor)


@pytest.fixture(scope="module")
def bfloat16(minilm_worker: WarmWorker) -> Iterator[EmbedResult]:
    supervisor = WorkerSupervisor(
        cache_dir=minilm_worker.cache, sandbox="auto", extra_env={"HEARTH_WORKER_DTYPE": "bfloat16"}
    )
    try:
        yield _embed(minilm_worker, supervisor)
    finally:
        minilm_worker.loop.run(supervisor.stop())


def test_a_bfloat16_worker_is_within_0_999_cosine_of_float32_per_item(
    float32: EmbedResult, bfloat16: EmbedResult
) -> None:
    assert (bfloat16.count, bfloat16.dimension) == (float32.count, float32.dimension) == (len(SENTENCES), 384)
    assert _cosines(_rows(bfloat16), _rows(float32)).min() >= 0.999
    # Still what the model's Normalize module makes: unit vectors, in float32.
    assert np.allclose(np.linalg.norm(_rows(bfloat16), axis=1), 1.0, atol=1e-4)


def test_a_bfloat16_worker_does_not_return_the_same_bytes_as_float32(
    float32: EmbedResult, bfloat16: EmbedResult
) -> None:
    assert bfloat16.embeddings != float32.embeddings
    assert not np.array_equal(_rows(bfloat16)[0], _rows(float32)[0])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "float32"),
        ({"HEARTH_WORKER_DTYPE": "bfloat16"}, "bfloat16"),
        ({"HEARTH_WORKER_DTYPE": ""}, "float32"),
    ],
)
def test_the_worker_takes_its_dtype_from_the_environment(env: dict[str, str], expected: str) -> None:
    assert worker_dtype(env) == expected


@pytest.mark.parametrize("env", [{"HEARTH_WORKER_DTYPE": "int8"}, {"HEARTH_WORKER_DTYPE": "fp16"}])
def test_an_unknown_worker_dtype_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="HEARTH_WORKER_DTYPE"):
        worker_dtype(env)


def test_the_worker_runs_every_layer_unless_a_test_cheats() -> None:
    assert cheat_layers({}) is None
    assert cheat_layers({"HEARTH_WORKER_CHEAT_LAYERS": "3"}) == 3
    with pytest.raises(ValueError):
        cheat_layers({"HEARTH_WORKER_CHEAT_LAYERS": "0"})


# ---- `hearth-agent run --worker-dtype` ------------------------------------------


@pytest.fixture(scope="module")
def bfloat16_agent(
    tmp_path_factory: pytest.TempPathFactory, minilm_source: Path, minilm_sha: str
) -> AgentRun:
    async def script(conversation: Conversation) -> None:
        await conversation.welcome()
        await conversation.until(lambda f: isinstance(f, Ready))
        payload = TaskAssignPayload(
            task_id="t1",
            lease_id="lease-t1",
            model_sha256=minilm_sha,
            model_name="all-MiniLM-L6-v2",
            inputs=SENTENCES,
            lease_expires_at=datetime.now(UTC) + timedelta(minutes=5),
        )
        await conversation.send(TaskAssign(payload=payload))
        await conversation.until(lambda f: isinstance(f, TaskResult))
        await conversation.close(CloseCode.TOKEN_REVOKED, "end of the script")

    home = tmp_path_factory.mktemp("agent-home")
    run = agent_run_against(
        script,
        home=home,
        routes=model_routes(minilm_source, minilm_sha),
        args=["--worker-dtype", "bfloat16"],
        # The flag wins over the environment.
        env={"HEARTH_WORKER_DTYPE": "float16"},
    )
    assert not run.script_errors and run.returncode == 3, run.log[-4000:]
    return run


def test_the_run_option_reaches_the_worker(
    bfloat16_agent: AgentRun, float32: EmbedResult, bfloat16: EmbedResult
) -> None:
    (result,) = bfloat16_agent.of(TaskResult)
    payload = result.payload
    got = np.frombuffer(decode_embeddings(payload), dtype="<f4").reshape(payload.count, payload.dimension)
    assert got.tobytes() != float32.embeddings
    assert _cosines(got, _rows(float32)).min() >= 0.999
    # bfloat16, not the environment's float16: the same bytes as the bfloat16 worker above.
    assert got.tobytes() == bfloat16.embeddings
