"""The pure rules of trust: comparison by tolerance, plausible hardware, the score, the canary rate."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hearth_agent.protocol import BenchmarkReport
from marketplace.trust.compare import embeddings_agree
from marketplace.trust.hardware import hardware_plausible
from marketplace.trust.scoring import TrustFacts, canary_rate, reliability_score


def _unit(rows: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(rows, 384))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype("<f4")


def test_vectors_a_rounding_error_apart_agree() -> None:
    a = _unit(8)
    b = (a + np.random.default_rng(1).normal(scale=1e-3 / np.sqrt(384), size=a.shape)).astype("<f4")
    assert not np.array_equal(a, b)
    result = embeddings_agree(b.tobytes(), a.tobytes(), dimension=384, min_cosine=0.999)
    assert result.ok and result.worst_cosine > 0.999


def test_one_bad_item_among_good_ones_fails_the_whole_result_and_is_named() -> None:
    a = _unit(8)
    b = a.copy()
    b[5] = _unit(1, seed=9)[0]
    result = embeddings_agree(b.tobytes(), a.tobytes(), dimension=384, min_cosine=0.999)
    assert not result.ok and result.worst_item == 5
    assert "item 5 of 8" in result.reason and "1 items below" in result.reason


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        (np.zeros((8, 384), dtype="<f4"), "cosine 0.0000"),
        (_unit(7), "7 vectors where 8 were expected"),
        (np.ones(100, dtype="<f4"), "not a whole number"),
    ],
)
def test_degenerate_results_never_agree(candidate: np.ndarray, reason: str) -> None:
    result = embeddings_agree(candidate.tobytes(), _unit(8).tobytes(), dimension=384, min_cosine=0.999)
    assert not result.ok and reason in result.reason


def _report(**overrides: Any) -> BenchmarkReport:
    fields: dict[str, Any] = {
        "key": "k",
        "measured_at": "now",
        "device": "cpu",
        "device_name": "AMD EPYC",
        "cpu_count": 2,
        "matmul_fp32_gflops": 60.0,
        "matmul_half_gflops": 20.0,
        "half_dtype": "bfloat16",
        "memory_bandwidth_gbs": 12.0,
        "max_alloc_mb": 2048,
    }
    return BenchmarkReport(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("report", "device", "gpus", "ok", "words"),
    [
        (_report(), "cpu", [], True, "CPU, 2 cores"),
        (_report(matmul_fp32_gflops=5000.0), "cpu", [], False, "not what 2 CPU cores do"),
        (_report(max_alloc_mb=999_999), "cpu", [], False, "allocated 999999 MB"),
        (
            _report(device="cuda", device_name="NVIDIA GeForce RTX 4090", matmul_fp32_gflops=60.0),
            "cuda", ["NVIDIA GeForce RTX 4090"], False, "expects 16,520 to 107,380 GFLOP/s fp32",
        ),
        (
            _report(device="cuda", device_name="NVIDIA GeForce RTX 4090", matmul_fp32_gflops=61_000.0,
                    memory_bandwidth_gbs=900.0, max_alloc_mb=23_000),
            "cuda", ["NVIDIA GeForce RTX 4090"], True, "RTX 4090",
        ),
        (
            _report(device="cuda", device_name="NVIDIA GeForce RTX 4090", matmul_fp32_gflops=61_000.0,
                    memory_bandwidth_gbs=40.0),
            "cuda", ["NVIDIA GeForce RTX 4090"], False, "GB/s",
        ),
        (
            _report(device="cuda", device_name="NVIDIA GeForce RTX 3060", matmul_fp32_gflops=9_000.0,
                    memory_bandwidth_gbs=300.0),
            "cuda", ["NVIDIA GeForce RTX 4090"], False, "hello lists",
        ),
        (_report(device="cuda", device_name="Some Future GPU", matmul_fp32_gflops=30.0), "cuda", [], False, "any GPU"),
        (_report(device="cuda"), "cpu", [], False, "benchmark ran on cuda"),
    ],
)  # fmt: skip
def test_claimed_devices_are_checked_against_what_they_measured(
    report: BenchmarkReport, device: str, gpus: list[str], ok: bool, words: str
) -> None:
    verdict = hardware_plausible(report, claimed_device=device, claimed_gpus=gpus, memory_mb=8192)
    assert verdict.ok is ok
    assert words in verdict.reason


def _facts(**overrides: Any) -> TrustFacts:
    fields: dict[str, Any] = {
        "uptime_7d": 1.0,
        "tasks_completed": 50,
        "tasks_failed": 0,
        "leases_expired": 0,
        "checks_passed": 20,
        "checks_failed": 0,
        "strikes_30d": 0,
    }
    return TrustFacts(**{**fields, **overrides})


def test_a_new_host_starts_in_the_middle_and_a_steady_one_near_the_top() -> None:
    new = reliability_score(_facts(uptime_7d=0.0, tasks_completed=0, checks_passed=0)).score
    steady = reliability_score(_facts()).score
    assert 0.3 < new < 0.6 < 0.9 < steady <= 1.0


@pytest.mark.parametrize(
    "worse",
    [
        {"uptime_7d": 0.5},
        {"tasks_failed": 10},
        {"leases_expired": 10},
        {"checks_failed": 3},
        {"strikes_30d": 1},
    ],
)
def test_every_kind_of_bad_evidence_lowers_the_score(worse: dict[str, Any]) -> None:
    assert reliability_score(_facts(**worse)).score < reliability_score(_facts()).score


def test_a_strike_costs_more_than_a_bad_week_of_uptime() -> None:
    assert reliability_score(_facts(strikes_30d=1)).score < reliability_score(_facts(uptime_7d=0.3)).score


def test_canaries_thin_out_as_a_host_keeps_passing_but_never_stop() -> None:
    rates = [canary_rate(streak, high=0.5, low=0.02) for streak in (0, 5, 10, 20, 100)]
    assert rates == sorted(rates, reverse=True)
    assert rates[0] == 0.5 and rates[1] == 0.25 and rates[-1] == 0.02
