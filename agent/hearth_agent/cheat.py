"""Test-only dishonest agents: real agent processes that lie in the ways the server's trust checks
must catch. Enabled only by $HEARTH_AGENT_CHEAT (comma-separated modes); without it the agent is
honest and nothing here changes a byte it sends.

    random            every vector a random unit vector (count and dimension kept)
    constant          every vector the same fixed unit vector
    copy              the vectors of the previous task it computed, cycled or cut to the count;
                      the first task is computed honestly, later ones are not computed at all
    silent            takes tasks, holds and heartbeats their leases, never answers
    cheaper           the worker runs 3 of MiniLM's 6 layers ($HEARTH_WORKER_CHEAT_LAYERS)
    claim-gpu:<name>  hello, results and benchmark reports claim a CUDA GPU <name> with 24 GiB;
                      every measured number stays the CPU's

At most one of random, constant, copy and silent; cheaper and claim-gpu combine with any.
$HEARTH_AGENT_CHEAT_AFTER=N makes the vector cheats a sleeper's: the first N tasks are answered
honestly (enough to pass the known-answer tasks and be verified), every later one is not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

from hearth_agent.protocol import BenchmarkReport, GpuInfo, HelloPayload
from hearth_agent.supervisor import EmbedResult
from hearth_agent.worker import CHEAT_LAYERS_ENV

CHEAT_ENV = "HEARTH_AGENT_CHEAT"
CHEAT_AFTER_ENV = "HEARTH_AGENT_CHEAT_AFTER"
CHEAPER_LAYERS = 3
CLAIMED_GPU_MEMORY_MB = 24576
VectorCheat = Literal["random", "constant", "copy", "silent"]
_VECTOR_CHEATS: dict[str, VectorCheat] = {mode: mode for mode in ("random", "constant", "copy", "silent")}
_CLAIM_GPU = "claim-gpu:"


class CheatError(ValueError):
    """$HEARTH_AGENT_CHEAT names a mode that does not exist, or two that cannot combine."""


@dataclasses.dataclass(frozen=True)
class Cheats:
    vectors: VectorCheat | None = None
    cheaper: bool = False
    claim_gpu: str | None = None
    after: int = 0  # tasks answered honestly before the vector cheat starts

    def vectors_for(self, tasks_done: int) -> VectorCheat | None:
        """The vector cheat for the task after `tasks_done` tasks, None while still lying low."""
        return self.vectors if tasks_done >= self.after else None

    @property
    def honest(self) -> bool:
        return self == Cheats()

    def describe(self) -> str:
        modes: list[str] = [self.vectors] if self.vectors else []
        modes += ["cheaper"] if self.cheaper else []
        modes += [f"{_CLAIM_GPU}{self.claim_gpu}"] if self.claim_gpu else []
        return ",".join(modes) or "honest"


def cheats_parse(text: str | None) -> Cheats:
    """`random`, `cheaper,claim-gpu:NVIDIA GeForce RTX 4090`, … ; empty or None is honest."""
    vectors: list[VectorCheat] = []
    cheaper, claim_gpu = False, None
    for raw in (text or "").split(","):
        mode = raw.strip()
        if not mode:
            continue
        if mode in _VECTOR_CHEATS:
            vectors.append(_VECTOR_CHEATS[mode])
        elif mode == "cheaper":
            cheaper = True
        elif mode.startswith(_CLAIM_GPU) and mode.removeprefix(_CLAIM_GPU).strip():
            claim_gpu = mode.removeprefix(_CLAIM_GPU).strip()
        else:
            raise CheatError(
                f"${CHEAT_ENV}: unknown mode {mode!r} (known: random, constant, copy, silent, "
                "cheaper, claim-gpu:<name>)"
            )
    if len(set(vectors)) > 1:
        raise CheatError(f"${CHEAT_ENV}: {' and '.join(vectors)} cannot combine; choose one")
    return Cheats(vectors=vectors[0] if vectors else None, cheaper=cheaper, claim_gpu=claim_gpu)


def cheats_from_env(env: Mapping[str, str]) -> Cheats:
    cheats = cheats_parse(env.get(CHEAT_ENV))
    after = env.get(CHEAT_AFTER_ENV, "").strip()
    if not after:
        return cheats
    if not after.isdigit():
        raise CheatError(f"${CHEAT_AFTER_ENV} must be a whole number of tasks, not {after!r}")
    return dataclasses.replace(cheats, after=int(after))


def worker_env(cheats: Cheats) -> dict[str, str]:
    """What the worker must see for these cheats (the supervisor passes HEARTH_WORKER_* through)."""
    return {CHEAT_LAYERS_ENV: str(CHEAPER_LAYERS)} if cheats.cheaper else {}


# ---- vectors ---------------------------------------------------------------


def random_unit_vectors(count: int, dimension: int, rng: np.random.Generator) -> bytes:
    """Little-endian float32 rows, each uniformly random on the unit sphere."""
    rows = rng.standard_normal((count, dimension))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype("<f4").tobytes()


def constant_unit_vectors(count: int, dimension: int) -> bytes:
    """The same unit vector (all components equal) `count` times."""
    row = np.full(dimension, 1.0 / math.sqrt(dimension), dtype="<f4")
    return np.tile(row, (count, 1)).tobytes()


def copied_vectors(previous: bytes, *, dimension: int, count: int) -> bytes:
    """The previous task's rows, cycled (or cut) to `count` rows."""
    rows = np.frombuffer(previous, dtype="<f4").reshape(-1, dimension)
    if count == 0 or rows.shape[0] == 0:
        return b""
    return rows[np.arange(count) % rows.shape[0]].tobytes()


def copied_result(previous: EmbedResult, *, count: int) -> EmbedResult:
    """A result for a task that was never computed: the previous one's vectors, no compute time."""
    return dataclasses.replace(
        previous,
        embeddings=copied_vectors(previous.embeddings, dimension=previous.dimension, count=count),
        count=count,
        compute_ms=0.0,
        load_ms=0.0,
    )


def result_apply(cheats: Cheats, result: EmbedResult, rng: np.random.Generator) -> EmbedResult:
    """What the dishonest agent reports instead of the worker's honest result."""
    if cheats.vectors == "random":
        result = dataclasses.replace(
            result, embeddings=random_unit_vectors(result.count, result.dimension, rng)
        )
    elif cheats.vectors == "constant":
        result = dataclasses.replace(result, embeddings=constant_unit_vectors(result.count, result.dimension))
    if cheats.claim_gpu:
        result = dataclasses.replace(result, device="cuda")
    return result


# ---- claims ----------------------------------------------------------------


def hello_apply(cheats: Cheats, hello: HelloPayload) -> HelloPayload:
    if not cheats.claim_gpu:
        return hello
    gpu = GpuInfo(name=cheats.claim_gpu, memory_mb=CLAIMED_GPU_MEMORY_MB)
    report = report_apply(cheats, hello.benchmark) if hello.benchmark else None
    return hello.model_copy(update={"device": "cuda", "gpus": [gpu], "benchmark": report})


def report_apply(cheats: Cheats, report: BenchmarkReport) -> BenchmarkReport:
    """The claimed GPU's name on the CPU's own numbers."""
    if not cheats.claim_gpu:
        return report
    return report.model_copy(update={"device": "cuda", "device_name": cheats.claim_gpu})
