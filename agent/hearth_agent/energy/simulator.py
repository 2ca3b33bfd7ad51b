"""A simulated home site for tests and the demo: battery, solar over the day, house load, a tariff
and this machine's GPU, on a clock that can run many times faster than the wall clock.

Dispatch follows a home battery in self-consumption mode: solar covers the load first, surplus
charges the battery (the rest is exported), a deficit discharges it down to empty, then the grid
supplies what is left. Deterministic for a seed and a sequence of steps."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hearth_agent.energy.probe import SiteReading
from hearth_agent.policy import PowerState

# Integrate in steps no longer than this (simulated seconds): the sun and the noise move slowly.
MAX_STEP_S = 60.0


def _default_tariff() -> list[float]:
    # Cheap at night, dear in the evening peak: a typical time-of-use plan, per kWh.
    return [0.15] * 7 + [0.30] * 9 + [0.45] * 5 + [0.30] * 3


class SimulatorParams(BaseModel):
    """Everything the simulated site is made of; read from JSON ($HEARTH_SITE_SIM or a file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    capacity_kwh: float = Field(default=13.5, gt=0)
    soc_pct: float = Field(default=50.0, ge=0, le=100, description="state of charge at start")
    battery_max_w: float = Field(default=5000.0, gt=0, description="charge/discharge power limit")
    solar_peak_w: float = Field(default=5000.0, ge=0)
    sunrise_h: float = Field(default=6.5, ge=0, le=24)
    sunset_h: float = Field(default=19.0, ge=0, le=24)
    load_w: float = Field(default=800.0, ge=0, description="house base load")
    load_noise_w: float = Field(default=100.0, ge=0, description="std dev of the load's noise")
    gpu_busy_w: float = Field(default=250.0, ge=0, description="this machine's extra draw while it works")
    tariff_per_kwh: list[float] = Field(default_factory=_default_tariff, min_length=24, max_length=24)
    time_scale: float = Field(default=1.0, gt=0, description="simulated seconds per real second")
    start_hour: float | None = Field(default=None, ge=0, lt=24, description="default: the local time now")
    seed: int = 0

    @model_validator(mode="after")
    def _sun_rises_before_it_sets(self) -> SimulatorParams:
        if self.sunrise_h >= self.sunset_h:
            raise ValueError("sunrise_h must be before sunset_h")
        return self

    @classmethod
    def from_json(cls, text: str) -> SimulatorParams:
        """Parse a JSON object; raise ValueError naming what is wrong."""
        return cls.model_validate(json.loads(text))

    @classmethod
    def from_source(cls, source: str) -> SimulatorParams:
        """A path to a JSON file, or the JSON itself (what $HEARTH_SITE_SIM holds)."""
        text = source.strip()
        if not text.startswith("{"):
            text = Path(source).expanduser().read_text(encoding="utf-8")
        return cls.from_json(text)


@dataclass(frozen=True)
class Flows:
    """Instantaneous powers in W. grid_w > 0 imports; battery_w > 0 discharges."""

    solar_w: float
    load_w: float
    battery_w: float
    grid_w: float


class SiteSimulator:
    """The site's state (battery energy, simulated clock) and its physics. `step()` is the pure
    part tests drive directly; `read()` advances by the real time elapsed × time_scale."""

    source: Literal["simulator"] = "simulator"

    def __init__(self, params: SimulatorParams, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.params = params
        self.clock = clock
        self.rng = random.Random(params.seed)
        self.energy_wh = params.capacity_kwh * 1000.0 * params.soc_pct / 100.0
        if params.start_hour is not None:
            start_hour = params.start_hour
        else:
            now = datetime.now()
            start_hour = now.hour + now.minute / 60.0
        self.sim_seconds = start_hour * 3600.0
        self.gpu_busy = False
        self.grid_cost = 0.0  # money spent importing, in the tariff's currency
        self._noise = self._draw_noise()
        self._last_clock: float | None = None

    # ---- state --------------------------------------------------------

    @property
    def capacity_wh(self) -> float:
        return self.params.capacity_kwh * 1000.0

    @property
    def soc_pct(self) -> float:
        return 100.0 * self.energy_wh / self.capacity_wh

    @property
    def hour(self) -> float:
        """Simulated time of day, 0 <= hour < 24."""
        return (self.sim_seconds / 3600.0) % 24.0

    @property
    def price_per_kwh(self) -> float:
        return self.params.tariff_per_kwh[int(self.hour) % 24]

    def solar_w(self, hour: float) -> float:
        """Half a sine between sunrise and sunset; nothing at night."""
        p = self.params
        if not p.sunrise_h < hour < p.sunset_h:
            return 0.0
        return p.solar_peak_w * math.sin(math.pi * (hour - p.sunrise_h) / (p.sunset_h - p.sunrise_h))

    def load_w(self) -> float:
        gpu = self.params.gpu_busy_w if self.gpu_busy else 0.0
        return max(0.0, self.params.load_w + self._noise) + gpu

    def flows(self) -> Flows:
        """Where the power goes right now, given the battery's charge."""
        solar = self.solar_w(self.hour)
        load = self.load_w()
        net = solar - load  # > 0: surplus
        limit = self.params.battery_max_w
        if net >= 0:
            room = self.capacity_wh - self.energy_wh
            charge = min(net, limit) if room > 0 else 0.0
            return Flows(solar_w=solar, load_w=load, battery_w=-charge, grid_w=-(net - charge))
        deficit = -net
        discharge = min(deficit, limit) if self.energy_wh > 0 else 0.0
        return Flows(solar_w=solar, load_w=load, battery_w=discharge, grid_w=deficit - discharge)

    # ---- time ---------------------------------------------------------

    def step(self, seconds: float) -> Flows:
        """Advance the simulated clock; returns the flows at the end."""
        remaining = max(0.0, seconds)
        while remaining > 0:
            dt = min(MAX_STEP_S, remaining)
            f = self.flows()
            hours = dt / 3600.0
            # battery_w > 0 drains the battery; clamp so rounding never leaves [0, capacity].
            self.energy_wh = min(self.capacity_wh, max(0.0, self.energy_wh - f.battery_w * hours))
            if f.grid_w > 0:
                self.grid_cost += f.grid_w / 1000.0 * hours * self.price_per_kwh
            self.sim_seconds += dt
            self._noise = self._draw_noise()
            remaining -= dt
        return self.flows()

    def read(self) -> SiteReading:
        now = self.clock()
        elapsed = 0.0 if self._last_clock is None else now - self._last_clock
        self._last_clock = now
        f = self.step(elapsed * self.params.time_scale)
        return SiteReading(
            source="simulator",
            power=PowerState(
                gpu_w=self.params.gpu_busy_w if self.gpu_busy else 0.0,
                battery_soc_pct=round(self.soc_pct, 3),
                solar_w=round(f.solar_w, 1),
                grid_w=round(f.grid_w, 1),
                load_w=round(f.load_w, 1),
            ),
            local_hour=int(self.hour),
        )

    def _draw_noise(self) -> float:
        sigma = self.params.load_noise_w
        return self.rng.gauss(0.0, sigma) if sigma > 0 else 0.0
