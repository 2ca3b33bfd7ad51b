"""The owner's energy policy and whether it allows work now: pure functions, no I/O.

The agent enforces it locally on every power reading; the server's dispatcher
applies the same functions to the last power frame it stored, so both sides
always agree on why a host is or is not taking work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A home importing less than this from the grid counts as running on its own
# solar/battery: meters jitter around zero.
GREEN_GRID_TOLERANCE_W = 50.0


class EnergyPolicy(BaseModel):
    """What the GPU owner allows. Pushed to the agent in `config` frames."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(default=0, ge=0, description="bumped on every change; the agent keeps the newest")
    battery_reserve_pct: float = Field(default=20.0, ge=0, le=100)
    solar_surplus_only: bool = False
    allowed_hours: list[int] = Field(
        default=[], description="hours of the day (agent's local time); empty = always"
    )
    max_gpu_watts: int | None = Field(default=None, ge=1)
    price_per_1k_items_minor: int = Field(
        default=10, ge=0, description="price in minor units per 1,000 items"
    )

    @field_validator("allowed_hours")
    @classmethod
    def _hours_in_a_day(cls, hours: list[int]) -> list[int]:
        if any(not 0 <= hour <= 23 for hour in hours):
            raise ValueError("allowed_hours holds hours from 0 to 23")
        return sorted(set(hours))


@dataclass(frozen=True)
class PowerState:
    """One reading of the site; None where the machine has no such meter."""

    gpu_w: float | None = None
    battery_soc_pct: float | None = None
    solar_w: float | None = None
    grid_w: float | None = None  # positive: importing from the grid
    load_w: float | None = None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


def work_allowed(policy: EnergyPolicy, power: PowerState | None, *, local_hour: int) -> Verdict:
    """May this host take new work now? The reason names the rule that said no."""
    if policy.allowed_hours and local_hour not in policy.allowed_hours:
        return Verdict(False, f"{local_hour:02d}:00 is outside the allowed hours")
    if (
        power is not None
        and power.battery_soc_pct is not None
        and power.battery_soc_pct < policy.battery_reserve_pct
    ):
        # Floored, not rounded: 19.96% must not read as "20.0% is below the 20% reserve".
        shown = math.floor(power.battery_soc_pct * 10) / 10
        return Verdict(False, f"battery at {shown:.1f}% is below the {policy.battery_reserve_pct:g}% reserve")
    if policy.solar_surplus_only:
        surplus = solar_surplus_w(power)
        if surplus is None:
            return Verdict(False, "solar-surplus-only, but the site reports no solar and load readings")
        if surplus <= 0:
            return Verdict(False, f"no solar surplus ({surplus:.0f} W)")
    return Verdict(True, "policy allows work")


def solar_surplus_w(power: PowerState | None) -> float | None:
    if power is None or power.solar_w is None or power.load_w is None:
        return None
    return power.solar_w - power.load_w


def is_green(power: PowerState | None) -> bool:
    """Running on the home's own solar/battery now: not importing from the grid."""
    return power is not None and power.grid_w is not None and power.grid_w <= GREEN_GRID_TOLERANCE_W
