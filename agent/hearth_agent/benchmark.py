"""`hearth-agent benchmark`: what this machine can do, measured with torch on the device the worker
uses (CUDA when torch sees one, else the CPU): fp32 and half-precision matmul GFLOP/s, memory
bandwidth, the largest single allocation, and MiniLM items/s through the real sandboxed worker at a
few batch sizes. Results are cached per hardware + agent + torch version, so enrollment, the running
agent's hello and periodic checks do not re-measure an unchanged machine; `benchmark_report` turns
one into the `BenchmarkReport` the server checks the agent's claimed device against."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hearth_agent import __version__, sysinfo
from hearth_agent.config import ConfigError, config_load
from hearth_agent.protocol import BenchmarkReport

log = logging.getLogger(__name__)

MINILM_NAME = "all-MiniLM-L6-v2"
_SENTENCES = [
    "Solar panels on the roof charge the home battery at noon.",
    "The cat sleeps on a warm graphics card.",
    "Inference needs no co-located GPUs: each request stands alone.",
    "A short one.",
]
DEFAULT_BATCH_SIZES = [1, 8, 32]
# Seconds each rate is measured for; the environment wins over the default so tests (and the
# running agent's re-checks under test) can measure for ~0.2 s.
SECONDS_ENV = "HEARTH_AGENT_BENCH_SECONDS"
CPU_HALF_MATMUL_N = 256
DEFAULT_SECONDS = 1.0
# The allocation probe: doubling from 256 MiB on the CPU, touching every page, while the next step
# is predicted to fit the time budget and stays under the cap and half of MemAvailable.
ALLOC_BUDGET_S = 2.0
CPU_ALLOC_START_MB = 256
CPU_ALLOC_CAP_MB = 16 * 1024
# Touching a page costs about the same at any size, so a doubling takes about twice the last step;
# the margin keeps a slow last step (page cache being reclaimed) near the budget.
_ALLOC_GROWTH = 2.5
_CUDA_ALLOC_TRIES = 30
_MIB = 1024 * 1024
# What a cached result must hold to be reused; older agents cached fewer numbers.
_HARDWARE_FIELDS = (
    "key",
    "measured_at",
    "device",
    "device_name",
    "cpu_count",
    "matmul_fp32_gflops",
    "matmul_half_gflops",
    "half_dtype",
    "memory_bandwidth_gbs",
    "max_alloc_mb",
)
# One measurement at a time in this process: two at once would each measure half the machine.
_MEASURING = threading.Lock()


class BenchmarkError(Exception):
    """The benchmark could not run; the message says why."""


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BenchmarkError("torch is not installed in this environment") from None
    return torch


def measure_seconds(seconds: float | None = None, env: Mapping[str, str] = os.environ) -> float:
    """An explicit value wins, then $HEARTH_AGENT_BENCH_SECONDS, then one second."""
    if seconds is not None:
        return seconds
    text = env.get(SECONDS_ENV)
    if not text:
        return DEFAULT_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise BenchmarkError(f"${SECONDS_ENV} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise BenchmarkError(f"${SECONDS_ENV} must be positive, got {text!r}")
    return value


# ---- which hardware -------------------------------------------------------


def hardware_ident(*, torch_version: str, device: str, device_name: str) -> tuple[str, dict[str, Any]]:
    """The key the numbers are cached under. Pure, so the running agent can find a cached result
    from what its worker reported without importing torch itself."""
    ident = {
        "agent": __version__,
        "torch": torch_version,
        "device": device,
        "device_name": device_name,
        "cpu_model": sysinfo.cpu_model(),
        "cpu_count": sysinfo.cpu_count(),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return digest, ident


def hardware_key(torch: Any) -> tuple[str, dict[str, Any]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else sysinfo.cpu_model()
    return hardware_ident(torch_version=str(torch.__version__), device=device, device_name=name)


def worker_hardware_key(*, torch_version: str, device: str, gpus: list[dict[str, Any]]) -> str:
    """The key for the device a worker reported in its ready message."""
    name = str(gpus[0]["name"]) if device == "cuda" and gpus else sysinfo.cpu_model()
    return hardware_ident(torch_version=torch_version, device=device, device_name=name)[0]


# ---- measurements ---------------------------------------------------------


def _synchronizer(torch: Any, device: str) -> Callable[[], None]:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    return sync


def _timed(step: Callable[[], object], sync: Callable[[], None], seconds: float) -> tuple[int, float]:
    """(iterations, elapsed seconds) of `step` repeated for at least `seconds` and three times."""
    for _ in range(2):  # warm-up: allocator, kernels, thread pool
        step()
    sync()
    iterations, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or iterations < 3:
        step()
        iterations += 1
        sync()
    return iterations, elapsed


def matmul_gflops(
    torch: Any, device: str, *, seconds: float = DEFAULT_SECONDS, dtype: str = "float32", n: int | None = None
) -> tuple[float, int]:
    n = n or (4096 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(getattr(torch, dtype))
    iterations, elapsed = _timed(lambda: a @ b, _synchronizer(torch, device), seconds)
    return 2.0 * n**3 * iterations / elapsed / 1e9, n


def half_dtypes(torch: Any, device: str) -> list[str]:
    """The half precisions safe to use here: on CUDA float16, and bfloat16 where the GPU has it; on
    the CPU bfloat16 only (float16 matmul there is emulated, slow, and narrow in range)."""
    if device != "cuda":
        return ["bfloat16"]
    return ["float16", "bfloat16"] if torch.cuda.is_bf16_supported() else ["float16"]


def half_matmul_gflops(torch: Any, device: str, *, seconds: float) -> tuple[float | None, str | None]:
    """The fastest safe half precision: (GFLOP/s, dtype name), or (None, None) if none runs."""
    best: tuple[float | None, str | None] = (None, None)
    # A CPU without bfloat16 units runs it ~50x slower than float32: at the usual 1024 one product
    # takes seconds (five of them ~35 s on this kind of machine), so the CPU measures a smaller one.
    n = None if device == "cuda" else CPU_HALF_MATMUL_N
    for dtype in half_dtypes(torch, device):
        try:
            gflops, _ = matmul_gflops(torch, device, seconds=seconds, dtype=dtype, n=n)
        except RuntimeError as exc:  # an old CPU or torch build without the kernel
            log.info("no %s matmul on %s: %s", dtype, device, exc)
            continue
        if best[0] is None or gflops > best[0]:
            best = (gflops, dtype)
    return best


def memory_bandwidth_gbs(torch: Any, device: str, *, seconds: float, size_mb: int) -> float:
    """A large tensor copied on the device: every copy reads and writes `size_mb`."""
    source = torch.ones(size_mb * _MIB // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    iterations, elapsed = _timed(lambda: target.copy_(source), _synchronizer(torch, device), seconds)
    return 2.0 * size_mb * _MIB * iterations / elapsed / 1e9


def bandwidth_size_mb(device: str, *, available_mb: int | None) -> int:
    """Far beyond any cache, well within memory: 1 GiB on a GPU, 256 MiB on the CPU, and at most an
    eighth of what is free (source and target together a quarter)."""
    size = 1024 if device == "cuda" else 256
    return max(16, min(size, available_mb // 8)) if available_mb else size


def next_alloc_mb(size_mb: int, *, last_s: float, elapsed_s: float, cap_mb: int) -> int | None:
    """The CPU allocation probe's next size after `size_mb` succeeded in `last_s`, or None to stop:
    doubling, while it fits the cap and its predicted time fits what is left of the budget."""
    following = size_mb * 2
    if following > cap_mb or elapsed_s + _ALLOC_GROWTH * last_s > ALLOC_BUDGET_S:
        return None
    return following


def cpu_max_alloc_mb(torch: Any, *, available_mb: int | None) -> int:
    """The largest single CPU allocation that succeeded, with every page touched (an untouched one
    proves nothing under overcommit). A lower bound: the probe stops at its budget and cap."""
    cap = CPU_ALLOC_CAP_MB if available_mb is None else min(CPU_ALLOC_CAP_MB, available_mb // 2)
    largest, started = 0, time.perf_counter()
    size: int | None = CPU_ALLOC_START_MB
    while size is not None and size <= cap:
        step = time.perf_counter()
        try:
            block = torch.empty(size * _MIB, dtype=torch.uint8)
            block[::4096].fill_(1)
            del block
        except (MemoryError, RuntimeError):
            break
        largest = size
        now = time.perf_counter()
        size = next_alloc_mb(size, last_s=now - step, elapsed_s=now - started, cap_mb=cap)
    return largest


def cuda_max_alloc_mb(torch: Any) -> int:
    """Start just under what the driver calls free and back off by 10 % until one allocation holds."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    size = int(free * 0.97)
    for _ in range(_CUDA_ALLOC_TRIES):
        try:
            block = torch.empty(size, dtype=torch.uint8, device="cuda")
            del block
            torch.cuda.empty_cache()
            return size // _MIB
        except RuntimeError:  # torch.cuda.OutOfMemoryError is one
            torch.cuda.empty_cache()
            size = int(size * 0.9)
    return 0


