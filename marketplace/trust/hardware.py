"""Is the claimed device plausible for the measured numbers? A table of known devices with the ranges
a torch matmul / copy benchmark lands in (from their peak figures), CPUs per core, and any other GPU
within what GPUs do at all. Pure: the services decide what a failed check costs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hearth_agent.protocol import BenchmarkReport


@dataclass(frozen=True)
class DeviceSpec:
    pattern: str  # regex on the device name, case-insensitive
    fp32_tflops: float  # peak, non-tensor-core
    bandwidth_gbs: float  # peak memory bandwidth
    memory_gb: float


# Measured fp32 matmul lands between 20 % and 130 % of peak (TF32 off, torch's default for matmul);
# a copy between 30 % and 120 % of peak bandwidth.
FP32_RANGE = (0.2, 1.3)
BANDWIDTH_RANGE = (0.3, 1.2)

KNOWN_GPUS: tuple[DeviceSpec, ...] = (
    DeviceSpec(r"rtx 4090", 82.6, 1008, 24),
    DeviceSpec(r"rtx 4080", 48.7, 717, 16),
    DeviceSpec(r"rtx 4070 ti", 40.1, 504, 12),
    DeviceSpec(r"rtx 4070", 29.1, 504, 12),
    DeviceSpec(r"rtx 4060 ti", 22.1, 288, 16),
    DeviceSpec(r"rtx 4060", 15.1, 272, 8),
    DeviceSpec(r"rtx 3090", 35.6, 936, 24),
    DeviceSpec(r"rtx 3080", 29.8, 760, 12),
    DeviceSpec(r"rtx 3070", 20.3, 448, 8),
    DeviceSpec(r"rtx 3060", 12.7, 360, 12),
    DeviceSpec(r"rtx 2080 ti", 13.4, 616, 11),
    DeviceSpec(r"rtx a6000", 38.7, 768, 48),
    DeviceSpec(r"a100", 19.5, 2039, 80),
    DeviceSpec(r"h100", 67.0, 3350, 80),
    DeviceSpec(r"\bl4\b", 30.3, 300, 24),
    DeviceSpec(r"\bt4\b", 8.1, 320, 16),
    DeviceSpec(r"v100", 15.7, 900, 32),
    DeviceSpec(r"\ba10\b", 31.2, 600, 24),
    DeviceSpec(r"rx 7900 xtx", 61.4, 960, 24),
)
# Any GPU at all, for names not in the table.
GPU_FP32_GFLOPS = (500.0, 250_000.0)
GPU_BANDWIDTH_GBS = (50.0, 5_000.0)
# A CPU, per core for compute (AMX/AVX-512 cores measure a few hundred GFLOP/s fp32), whole socket for memory.
CPU_FP32_GFLOPS_PER_CORE = (0.2, 1000.0)
CPU_BANDWIDTH_GBS = (0.2, 1_000.0)


@dataclass(frozen=True)
class HardwareVerdict:
    ok: bool
    reason: str


def known_gpu(name: str) -> DeviceSpec | None:
    return next((spec for spec in KNOWN_GPUS if re.search(spec.pattern, name, re.IGNORECASE)), None)


def _outside(value: float, low: float, high: float) -> bool:
    return not low <= value <= high


def hardware_plausible(
    report: BenchmarkReport, *, claimed_device: str, claimed_gpus: list[str], memory_mb: int
) -> HardwareVerdict:
    """Check the benchmark against what the agent says it is; the reason names the number that fails."""
    if report.device != claimed_device:
        return HardwareVerdict(
            False, f"hello says the worker runs on {claimed_device}, the benchmark ran on {report.device}"
        )
    fp32, bandwidth = report.matmul_fp32_gflops, report.memory_bandwidth_gbs
    if report.device == "cpu":
        low, high = (bound * report.cpu_count for bound in CPU_FP32_GFLOPS_PER_CORE)
        if _outside(fp32, low, high):
            return HardwareVerdict(
                False,
                f"{fp32:.0f} GFLOP/s fp32 is not what {report.cpu_count} CPU cores do ({low:.0f} to {high:.0f})",
            )
        if _outside(bandwidth, *CPU_BANDWIDTH_GBS):
            return HardwareVerdict(False, f"{bandwidth:.1f} GB/s memory bandwidth is not a CPU's")
        if memory_mb and report.max_alloc_mb > memory_mb * 1.05:
            return HardwareVerdict(
                False, f"allocated {report.max_alloc_mb} MB on a machine that reports {memory_mb} MB"
            )
        return HardwareVerdict(
            True, f"CPU, {report.cpu_count} cores: {fp32:.0f} GFLOP/s fp32, {bandwidth:.1f} GB/s"
        )
    if claimed_gpus and not any(report.device_name == gpu for gpu in claimed_gpus):
        return HardwareVerdict(
            False, f"the benchmark ran on {report.device_name!r}, hello lists {', '.join(claimed_gpus)}"
        )
    spec = known_gpu(report.device_name)
    if spec is None:
        if _outside(fp32, *GPU_FP32_GFLOPS):
            return HardwareVerdict(
                False,
                f"{report.device_name!r} measured {fp32:.0f} GFLOP/s fp32, outside what any GPU does "
                f"({GPU_FP32_GFLOPS[0]:.0f} to {GPU_FP32_GFLOPS[1]:.0f})",
            )
        if _outside(bandwidth, *GPU_BANDWIDTH_GBS):
            return HardwareVerdict(
                False, f"{report.device_name!r} measured {bandwidth:.0f} GB/s, not a GPU's"
            )
        return HardwareVerdict(True, f"unlisted GPU {report.device_name!r} within the range of GPUs")
    low, high = (spec.fp32_tflops * 1000 * bound for bound in FP32_RANGE)
    if _outside(fp32, low, high):
        return HardwareVerdict(
            False,
            f"claims {report.device_name} (expects {low:,.0f} to {high:,.0f} GFLOP/s fp32) "
            f"but measured {fp32:,.0f} GFLOP/s",
        )
    low, high = (spec.bandwidth_gbs * bound for bound in BANDWIDTH_RANGE)
    if _outside(bandwidth, low, high):
        return HardwareVerdict(
            False,
            f"claims {report.device_name} (expects {low:,.0f} to {high:,.0f} GB/s) but measured {bandwidth:,.0f} GB/s",
        )
    if report.max_alloc_mb > spec.memory_gb * 1024 * 1.05:
        return HardwareVerdict(
            False, f"allocated {report.max_alloc_mb} MB on a {spec.memory_gb:.0f} GB {report.device_name}"
        )
    return HardwareVerdict(True, f"{report.device_name}: {fp32:,.0f} GFLOP/s fp32, {bandwidth:,.0f} GB/s")
