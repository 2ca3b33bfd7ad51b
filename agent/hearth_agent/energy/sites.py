"""Choosing the site probe at startup: `run --site`, then $HEARTH_SITE, then the agent config.
Simulator parameters come from `--site-sim` (file or JSON), then $HEARTH_SITE_SIM, then the config."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hearth_agent.config import AgentConfig
from hearth_agent.energy.monitor import EnergyMonitor
from hearth_agent.energy.nvml import NvmlGpu
from hearth_agent.energy.powerwall import PowerwallError, PowerwallProbe, PowerwallSettings
from hearth_agent.energy.probe import SiteProbe
from hearth_agent.energy.simulator import SimulatorParams, SiteSimulator

log = logging.getLogger(__name__)

SITE_KINDS = ("none", "simulator", "powerwall")


class SiteConfigError(Exception):
    """The site settings are wrong; the message says which and how to fix them."""


def simulator_params(config: AgentConfig, sim_source: str | None = None) -> SimulatorParams:
    source = sim_source or os.environ.get("HEARTH_SITE_SIM")
    try:
        if source:
            return SimulatorParams.from_source(source)
        return SimulatorParams.model_validate(config.site_simulator)
    except (OSError, ValueError, ValidationError) as exc:
        raise SiteConfigError(f"bad simulator parameters ({source or 'agent config'}): {exc}") from exc


def powerwall_settings(config: AgentConfig) -> PowerwallSettings:
    try:
        settings = PowerwallSettings.model_validate(config.powerwall) if config.powerwall else None
    except ValidationError as exc:
        raise SiteConfigError(f"bad powerwall settings in the agent config: {exc}") from exc
    settings = settings.with_env() if settings is not None else PowerwallSettings.from_env()
    if settings is None:
        raise SiteConfigError(
            "--site powerwall needs the gateway: set HEARTH_POWERWALL_HOST (and _EMAIL, _PASSWORD) "
            'or "powerwall": {"host": ...} in the agent config'
        )
    return settings


def site_probe(
    config: AgentConfig, *, site: str | None = None, sim_source: str | None = None
) -> SiteProbe | None:
    kind = site or os.environ.get("HEARTH_SITE") or config.site
    if kind == "none":
        return None
    if kind == "simulator":
        return SiteSimulator(simulator_params(config, sim_source))
    if kind == "powerwall":
        try:
            return PowerwallProbe.connect(powerwall_settings(config))
        except PowerwallError as exc:
            raise SiteConfigError(str(exc)) from exc
    raise SiteConfigError(f"unknown site {kind!r}; choose one of {', '.join(SITE_KINDS)}")


def energy_monitor(
    config: AgentConfig,
    *,
    policy_path: Path | None,
    site: str | None = None,
    sim_source: str | None = None,
    **kwargs: Any,
) -> EnergyMonitor:
    """Everything the agent measures, wired once at startup; raises SiteConfigError."""
    probe = site_probe(config, site=site, sim_source=sim_source)
    try:
        monitor = EnergyMonitor(
            site=probe,
            gpu=NvmlGpu.open(),
            policy_path=policy_path,
            watts_per_core=config.watts_per_core,
            **kwargs,
        )
    except ValueError as exc:  # a bad $HEARTH_POWER_INTERVAL_S
        raise SiteConfigError(str(exc)) from exc
    log.info(
        "energy: site %s, GPU power %s, a power frame every %.1f s until the server says otherwise, policy v%d",
        probe.source if probe is not None else "none",
        "from NVML" if monitor.gpu is not None else "not measured (task energy is estimated)",
        monitor.interval_s,
        monitor.policy.version,
    )
    return monitor
