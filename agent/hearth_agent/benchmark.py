"""`hearth-agent benchmark`: fp32 matmul GFLOP/s with torch, and MiniLM items/s through the real
sandboxed worker at a few batch sizes. Results are cached per hardware + agent + torch version,
so enrollment and periodic checks do not re-measure an unchanged machine."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from hearth_agent import __version__, sysinfo
from hearth_agent.config import ConfigError, config_load

log = logging.getLogger(__name__)

MINILM_NAME = "all-MiniLM-L6-v2"
_SENTENCES = [
    "Solar panels on the roof charge the home battery at noon.",
    "The cat sleeps on a warm graphics card.",
    "Inference needs no co-located GPUs: each request stands alone.",
    "A short one.",
]


class BenchmarkError(Exception):
    """The benchmark could not run; the message says why."""


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BenchmarkError("torch is not installed in this environment") from None
    return torch


def hardware_key(torch: Any) -> tuple[str, dict[str, Any]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else sysinfo.cpu_model()
    ident = {
        "agent": __version__,
        "torch": str(torch.__version__),
        "device": device,
        "device_name": name,
        "cpu_model": sysinfo.cpu_model(),
        "cpu_count": sysinfo.cpu_count(),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return digest, ident


def matmul_gflops(torch: Any, device: str, *, seconds: float = 1.0) -> tuple[float, int]:
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.float32)
    b = torch.randn(n, n, device=device, dtype=torch.float32)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: allocator, kernels, thread pool
        a @ b
    sync()
    iterations, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or iterations < 3:
        a @ b
        iterations += 1
        sync()
    return 2.0 * n**3 * iterations / elapsed / 1e9, n


def _find_minilm(cache_root: Path) -> tuple[Path, str] | None:
    """A MiniLM the agent already cached (the manifest it was fetched with names it)."""
    for manifest in sorted((cache_root / "manifests").glob("*.json")):
        try:
            name = json.loads(manifest.read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError):
            continue
        model_dir = cache_root / "models" / manifest.stem
        if name == MINILM_NAME and model_dir.is_dir():
            return model_dir, manifest.stem
    return None


async def _fetch_minilm(cache_root: Path, home: Path | None) -> tuple[Path, str]:
    """Ask the server this machine is enrolled with for MiniLM, through the verified model cache."""
    import httpx

    from hearth_agent.model_cache import ModelCache, ModelCacheError

    try:
        config = config_load(home=home)
    except ConfigError as exc:
        raise BenchmarkError(f"MiniLM is not cached and this machine is not enrolled: {exc}") from None
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(config.server_url.rstrip("/") + "/api/v1/models")
            response.raise_for_status()
            sha = next(str(m["weights_sha256"]) for m in response.json() if m.get("name") == MINILM_NAME)
    except (httpx.HTTPError, ValueError, KeyError, StopIteration) as exc:
        raise BenchmarkError(f"cannot find {MINILM_NAME} on {config.server_url}: {exc!r}") from None
    cache = ModelCache(cache_root, server_url=config.server_url, host_token=config.host_token)
    try:
        return await cache.ensure(sha), sha
    except ModelCacheError as exc:
        raise BenchmarkError(f"cannot fetch {MINILM_NAME}: {exc}") from None
    finally:
        await cache.aclose()


async def minilm_items_per_s(cache_root: Path, home: Path | None, batch_sizes: list[int]) -> dict[str, Any]:
    from hearth_agent.supervisor import WorkerError, WorkerSupervisor

    found = _find_minilm(cache_root) or await _fetch_minilm(cache_root, home)
    model_dir, sha = found
    supervisor = WorkerSupervisor(cache_dir=cache_root)
    rates: dict[str, float] = {}
    try:
        await supervisor.start()
        # The first batch loads the model; it is not measured.
        await supervisor.embed(model_dir=model_dir, model_sha256=sha, inputs=_SENTENCES[:1])
        for batch in batch_sizes:
            inputs = [_SENTENCES[i % len(_SENTENCES)] for i in range(batch)]
            total_ms, items = 0.0, 0
            while total_ms < 1000.0 or items < 3 * batch:
                result = await supervisor.embed(model_dir=model_dir, model_sha256=sha, inputs=inputs)
                total_ms += result.compute_ms
                items += result.count
            rates[str(batch)] = items / (total_ms / 1000.0)
    except WorkerError as exc:
        raise BenchmarkError(f"the worker failed: {exc.reason}") from None
    finally:
        await supervisor.stop()
    return {"model": MINILM_NAME, "sha256": sha, "items_per_s": rates}


def benchmark_run(
    *, cache_root: Path, home: Path | None, force: bool = False, batch_sizes: list[int] | None = None
) -> dict[str, Any]:
    torch = _torch()
    key, ident = hardware_key(torch)
    batch_sizes = batch_sizes or [1, 8, 32]
    cached_path = cache_root / "benchmarks" / f"{key}.json"
    if not force and cached_path.is_file():
        try:
            cached: dict[str, Any] = json.loads(cached_path.read_text(encoding="utf-8"))
            if cached.get("batch_sizes") == batch_sizes:
                return {**cached, "cached": True}
        except (OSError, ValueError):
            pass
    gflops, n = matmul_gflops(torch, ident["device"])
    try:
        minilm: dict[str, Any] = asyncio.run(minilm_items_per_s(cache_root, home, batch_sizes))
    except BenchmarkError as exc:
        minilm = {"model": MINILM_NAME, "skipped": str(exc)}
    result = {
        **ident,
        "key": key,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "matmul_fp32_gflops": round(gflops, 1),
        "matmul_n": n,
        "batch_sizes": batch_sizes,
        "minilm": minilm,
    }
    try:
        cached_path.parent.mkdir(parents=True, exist_ok=True)
        cached_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    except OSError as exc:
        log.warning("cannot cache the benchmark in %s: %s", cached_path, exc)
    return {**result, "cached": False}
