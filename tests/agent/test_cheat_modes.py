"""The test-only dishonest agents ($HEARTH_AGENT_CHEAT): each lie as a pure transform, the `cheaper`
worker really running a different model, and real agent processes that claim a GPU, copy vectors
or hold leases silently. Without the variable the agent is honest and nothing changes."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hearth_agent.cheat import (
    CheatError,
    Cheats,
    cheats_from_env,
    cheats_parse,
    copied_result,
    hello_apply,
    report_apply,
    result_apply,
    worker_env,
)
from hearth_agent.protocol import (
    Benchmark,
    BenchmarkReport,
    CloseCode,
    Heartbeat,
    HelloPayload,
    Ready,
    TaskAssign,
    TaskAssignPayload,
    TaskFailed,
    TaskRelease,
    TaskResult,
    decode_embeddings,
)
from hearth_agent.supervisor import EmbedResult, WorkerSupervisor

from .conftest import AgentRun, Conversation, WarmWorker, agent_run_against, model_routes

GPU = "NVIDIA GeForce RTX 4090"
SENTENCES = [
    "The cat sits on the mat.",
    "Quarterly revenue grew by twelve percent.",
    "Hearth runs inference on home GPUs.",
]


def _result(rows: np.ndarray) -> EmbedResult:
    return EmbedResult(
        embeddings=rows.astype("<f4").tobytes(),
        count=rows.shape[0],
        dimension=rows.shape[1],
        compute_ms=12.0,
        load_ms=0.0,
        model_loads=1,
        device="cpu",
    )


def _rows(result: EmbedResult) -> np.ndarray:
    return np.frombuffer(result.embeddings, dtype="<f4").reshape(result.count, result.dimension)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


@pytest.fixture
def honest() -> EmbedResult:
    rows = np.random.default_rng(7).standard_normal((5, 384))
    return _result(rows / np.linalg.norm(rows, axis=1, keepdims=True))


REPORT = BenchmarkReport(
    key="k",
    measured_at="now",
    device="cpu",
    device_name="Intel(R) Xeon(R) Processor",
    cpu_count=2,
    matmul_fp32_gflops=120.0,
    matmul_half_gflops=900.0,
    half_dtype="bfloat16",
    memory_bandwidth_gbs=14.0,
    max_alloc_mb=2048,
)
HELLO = HelloPayload(
    agent_version="0.1.0",
    protocol_version=1,
    hostname="box",
    os="Linux",
    cpu_model="Intel(R) Xeon(R) Processor",
    cpu_count=2,
    memory_mb=32000,
    device="cpu",
    slots=2,
    benchmark=REPORT,
)


# ---- parsing ---------------------------------------------------------------


def test_without_the_variable_the_agent_is_honest_and_nothing_changes(honest: EmbedResult) -> None:
    cheats = cheats_from_env({})
    assert cheats.honest and cheats == cheats_parse("") == Cheats()
    assert result_apply(cheats, honest, np.random.default_rng()) == honest
    assert hello_apply(cheats, HELLO) == HELLO and report_apply(cheats, REPORT) == REPORT
    assert worker_env(cheats) == {}


def test_modes_come_from_a_comma_separated_list() -> None:
    cheats = cheats_from_env({"HEARTH_AGENT_CHEAT": f" random, cheaper ,claim-gpu:{GPU}"})
    assert cheats == Cheats(vectors="random", cheaper=True, claim_gpu=GPU)
    assert not cheats.honest
    assert cheats.describe() == f"random,cheaper,claim-gpu:{GPU}"


@pytest.mark.parametrize("text", ["bogus", "random,constant", "copy,silent", "claim-gpu:", "claim-gpu"])
def test_an_unknown_mode_or_two_vector_lies_at_once_are_refused(text: str) -> None:
    with pytest.raises(CheatError):
        cheats_parse(text)


# ---- the lies, as pure transforms -------------------------------------------


def test_random_replaces_every_vector_with_a_random_unit_vector_of_the_same_shape(
    honest: EmbedResult,
) -> None:
    cheated = result_apply(Cheats(vectors="random"), honest, np.random.default_rng(1))
    rows = _rows(cheated)
    assert (cheated.count, cheated.dimension, len(cheated.embeddings)) == (5, 384, len(honest.embeddings))
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert np.abs(_cosines(rows, _rows(honest))).max() < 0.3
    assert len({row.tobytes() for row in rows}) == 5
    again = result_apply(Cheats(vectors="random"), honest, np.random.default_rng(2))
    assert again.embeddings != cheated.embeddings


def test_constant_makes_every_vector_the_same_unit_vector(honest: EmbedResult) -> None:
    rows = _rows(result_apply(Cheats(vectors="constant"), honest, np.random.default_rng()))
    assert rows.shape == (5, 384)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert (rows == rows[0]).all()


@pytest.mark.parametrize(
    ("count", "order"), [(5, [0, 1, 2, 3, 4]), (2, [0, 1]), (7, [0, 1, 2, 3, 4, 0, 1]), (0, [])]
)
def test_copy_cycles_or_cuts_the_previous_tasks_vectors_to_the_count(
    honest: EmbedResult, count: int, order: list[int]
) -> None:
    copied = copied_result(honest, count=count)
    assert (copied.count, copied.dimension, copied.compute_ms) == (count, 384, 0.0)
    assert copied.embeddings == _rows(honest)[order].tobytes()


def test_claiming_a_gpu_changes_the_claims_and_none_of_the_measured_numbers(honest: EmbedResult) -> None:
    cheats = Cheats(claim_gpu=GPU)
    hello = hello_apply(cheats, HELLO)
    assert hello.device == "cuda"
    assert [(g.name, g.memory_mb) for g in hello.gpus] == [(GPU, 24576)]
    assert hello.benchmark == report_apply(cheats, REPORT)
    report = report_apply(cheats, REPORT)
    assert (report.device, report.device_name) == ("cuda", GPU)
    assert report.model_dump(exclude={"device", "device_name"}) == REPORT.model_dump(
        exclude={"device", "device_name"}
    )
    result = result_apply(cheats, honest, np.random.default_rng())
    assert result == dataclasses.replace(honest, device="cuda")


def test_cheaper_asks_the_worker_for_three_of_the_layers() -> None:
    assert worker_env(Cheats(cheaper=True)) == {"HEARTH_WORKER_CHEAT_LAYERS": "3"}


# ---- the cheaper worker, for real ---------------------------------------------


def test_a_cheaper_worker_really_runs_a_different_model(
    minilm_worker: WarmWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Through the agent's environment, as `hearth-agent run` sets it: the supervisor passes
    # HEARTH_WORKER_* on to the worker.
    monkeypatch.setenv("HEARTH_WORKER_CHEAT_LAYERS", "3")
    cheaper = WorkerSupervisor(cache_dir=minilm_worker.cache, sandbox="auto")
    try:
        got = minilm_worker.loop.run(
            cheaper.embed(
                model_dir=minilm_worker.model_dir, model_sha256=minilm_worker.model_sha, inputs=SENTENCES
            )
        )
    finally:
        minilm_worker.loop.run(cheaper.stop())
    want = minilm_worker.loop.run(
        minilm_worker.supervisor.embed(
            model_dir=minilm_worker.model_dir, model_sha256=minilm_worker.model_sha, inputs=SENTENCES
        )
    )
    assert (got.count, got.dimension) == (want.count, want.dimension)
    assert _cosines(_rows(got), _rows(want)).max() < 0.9


# ---- real dishonest agents ---------------------------------------------------------


def _assign(task_id: str, inputs: list[str], sha: str) -> TaskAssign:
    return TaskAssign(
        payload=TaskAssignPayload(
            task_id=task_id,
            lease_id=f"lease-{task_id}",
            model_sha256=sha,
            model_name="all-MiniLM-L6-v2",
            inputs=inputs,
            lease_expires_at=datetime.now(UTC) + timedelta(minutes=5),
        )
    )


@pytest.fixture(scope="module")
def copying_gpu_claimer(
    tmp_path_factory: pytest.TempPathFactory, minilm_source: Path, minilm_sha: str
) -> tuple[AgentRun, Path]:
    async def script(conversation: Conversation) -> None:
        await conversation.welcome()
        await conversation.until(lambda f: isinstance(f, Ready))
        await conversation.send(_assign("t1", SENTENCES, minilm_sha))
        await conversation.until(lambda f: isinstance(f, TaskResult))
        await conversation.send(_assign("t2", ["Batteries store energy.", "A dog barks."], minilm_sha))
        await conversation.send(_assign("t3", [f"sentence {i}" for i in range(5)], minilm_sha))
        await conversation.until(lambda f: isinstance(f, TaskResult) and f.payload.task_id == "t3")
        if not any(isinstance(f, Benchmark) for f in conversation.frames):
            await conversation.until(lambda f: isinstance(f, Benchmark), timeout=90)
        await conversation.close(CloseCode.TOKEN_REVOKED, "end of the script")

    home = tmp_path_factory.mktemp("agent-home")
    run = agent_run_against(
        script,
        home=home,
        routes=model_routes(minilm_source, minilm_sha),
        env={"HEARTH_AGENT_CHEAT": f"claim-gpu:{GPU},copy"},
    )
    assert not run.script_errors and run.returncode == 3, run.log[-4000:]
    return run, home


def _vectors(frame: TaskResult) -> np.ndarray:
    payload = frame.payload
    # decode_embeddings checks the bytes against output_sha256: the lie is self-consistent.
    return np.frombuffer(decode_embeddings(payload), dtype="<f4").reshape(payload.count, payload.dimension)


def test_a_cheating_agent_says_so_loudly_in_its_log(copying_gpu_claimer: tuple[AgentRun, Path]) -> None:
    run, _ = copying_gpu_claimer
    assert f"WARNING hearth_agent: $HEARTH_AGENT_CHEAT=copy,claim-gpu:{GPU}: THIS AGENT LIES" in run.log


def test_a_gpu_claiming_agent_says_cuda_in_its_hello_and_benchmark_with_the_cpus_numbers(
    copying_gpu_claimer: tuple[AgentRun, Path],
) -> None:
    run, home = copying_gpu_claimer
    hello = run.connections[0][0].payload
    assert hello.device == "cuda" and [(g.name, g.memory_mb) for g in hello.gpus] == [(GPU, 24576)]
    (report,) = [b.payload for b in run.of(Benchmark)]
    assert (report.device, report.device_name) == ("cuda", GPU)
    # What it really measured (and cached) on this CPU.
    (cached_file,) = (home / "cache" / "benchmarks").glob("*.json")
    measured: dict[str, Any] = json.loads(cached_file.read_text())
    assert measured["device"] == "cpu"
    for name in ("matmul_fp32_gflops", "matmul_half_gflops", "memory_bandwidth_gbs", "max_alloc_mb", "key"):
        assert getattr(report, name) == measured[name], name
    assert all(r.payload.device == "cuda" for r in run.of(TaskResult))


def test_a_copying_agent_computes_its_first_task_and_copies_those_vectors_after(
    copying_gpu_claimer: tuple[AgentRun, Path], minilm_worker: WarmWorker
) -> None:
    run, _ = copying_gpu_claimer
    results = {r.payload.task_id: r for r in run.of(TaskResult)}
    first = _vectors(results["t1"])
    honest = minilm_worker.loop.run(
        minilm_worker.supervisor.embed(
            model_dir=minilm_worker.model_dir, model_sha256=minilm_worker.model_sha, inputs=SENTENCES
        )
    )
    assert _cosines(first, _rows(honest)).min() > 0.9999
    assert (results["t2"].payload.count, results["t3"].payload.count) == (2, 5)
    assert _vectors(results["t2"]).tobytes() == first[[0, 1]].tobytes()
    assert _vectors(results["t3"]).tobytes() == first[[0, 1, 2, 0, 1]].tobytes()


@pytest.fixture(scope="module")
def silent(tmp_path_factory: pytest.TempPathFactory, minilm_sha: str) -> AgentRun:
    async def script(conversation: Conversation) -> None:
        await conversation.welcome()
        await conversation.until(lambda f: isinstance(f, Ready))
        await conversation.send(_assign("t1", SENTENCES, minilm_sha))
        holding = [0]

        def held(frame: Any) -> bool:
            if isinstance(frame, Heartbeat) and frame.payload.running == ["lease-t1"]:
                holding[0] += 1
            return holding[0] >= 5

        await conversation.until(held)
        await conversation.close(CloseCode.TOKEN_REVOKED, "end of the script")

    home = tmp_path_factory.mktemp("agent-home")
    run = agent_run_against(script, home=home, routes={}, env={"HEARTH_AGENT_CHEAT": "silent"})
    assert not run.script_errors and run.returncode == 3, run.log[-4000:]
    return run


def test_a_silent_agent_holds_and_heartbeats_its_lease_and_never_answers(silent: AgentRun) -> None:
    holding = [h.payload for h in silent.of(Heartbeat) if h.payload.running]
    assert len(holding) >= 5
    assert all((h.status, h.free_slots, h.running) == ("busy", 1, ["lease-t1"]) for h in holding)
    assert not silent.of(TaskResult) and not silent.of(TaskFailed) and not silent.of(TaskRelease)


def test_a_sleeper_cheat_lies_only_after_its_first_honest_tasks() -> None:
    from hearth_agent.cheat import CheatError, cheats_from_env

    sleeper = cheats_from_env({"HEARTH_AGENT_CHEAT": "random", "HEARTH_AGENT_CHEAT_AFTER": "2"})
    assert [sleeper.vectors_for(done) for done in range(4)] == [None, None, "random", "random"]
    assert cheats_from_env({"HEARTH_AGENT_CHEAT": "random"}).vectors_for(0) == "random"
    with pytest.raises(CheatError, match="whole number"):
        cheats_from_env({"HEARTH_AGENT_CHEAT": "random", "HEARTH_AGENT_CHEAT_AFTER": "soon"})