def mem_available_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def hardware_measure(torch: Any, device: str, *, seconds: float) -> dict[str, Any]:
    """Everything but MiniLM; a few seconds at `seconds` per rate (plus ≤ ~2 s allocating)."""
    started = time.perf_counter()
    available = int(torch.cuda.mem_get_info()[0]) // _MIB if device == "cuda" else mem_available_mb()
    fp32, n = matmul_gflops(torch, device, seconds=seconds)
    half, half_dtype = half_matmul_gflops(torch, device, seconds=seconds)
    size_mb = bandwidth_size_mb(device, available_mb=available)
    bandwidth = memory_bandwidth_gbs(torch, device, seconds=seconds, size_mb=size_mb)
    largest = (
        cuda_max_alloc_mb(torch) if device == "cuda" else cpu_max_alloc_mb(torch, available_mb=available)
    )
    return {
        "matmul_fp32_gflops": round(fp32, 1),
        "matmul_n": n,
        "matmul_half_gflops": round(half, 1) if half is not None else None,
        "half_dtype": half_dtype,
        "memory_bandwidth_gbs": round(bandwidth, 2),
        "bandwidth_mb": size_mb,
        "max_alloc_mb": largest,
        "hardware_s": round(time.perf_counter() - started, 2),
    }


# ---- MiniLM through the worker --------------------------------------------


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


