"""The home site through a Tesla Energy Gateway's local API, via `pypowerwall` (optional extra:
`pip install 'hearth-agent[powerwall]'`). Reads battery level, solar, grid and home load."""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hearth_agent.energy.probe import SiteReading
from hearth_agent.policy import PowerState

log = logging.getLogger(__name__)


class PowerwallError(Exception):
    """The gateway could not be reached or pypowerwall is not installed."""


class PowerwallSettings(BaseModel):
    """How to reach the gateway: customer login (email + password) and optionally the gateway's
    own password (`gw_pwd`, printed on the gateway; newer firmware needs it for the local API)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="gateway hostname or IP on the home network")
    email: str = "nobody@nowhere.com"
    password: str = Field(default="", repr=False)
    gw_pwd: str | None = Field(default=None, repr=False)
    timezone: str = "UTC"
    timeout_s: float = Field(default=5.0, gt=0)

    def with_env(self) -> PowerwallSettings:
        """Secrets from the environment win over the config file: they need not be stored."""
        update: dict[str, Any] = {}
        for field, var in (
            ("host", "HEARTH_POWERWALL_HOST"),
            ("email", "HEARTH_POWERWALL_EMAIL"),
            ("password", "HEARTH_POWERWALL_PASSWORD"),
            ("gw_pwd", "HEARTH_POWERWALL_GW_PWD"),
            ("timezone", "HEARTH_POWERWALL_TIMEZONE"),
        ):
            if value := os.environ.get(var):
                update[field] = value
        return self.model_copy(update=update)

    @classmethod
    def from_env(cls) -> PowerwallSettings | None:
        host = os.environ.get("HEARTH_POWERWALL_HOST")
        return cls(host=host).with_env() if host else None


def _watts(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class PowerwallProbe:
    """Adapter over a `pypowerwall.Powerwall` (or anything with its `level()` and `power()`)."""

    source: Literal["powerwall"] = "powerwall"

    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    def connect(cls, settings: PowerwallSettings) -> PowerwallProbe:
        try:
            import pypowerwall
        except ImportError as exc:
            raise PowerwallError(
                "the powerwall site needs pypowerwall: pip install 'hearth-agent[powerwall]'"
            ) from exc
        kwargs: dict[str, Any] = {"timeout": int(settings.timeout_s)}
        if settings.gw_pwd:
            # Only newer pypowerwall releases know gw_pwd; do not pass it when unused.
            kwargs["gw_pwd"] = settings.gw_pwd
        try:
            client = pypowerwall.Powerwall(
                settings.host, settings.password, settings.email, settings.timezone, **kwargs
            )
        except Exception as exc:
            raise PowerwallError(
                f"cannot connect to the Powerwall gateway at {settings.host}: {exc}"
            ) from exc
        log.info("reading the home site from the Powerwall gateway at %s", settings.host)
        return cls(client)

    def read(self) -> SiteReading:
        """One reading. `power()` gives the meter aggregates in W (site = grid, positive when
        importing; load = home); `level()` the battery charge in %. A value the gateway did not
        answer is None, never a guess."""
        try:
            level = _watts(self.client.level())
            flows = self.client.power() or {}
        except Exception as exc:
            raise PowerwallError(f"Powerwall gateway read failed: {exc}") from exc
        solar = _watts(flows.get("solar"))
        load = _watts(flows.get("load"))
        return SiteReading(
            source="powerwall",
            power=PowerState(
                battery_soc_pct=None if level is None else min(100.0, max(0.0, level)),
                # Inverters report a few negative watts at night; the frame wants >= 0.
                solar_w=None if solar is None else max(0.0, solar),
                grid_w=_watts(flows.get("site")),
                load_w=None if load is None else max(0.0, load),
            ),
        )
