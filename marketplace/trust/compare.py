"""Whether two runs of the same inputs agree: per item, by cosine similarity, never bitwise.

Honest hardware differs in the last bits (fp32 vs bf16, thread counts, kernels): measured per-item
cosine ≥ 0.9998 for MiniLM. A cheaper model, random or constant vectors or another task's vectors
land far below (≤ 0.81 measured), so one threshold (0.999 by default) separates them with margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Agreement:
    ok: bool
    items: int
    worst_item: int  # -1 when the shapes already disagree
    worst_cosine: float
    reason: str


def _vectors(raw: bytes, dimension: int) -> np.ndarray:
    array = np.frombuffer(raw, dtype="<f4")
    if dimension <= 0 or array.size % dimension:
        raise ValueError(f"{array.size} floats is not a whole number of {dimension}-vectors")
    return array.reshape(-1, dimension).astype(np.float64)


def embeddings_agree(candidate: bytes, reference: bytes, *, dimension: int, min_cosine: float) -> Agreement:
    """Every item of `candidate` must be within `min_cosine` of the same item of `reference`."""
    try:
        a, b = _vectors(candidate, dimension), _vectors(reference, dimension)
    except ValueError as exc:
        return Agreement(False, 0, -1, 0.0, str(exc))
    if a.shape != b.shape:
        return Agreement(False, len(a), -1, 0.0, f"{len(a)} vectors where {len(b)} were expected")
    if not len(a):
        return Agreement(True, 0, -1, 1.0, "no items")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.where(norms > 0, (a * b).sum(axis=1) / norms, 0.0)
    cosines = np.nan_to_num(cosines, nan=0.0)
    worst = int(np.argmin(cosines))
    worst_cosine = float(cosines[worst])
    ok = worst_cosine >= min_cosine
    reason = (
        f"all {len(a)} items within cosine {min_cosine} (worst {worst_cosine:.5f})"
        if ok
        else f"item {worst} of {len(a)} has cosine {worst_cosine:.4f} (needs ≥ {min_cosine}); "
        f"{int((cosines < min_cosine).sum())} items below"
    )
    return Agreement(ok, len(a), worst, worst_cosine, reason)
