"""The worker embeds with the real MiniLM exactly as sentence-transformers does, stays warm across
batches, and is replaced when it crashes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from hearth_agent.supervisor import EmbedResult, WorkerCrashed

from .conftest import WarmWorker

SENTENCES = [
    "The cat sits on the mat.",
    "A feline rests on a rug.",
    "Quarterly revenue grew by twelve percent.",
    "Hearth runs inference on home GPUs.",
    "",
    "naïve café — unicode ✓",
]


def _embed(worker: WarmWorker, inputs: list[str]) -> EmbedResult:
    return worker.loop.run(
        worker.supervisor.embed(model_dir=worker.model_dir, model_sha256=worker.model_sha, inputs=inputs)
    )


def _vectors(result: EmbedResult) -> np.ndarray:
    return np.frombuffer(result.embeddings, dtype="<f4").reshape(result.count, result.dimension)


@pytest.fixture(scope="module")
def reference(minilm_source: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_source), device="cpu")
    return np.asarray(model.encode(SENTENCES, convert_to_numpy=True), dtype=np.float32)


def test_it_embeds_like_sentence_transformers_in_process(
    minilm_worker: WarmWorker, reference: np.ndarray
) -> None:
    result = _embed(minilm_worker, SENTENCES)
    vectors = _vectors(result)
    assert (result.count, result.dimension) == (len(SENTENCES), 384)
    assert result.device == "cpu"
    cosine = (vectors * reference).sum(1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.9999
    # MiniLM's pipeline ends in a Normalize module: unit vectors, as the model's own pipeline makes them.
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_it_keeps_the_model_warm_between_batches(minilm_worker: WarmWorker) -> None:
    first = _embed(minilm_worker, ["warm up"])
    started = time.perf_counter()
    second = _embed(minilm_worker, ["still warm", "no reload"])
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert second.model_loads == first.model_loads
    assert second.load_ms == 0.0
    assert elapsed_ms < 2000, f"a warm batch of two took {elapsed_ms:.0f} ms"
    assert minilm_worker.supervisor.warm_models == [minilm_worker.model_sha]


def test_a_bad_request_fails_the_batch_but_not_the_worker(minilm_worker: WarmWorker, tmp_path: Path) -> None:
    from hearth_agent.supervisor import WorkerError

    pid = minilm_worker.supervisor.info.pid if minilm_worker.supervisor.info else None
    with pytest.raises(WorkerError):
        minilm_worker.loop.run(
            minilm_worker.supervisor.embed(
                model_dir=minilm_worker.cache / "missing", model_sha256="m" * 64, inputs=["x"]
            )
        )
    assert _embed(minilm_worker, ["still alive"]).count == 1
    assert minilm_worker.supervisor.info is not None and minilm_worker.supervisor.info.pid == pid


def test_a_crashed_worker_fails_its_batch_and_is_replaced(minilm_worker: WarmWorker) -> None:
    supervisor = minilm_worker.supervisor
    assert supervisor.info is not None
    old_pid, starts = supervisor.info.pid, supervisor.starts
    big_batch = ["a long sentence about nothing in particular " * 20] * 2000

    async def crash_mid_batch() -> None:
        import asyncio

        batch = asyncio.create_task(
            supervisor.embed(
                model_dir=minilm_worker.model_dir, model_sha256=minilm_worker.model_sha, inputs=big_batch
            )
        )
        await asyncio.sleep(1.0)
        os.kill(old_pid, signal.SIGKILL)
        await batch

    with pytest.raises(WorkerCrashed, match="exited"):
        minilm_worker.loop.run(crash_mid_batch())
    result = _embed(minilm_worker, ["after the crash"])
    assert result.count == 1
    assert supervisor.starts == starts + 1
    assert supervisor.info is not None and supervisor.info.pid != old_pid
    assert supervisor.info.isolation  # the replacement is sandboxed again
