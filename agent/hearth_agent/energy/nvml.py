"""GPU power through NVML (`nvidia-ml-py`, imported lazily: absent on machines without an NVIDIA
driver). Reads board power, applies the owner's power cap when the driver permits, and meters
the energy a batch used."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 0.1


class NvmlGpu:
    """The machine's NVIDIA GPUs. `open()` returns None when there is no NVML, never raises."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nvml = nvml
        self.handles = handles
        self._lock = threading.Lock()

    @classmethod
    def open(cls) -> NvmlGpu | None:
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:
            # pynvml is installed but there is no driver or no device: a CPU machine.
            log.info("NVML is not available (%s); GPU power will not be measured", exc)
            return None
        if not handles:
            return None
        return cls(pynvml, handles)

    def power_w(self) -> float | None:
        """Board power of all GPUs now, in W; None when the driver does not report it."""
        total = 0.0
        try:
            with self._lock:
                for handle in self.handles:
                    total += self.nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW
        except Exception as exc:
            log.debug("NVML power read failed: %s", exc)
            return None
        return total

    def set_power_limit(self, watts: int | None) -> str | None:
        """Cap every GPU at `watts` (None: back to the default limit), clamped to what the board
        allows. Needs root; returns what went wrong, or None when it worked."""
        problems: list[str] = []
        for index, handle in enumerate(self.handles):
            try:
                with self._lock:
                    low_mw, high_mw = self.nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
                    if watts is None:
                        target_mw = self.nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
                    else:
                        target_mw = min(max(watts * 1000, low_mw), high_mw)
                    self.nvml.nvmlDeviceSetPowerManagementLimit(handle, target_mw)
                log.info("GPU %d power limit set to %.0f W", index, target_mw / 1000.0)
            except Exception as exc:
                problems.append(f"GPU {index}: {exc}")
        return "; ".join(problems) or None

    def energy_counter_j(self, index: int = 0) -> float | None:
        """The driver's energy counter in J (Volta and newer); None when unsupported."""
        try:
            with self._lock:
                return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handles[index])) / 1000.0
        except Exception:
            return None

    def device_power_w(self, index: int = 0) -> float | None:
        try:
            with self._lock:
                return float(self.nvml.nvmlDeviceGetPowerUsage(self.handles[index])) / 1000.0
        except Exception:
            return None


class GpuEnergyMeter:
    """Energy one GPU used between start() and stop(): the driver's counter delta when it has
    one, else power sampled every 100 ms in a thread and integrated (trapezoids)."""

    def __init__(self, gpu: NvmlGpu, index: int = 0, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.gpu = gpu
        self.index = index
        self.interval_s = interval_s
        self._start_j: float | None = None
        self._joules = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._start_j = self.gpu.energy_counter_j(self.index)
        if self._start_j is None:
            self._thread = threading.Thread(target=self._sample, name="gpu-energy", daemon=True)
            self._thread.start()

    def stop(self) -> float | None:
        """Wh used since start(); None when nothing could be measured."""
        if self._start_j is not None:
            end = self.gpu.energy_counter_j(self.index)
            return None if end is None else max(0.0, end - self._start_j) / 3600.0
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        return self._joules / 3600.0

    def _sample(self) -> None:
        last_t = time.monotonic()
        last_w = self.gpu.device_power_w(self.index)
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            watts = self.gpu.device_power_w(self.index)
            if watts is not None and last_w is not None:
                self._joules += (watts + last_w) / 2.0 * (now - last_t)
            last_t, last_w = now, watts
        # The tail after the last sample.
        if last_w is not None:
            self._joules += last_w * (time.monotonic() - last_t)
