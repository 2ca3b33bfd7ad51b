"""The hardware benchmark: every number of the report measured and plausible, cached per hardware
key, the `benchmark --json` command with MiniLM through the real worker, and a real running agent
that benchmarks itself in the background and answers the server's benchmark requests."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hearth_agent import sysinfo
from hearth_agent.benchmark import (
    BenchmarkError,
    benchmark_report,
    benchmark_run,
    cached_report,
    hardware_key,
    measure_seconds,
    mem_available_mb,
    next_alloc_mb,
    tuned_batch,
    worker_hardware_key,
)
from hearth_agent.protocol import (
    Benchmark,
    BenchmarkRequest,
    BenchmarkRequestPayload,
    CloseCode,
    Heartbeat,
)

from .conftest import AGENT_DIR, AgentRun, Conversation, agent_run_against

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """One hardware-only measurement at 0.2 s a rate (conftest sets $HEARTH_AGENT_BENCH_SECONDS)."""
    cache_root = tmp_path_factory.mktemp("bench-cache")
    yield cache_root, benchmark_run(cache_root=cache_root, home=None, with_minilm=False)


def test_a_hardware_only_report_has_every_number_measured_and_plausible(measured) -> None:
    _, result = measured
    report = benchmark_report(result)
    assert (report.device, report.device_name) == ("cpu", sysinfo.cpu_model())
    assert report.cpu_count == os.cpu_count()
    assert 1 < report.matmul_fp32_gflops < 100_000
    assert report.half_dtype == "bfloat16"
    assert report.matmul_half_gflops is not None and report.matmul_half_gflops > 0  # bf16 on a busy CPU: ~1
    assert 0.5 < report.memory_bandwidth_gbs < 2_000
    available = mem_available_mb()
    assert report.max_alloc_mb >= 256 and (available is None or report.max_alloc_mb <= available)
    assert (report.minilm_items_per_s, report.minilm_batch) == (None, None)
    assert result["seconds"] == 0.2


def test_it_is_cached_per_hardware_key_and_measured_again_only_when_forced(measured, tmp_path) -> None:
    measured_root, first = measured
    cache_root = tmp_path / "cache"
    shutil.copytree(measured_root, cache_root)
    key, _ = hardware_key(torch)
    assert first["key"] == key and first["cached"] is False
    assert json.loads((cache_root / "benchmarks" / f"{key}.json").read_text())["key"] == key
    again = benchmark_run(cache_root=cache_root, home=None, with_minilm=False)
    assert again["cached"] is True and again["measured_at"] == first["measured_at"]
    assert again["matmul_fp32_gflops"] == first["matmul_fp32_gflops"]
    # The owner's full benchmark wants MiniLM, which a hardware-only result lacks: not a cache hit.
    full = benchmark_run(cache_root=cache_root, home=tmp_path, with_minilm=True, seconds=0.05)
    assert full["cached"] is False and "not enrolled" in full["minilm"]["skipped"]
    forced = benchmark_run(cache_root=cache_root, home=None, with_minilm=False, force=True, seconds=0.05)
    assert forced["cached"] is False and forced["seconds"] == 0.05


def test_a_hardware_only_re_check_keeps_the_minilm_numbers_of_the_last_full_run(measured, tmp_path) -> None:
    measured_root, first = measured
    cache_root = tmp_path / "cache"
    shutil.copytree(measured_root, cache_root)
    minilm = {"model": "all-MiniLM-L6-v2", "items_per_s": {"1": 50.0, "8": 200.0}, "measured_at": "earlier"}
    (cache_file,) = (cache_root / "benchmarks").glob("*.json")
    cache_file.write_text(json.dumps({**first, "minilm": minilm, "batch_sizes": [1, 8]}))
    again = benchmark_run(cache_root=cache_root, home=None, with_minilm=False, force=True, seconds=0.05)
    assert again["cached"] is False and again["measured_at"] != "earlier"
    assert (again["minilm"], again["batch_sizes"]) == (minilm, [1, 8])
    assert benchmark_report(again).minilm_batch == 8
    full = benchmark_run(cache_root=cache_root, home=tmp_path, batch_sizes=[1, 8])
    assert full["cached"] is True and full["measured_at"] == again["measured_at"]


def test_the_running_agent_finds_the_cached_report_by_what_its_worker_reported(measured) -> None:
    cache_root, result = measured
    key = worker_hardware_key(torch_version=str(torch.__version__), device="cpu", gpus=[])
    assert cached_report(cache_root, key) == benchmark_report({**result, "cached": True})
    other = worker_hardware_key(torch_version="0.0.1", device="cpu", gpus=[])
    assert other != key and cached_report(cache_root, other) is None


def test_a_cached_result_from_an_older_agent_without_the_new_numbers_is_not_reported(tmp_path) -> None:
    (tmp_path / "benchmarks").mkdir()
    old = {"key": "k", "measured_at": "then", "device": "cpu", "device_name": "x", "matmul_fp32_gflops": 5}
    (tmp_path / "benchmarks" / "k.json").write_text(json.dumps(old))
    assert cached_report(tmp_path, "k") is None


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({}, None),
        ({"1": 40.0}, (1, 40.0)),
        ({"1": 40.0, "8": 210.5, "32": 190.0}, (8, 210.5)),
        ({"8": 100.0, "32": 100.0}, (8, 100.0)),  # a tie goes to the smaller batch
    ],
)
def test_the_tuned_batch_is_the_one_with_the_best_items_per_second(rates, expected) -> None:
    assert tuned_batch(rates) == expected


def test_a_report_carries_the_tuned_batch_and_its_rate(measured) -> None:
    _, result = measured
    minilm = {"model": "all-MiniLM-L6-v2", "items_per_s": {"1": 40.0, "8": 210.54, "32": 190.0}}
    report = benchmark_report({**result, "minilm": minilm})
    assert (report.minilm_batch, report.minilm_items_per_s) == (8, 210.5)
    skipped = benchmark_report({**result, "minilm": {"skipped": "not enrolled"}})
    assert (skipped.minilm_batch, skipped.minilm_items_per_s) == (None, None)


@pytest.mark.parametrize(
    ("size_mb", "last_s", "elapsed_s", "cap_mb", "expected"),
    [
        (256, 0.1, 0.1, 16384, 512),
        (1024, 0.35, 0.65, 16384, 2048),
        (2048, 0.8, 1.5, 16384, None),  # the next step would overrun the budget
        (1024, 0.1, 0.3, 1500, None),  # the next step would pass the cap (half of MemAvailable)
    ],
)
def test_the_cpu_allocation_probe_doubles_within_its_time_budget_and_cap(
    size_mb, last_s, elapsed_s, cap_mb, expected
) -> None:
    assert next_alloc_mb(size_mb, last_s=last_s, elapsed_s=elapsed_s, cap_mb=cap_mb) == expected


def test_measurement_seconds_come_from_the_argument_then_the_environment_then_one_second() -> None:
    env = {"HEARTH_AGENT_BENCH_SECONDS": "0.3"}
    assert measure_seconds(2.0, env) == 2.0
    assert measure_seconds(None, env) == 0.3
    assert measure_seconds(None, {}) == 1.0
    for bad in ("fast", "0", "-1"):
        with pytest.raises(BenchmarkError):
            measure_seconds(None, {"HEARTH_AGENT_BENCH_SECONDS": bad})


# ---- `hearth-agent benchmark --json`, MiniLM through the real worker -------


def test_the_benchmark_command_prints_one_json_object_with_minilm_through_the_worker(
    tmp_path: Path, minilm_source: Path, minilm_sha: str
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(minilm_source, cache / "models" / minilm_sha)
    (cache / "manifests").mkdir()
    (cache / "manifests" / f"{minilm_sha}.json").write_text(json.dumps({"name": "all-MiniLM-L6-v2"}))
    command = [sys.executable, "-m", "hearth_agent", "benchmark", "--home", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(AGENT_DIR), "HEARTH_AGENT_BENCH_SECONDS": "0.2"}
    env.pop("HEARTH_AGENT_CACHE", None)
    done = subprocess.run(
        [*command, "--json", "--batch-sizes", "1,4"], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    rates = result["minilm"]["items_per_s"]
    assert set(rates) == {"1", "4"} and all(rate > 1 for rate in rates.values())
    report = result["report"]
    assert report["minilm_batch"] == int(max(rates, key=rates.get))
    assert report["minilm_items_per_s"] == pytest.approx(max(rates.values()), abs=0.1)
    assert report["memory_bandwidth_gbs"] > 0 and report["max_alloc_mb"] >= 256

    human = subprocess.run([*command, "--batch-sizes", "1,4"], env=env, capture_output=True, text=True)
    assert human.returncode == 0, human.stderr[-3000:]
    assert "(cached; --force to measure again)" in human.stdout
    assert "memory bandwidth:" in human.stdout and f"tuned batch: {report['minilm_batch']}" in human.stdout


# ---- a running agent --------------------------------------------------------


async def _benchmark_script(conversation: Conversation) -> None:
    await conversation.welcome()
    if conversation.number == 0:
        # No benchmark cached: the agent measures in the background and sends it.
        await conversation.until(lambda f: isinstance(f, Benchmark), timeout=90)
        await conversation.send(BenchmarkRequest(payload=BenchmarkRequestPayload(reason="periodic re-check")))
        await conversation.send(BenchmarkRequest(payload=BenchmarkRequestPayload(reason="while one runs")))
        await conversation.until(lambda f: isinstance(f, Benchmark), timeout=90)
        # Long enough for a second measurement to have finished, had the second request started one.
        seen = len(conversation.frames)
        await conversation.until(lambda f: isinstance(f, Heartbeat) and len(conversation.frames) > seen + 15)
        await conversation.close(CloseCode.SERVER_RESTART, "reconnect, please")
    else:
        # Cached now: the hello carries it, and nothing is measured again.
        seen = len(conversation.frames)
        await conversation.until(lambda f: isinstance(f, Heartbeat) and len(conversation.frames) > seen + 8)
        await conversation.close(CloseCode.TOKEN_REVOKED, "end of the script")


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory: pytest.TempPathFactory) -> AgentRun:
    home = tmp_path_factory.mktemp("agent-home")
    return agent_run_against(_benchmark_script, home=home, routes={})


def test_the_running_agent_ran_the_whole_benchmark_script(benchmarked: AgentRun) -> None:
    assert not benchmarked.script_errors, benchmarked.log[-4000:]
    assert benchmarked.returncode == 3, benchmarked.log[-4000:]
    assert len(benchmarked.connections) == 2


def test_with_nothing_cached_the_agent_benchmarks_itself_and_sends_the_report(benchmarked: AgentRun) -> None:
    assert benchmarked.connections[0][0].payload.benchmark is None  # the first hello
    report = benchmarked.of(Benchmark, connection=0)[0].payload
    assert report.device == "cpu" and report.matmul_fp32_gflops > 1 and report.memory_bandwidth_gbs > 0
    assert report.minilm_items_per_s is None


def test_heartbeats_go_on_while_the_agent_benchmarks(benchmarked: AgentRun) -> None:
    request = next(f for _, f in benchmarked.sent if isinstance(f, BenchmarkRequest))
    answer = benchmarked.of(Benchmark, connection=0)[1]
    beats = [benchmarked.at(h) for h in benchmarked.of(Heartbeat, connection=0)]
    during = [t for t in beats if benchmarked.at(request) < t < benchmarked.at(answer)]
    # The measurement takes ~2 s at 0.2 s a rate (plus importing torch in its child process); a
    # heartbeat is due every 0.3 s, and none waits for the measurement (+ the power test's slack).
    assert len(during) >= 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(during)]
    assert max(gaps) < 0.3 + 0.4, gaps


def test_a_benchmark_request_is_answered_with_a_fresh_measurement_and_a_second_one_meanwhile_is_ignored(
    benchmarked: AgentRun,
) -> None:
    initial, answer = benchmarked.of(Benchmark, connection=0)  # exactly two: the second request ignored
    assert answer.payload.key == initial.payload.key
    assert answer.payload != initial.payload  # measured again, not the cached numbers
    assert "ignored: one is already running" in benchmarked.log


def test_after_reconnecting_the_hello_carries_the_cached_report_and_nothing_is_measured(
    benchmarked: AgentRun,
) -> None:
    answer = benchmarked.of(Benchmark, connection=0)[-1]
    hello = benchmarked.connections[1][0]
    assert hello.payload.benchmark == answer.payload
    assert benchmarked.of(Benchmark, connection=1) == []


_CANCEL_SCRIPT = """
import asyncio, sys
from pathlib import Path
from hearth_agent.benchmark import benchmark_in_child

async def main(delay):
    asyncio.ensure_future(benchmark_in_child(Path(sys.argv[1]), force=True))
    await asyncio.sleep(delay)  # then asyncio.run cancels the measurement, as at the agent's exit

for delay in (0, 0.001, 0.01, 0.1, 0.5):
    asyncio.run(main(delay))
"""


def test_a_benchmark_cancelled_at_any_moment_kills_its_child_and_lets_the_agent_exit(tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    # Cancelled while its child starts, too: asyncio's create_subprocess_exec hung the loop's close.
    done = subprocess.run(
        [sys.executable, "-c", _CANCEL_SCRIPT, str(cache_root)], timeout=120, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert not _processes_with_env(f"HEARTH_AGENT_CACHE={cache_root}")


def _processes_with_env(entry: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found