async def minilm_items_per_s(
    cache_root: Path, home: Path | None, batch_sizes: list[int], *, seconds: float = DEFAULT_SECONDS
) -> dict[str, Any]:
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
            while total_ms < seconds * 1000.0 or items < 3 * batch:
                result = await supervisor.embed(model_dir=model_dir, model_sha256=sha, inputs=inputs)
                total_ms += result.compute_ms
                items += result.count
            rates[str(batch)] = items / (total_ms / 1000.0)
    except WorkerError as exc:
        raise BenchmarkError(f"the worker failed: {exc.reason}") from None
    finally:
        await supervisor.stop()
    return {"model": MINILM_NAME, "sha256": sha, "items_per_s": rates}


def tuned_batch(items_per_s: Mapping[str, float]) -> tuple[int, float] | None:
    """The batch size with the best items/s, and that rate; None when nothing was measured."""
    if not items_per_s:
        return None
    batch, rate = max(items_per_s.items(), key=lambda item: (item[1], -int(item[0])))
    return int(batch), rate


# ---- the whole run, its cache and its report ------------------------------


def _cache_path(cache_root: Path, key: str) -> Path:
    return cache_root / "benchmarks" / f"{key}.json"


def _cache_read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(name not in data for name in _HARDWARE_FIELDS):
        return None
    return data


