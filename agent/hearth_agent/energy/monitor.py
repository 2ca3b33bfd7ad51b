"""The agent's energy state: it reads the GPU and the site, keeps the owner's newest policy (on
disk too, so a restart keeps it), judges each reading with policy.work_allowed, and meters the
energy of each task."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from hearth_agent.config import write_private_file
from hearth_agent.energy.estimate import DEFAULT_WATTS_PER_CORE, estimate_task_wh
from hearth_agent.energy.nvml import GpuEnergyMeter, NvmlGpu
from hearth_agent.energy.probe import SiteProbe, SiteReading
from hearth_agent.policy import EnergyPolicy, PowerState, Verdict, work_allowed
from hearth_agent.protocol import ConfigPayload, PowerPayload

log = logging.getLogger(__name__)

# Until the server's first config frame says otherwise.
DEFAULT_POWER_INTERVAL_S = 10.0

PowerSource = Literal["nvml", "powerwall", "simulator", "none"]
EnergySource = Literal["nvml", "estimate"]


def default_power_interval_s() -> float:
    raw = os.environ.get("HEARTH_POWER_INTERVAL_S")
    if not raw:
        return DEFAULT_POWER_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"HEARTH_POWER_INTERVAL_S must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"HEARTH_POWER_INTERVAL_S must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class PowerReading:
    source: PowerSource
    power: PowerState
    verdict: Verdict

    def payload(self) -> PowerPayload:
        p = self.power
        return PowerPayload(
            source=self.source,
            gpu_w=p.gpu_w,
            battery_soc_pct=p.battery_soc_pct,
            solar_w=p.solar_w,
            grid_w=p.grid_w,
            load_w=p.load_w,
            work_allowed=self.verdict.allowed,
            reason=self.verdict.reason,
        )


class EnergyMonitor:
    """Thread-safe enough for its use: `read()` runs in a worker thread, the rest on the loop."""

    def __init__(
        self,
        *,
        site: SiteProbe | None = None,
        gpu: NvmlGpu | None = None,
        policy_path: Path | None = None,
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        interval_s: float | None = None,
    ) -> None:
        self.site = site
        self.gpu = gpu
        self.policy_path = policy_path
        self.watts_per_core = watts_per_core
        self.interval_s = interval_s if interval_s is not None else default_power_interval_s()
        self.policy = self._load_policy()
        self.power_limit_error: str | None = None
        self.last: PowerReading | None = None
        self._busy = 0
        self._busy_lock = threading.Lock()
        if self.policy.max_gpu_watts is not None:
            self._apply_power_limit(self.policy.max_gpu_watts)

    # ---- readings -----------------------------------------------------

    def read(self) -> PowerReading:
        """Read the GPU and the site (may block on the network) and judge the reading."""
        site: SiteReading | None = None
        if self.site is not None:
            try:
                site = self.site.read()
            except Exception as exc:
                log.warning("cannot read the %s site: %s", self.site.source, exc)
        gpu_w = self.gpu.power_w() if self.gpu is not None else None
        power = site.power if site is not None else PowerState()
        if gpu_w is not None:
            power = PowerState(
                gpu_w=gpu_w,
                battery_soc_pct=power.battery_soc_pct,
                solar_w=power.solar_w,
                grid_w=power.grid_w,
                load_w=power.load_w,
            )
        source: PowerSource
        if self.site is not None:
            source = self.site.source
        elif self.gpu is not None:
            source = "nvml"
        else:
            source = "none"
        hour = site.local_hour if site is not None and site.local_hour is not None else datetime.now().hour
        reading = PowerReading(
            source=source, power=power, verdict=work_allowed(self.policy, power, local_hour=hour)
        )
        self.last = reading
        return reading

    # ---- policy -------------------------------------------------------

    def apply_config(self, config: ConfigPayload) -> bool:
        """Take the server's config; an older policy than ours (by version) is ignored. Returns
        whether the policy changed."""
        self.interval_s = config.power_interval_s
        new = config.policy
        if new.version < self.policy.version:
            log.info("ignored energy policy v%d: v%d is newer", new.version, self.policy.version)
            return False
        if new == self.policy:
            return False
        old, self.policy = self.policy, new
        log.info("energy policy v%d: %s", new.version, new.model_dump_json(exclude={"version"}))
        self._save_policy()
        if new.max_gpu_watts != old.max_gpu_watts:
            self._apply_power_limit(new.max_gpu_watts)
        return True

    def _apply_power_limit(self, watts: int | None) -> None:
        if self.gpu is None:
            if watts is not None:
                log.info("policy caps the GPU at %d W, but there is no NVML here to apply it", watts)
            return
        self.power_limit_error = self.gpu.set_power_limit(watts)
        if self.power_limit_error:
            # Usually "insufficient permissions": the cap needs root. The server still sees our draw.
            log.warning("could not set the GPU power limit to %s W: %s", watts, self.power_limit_error)

    def _load_policy(self) -> EnergyPolicy:
        if self.policy_path is None:
            return EnergyPolicy()
        try:
            return EnergyPolicy.model_validate_json(self.policy_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return EnergyPolicy()
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("ignoring the saved energy policy %s: %s", self.policy_path, exc)
            return EnergyPolicy()

    def _save_policy(self) -> None:
        if self.policy_path is None:
            return
        try:
            write_private_file(self.policy_path, self.policy.model_dump_json(indent=2))
        except OSError as exc:
            log.warning("cannot save the energy policy to %s: %s", self.policy_path, exc)

    # ---- tasks --------------------------------------------------------

    def start_task(self, *, busy_cores: int) -> TaskMeter:
        """Call when a batch starts running."""
        return TaskMeter(self, busy_cores=busy_cores)

    def _set_busy(self, delta: int) -> None:
        with self._busy_lock:
            self._busy = max(0, self._busy + delta)
            busy = self._busy > 0
        if self.site is not None and hasattr(self.site, "gpu_busy"):
            # The simulated site adds this machine's draw to the house load while it works.
            self.site.gpu_busy = busy


class TaskMeter:
    """Energy of one batch: measured by NVML, else estimated from compute time. `stop()` when
    the batch ends, whatever happens (it is idempotent), then ask `energy()`."""

    def __init__(self, monitor: EnergyMonitor, *, busy_cores: int) -> None:
        self.monitor = monitor
        self.busy_cores = busy_cores
        self._gpu_meter: GpuEnergyMeter | None = None
        self._measured_wh: float | None = None
        self._stopped = False
        if monitor.gpu is not None:
            self._gpu_meter = GpuEnergyMeter(monitor.gpu)
            self._gpu_meter.start()
        monitor._set_busy(+1)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.monitor._set_busy(-1)
        if self._gpu_meter is not None:
            self._measured_wh = self._gpu_meter.stop()

    def energy(self, compute_ms: float) -> tuple[float, EnergySource]:
        """(Wh, "nvml") when the GPU was metered, else (Wh, "estimate") from the compute time."""
        self.stop()
        if self._measured_wh is not None:
            return self._measured_wh, "nvml"
        wh = estimate_task_wh(
            compute_s=compute_ms / 1000.0,
            busy_cores=self.busy_cores,
            watts_per_core=self.monitor.watts_per_core,
        )
        return wh, "estimate"