def _cache_write(path: Path, result: dict[str, Any]) -> None:
    """Atomically: the owner's `benchmark` and the running agent may both write it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        log.warning("cannot cache the benchmark in %s: %s", path, exc)
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        os.replace(tmp_name, path)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        log.warning("cannot cache the benchmark in %s: %s", path, exc)


def _cache_fits(cached: dict[str, Any], *, with_minilm: bool, batch_sizes: list[int]) -> bool:
    """A hardware-only request takes any cached result; a full one wants MiniLM at these sizes."""
    if not with_minilm:
        return True
    return cached.get("minilm") is not None and cached.get("batch_sizes") == batch_sizes


def benchmark_run(
    *,
    cache_root: Path,
    home: Path | None,
    force: bool = False,
    batch_sizes: list[int] | None = None,
    with_minilm: bool = True,
    seconds: float | None = None,
) -> dict[str, Any]:
    """Measure (or return the cached result for this hardware). `with_minilm=False` is the running
    agent's hardware-only check: no worker, no model, a few seconds; it keeps the MiniLM numbers
    an earlier full run cached for this hardware (they carry their own `measured_at`)."""
    torch = _torch()
    seconds = measure_seconds(seconds)
    key, ident = hardware_key(torch)
    batch_sizes = batch_sizes or DEFAULT_BATCH_SIZES
    path = _cache_path(cache_root, key)
    with _MEASURING:
        cached = _cache_read(path)
        if (
            not force
            and cached is not None
            and _cache_fits(cached, with_minilm=with_minilm, batch_sizes=batch_sizes)
        ):
            return {**cached, "cached": True}
        hardware = hardware_measure(torch, ident["device"], seconds=seconds)
        measured_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        minilm: dict[str, Any] | None = None
        if with_minilm:
            try:
                minilm = asyncio.run(minilm_items_per_s(cache_root, home, batch_sizes, seconds=seconds))
                minilm["measured_at"] = measured_at
            except BenchmarkError as exc:
                minilm = {"model": MINILM_NAME, "skipped": str(exc)}
        elif cached is not None and (cached.get("minilm") or {}).get("items_per_s"):
            # A hardware-only re-check keeps the last MiniLM measurement of this same hardware.
            minilm, batch_sizes = cached["minilm"], cached["batch_sizes"]
        result = {
            **ident,
            "key": key,
            "measured_at": measured_at,
            "seconds": seconds,
            **hardware,
            "batch_sizes": batch_sizes if minilm is not None else None,
            "minilm": minilm,
        }
        _cache_write(path, result)
    return {**result, "cached": False}


async def benchmark_in_child(cache_root: Path, *, force: bool) -> dict[str, Any]:
    """The running agent's hardware-only measurement, as `hearth-agent benchmark --hardware-only
    --json` in a child process. Importing and running torch in the agent's own process held its
    GIL for up to a second and stalled heartbeats and power frames; the child also keeps torch's
    memory out of the long-lived agent. A cancelled measurement kills the child. (Popen and a
    thread rather than asyncio's subprocess: cancelling `create_subprocess_exec` while it starts
    the child hangs the event loop's shutdown on Python 3.11.)"""
    command = [sys.executable, "-m", "hearth_agent", "benchmark", "--hardware-only", "--json"]
    child = subprocess.Popen(
        [*command, *(["--force"] if force else [])],
        env={**os.environ, "HEARTH_AGENT_CACHE": str(cache_root)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.to_thread(child.communicate)
    except asyncio.CancelledError:
        child.kill()
        raise
    if child.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise BenchmarkError(lines[-1] if lines else f"the benchmark process exited with {child.returncode}")
    result: dict[str, Any] = json.loads(out)
    result.pop("report", None)
    return result


def benchmark_report(result: Mapping[str, Any]) -> BenchmarkReport:
    """The wire form of a result; the MiniLM fields are None when that part was skipped."""
    minilm = result.get("minilm") or {}
    tuned = tuned_batch(minilm.get("items_per_s") or {})
    return BenchmarkReport(
        key=str(result["key"]),
        measured_at=str(result["measured_at"]),
        device=str(result["device"]),
        device_name=str(result["device_name"]),
        cpu_count=int(result["cpu_count"]),
        matmul_fp32_gflops=float(result["matmul_fp32_gflops"]),
        matmul_half_gflops=result.get("matmul_half_gflops"),
        half_dtype=result.get("half_dtype"),
        memory_bandwidth_gbs=float(result["memory_bandwidth_gbs"]),
        max_alloc_mb=int(result["max_alloc_mb"]),
        minilm_items_per_s=round(tuned[1], 1) if tuned else None,
        minilm_batch=tuned[0] if tuned else None,
    )


def cached_report(cache_root: Path, key: str) -> BenchmarkReport | None:
    """The cached benchmark for this hardware key, if one exists and still reads as a report."""
    cached = _cache_read(_cache_path(cache_root, key))
    if cached is None:
        return None
    try:
        return benchmark_report(cached)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the cached benchmark %s: %s", key, exc)
        return None
