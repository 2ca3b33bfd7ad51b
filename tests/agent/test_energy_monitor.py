"""The agent's energy state: the newest policy by version (kept on disk), the verdict on each
reading, the power frame it becomes, and energy per task."""

from __future__ import annotations

import stat

import pytest

from hearth_agent.config import AgentConfig
from hearth_agent.energy import EnergyMonitor
from hearth_agent.energy.simulator import SimulatorParams, SiteSimulator
from hearth_agent.energy.sites import SiteConfigError, energy_monitor
from hearth_agent.policy import EnergyPolicy
from hearth_agent.protocol import ConfigPayload


def config(version: int, **policy) -> ConfigPayload:
    return ConfigPayload(policy=EnergyPolicy(version=version, **policy), power_interval_s=2.5)


def simulator(soc_pct: float, **params) -> SiteSimulator:
    return SiteSimulator(
        SimulatorParams(soc_pct=soc_pct, solar_peak_w=0, load_noise_w=0, start_hour=21.0, **params)
    )


def test_it_keeps_the_newest_policy_and_saves_it_privately(tmp_path) -> None:
    path = tmp_path / "home" / "energy-policy.json"
    monitor = EnergyMonitor(policy_path=path)
    assert monitor.apply_config(config(3, battery_reserve_pct=40))
    assert monitor.interval_s == 2.5
    assert not monitor.apply_config(config(2, battery_reserve_pct=90))
    assert monitor.policy.battery_reserve_pct == 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    restarted = EnergyMonitor(policy_path=path)
    assert (restarted.policy.version, restarted.policy.battery_reserve_pct) == (3, 40)


def test_a_corrupt_saved_policy_falls_back_to_the_default(tmp_path) -> None:
    path = tmp_path / "energy-policy.json"
    path.write_text("{nope")
    assert EnergyMonitor(policy_path=path).policy == EnergyPolicy()


def test_a_battery_under_the_reserve_stops_work_with_the_reason() -> None:
    monitor = EnergyMonitor(site=simulator(19))
    monitor.apply_config(config(1, battery_reserve_pct=20))
    reading = monitor.read()
    payload = reading.payload()
    assert (payload.source, payload.battery_soc_pct, payload.work_allowed) == ("simulator", 19, False)
    assert payload.reason == "battery at 19.0% is below the 20% reserve"
    assert monitor.read().verdict.allowed is False


def test_the_simulated_clock_decides_the_allowed_hours() -> None:
    monitor = EnergyMonitor(site=simulator(80))
    monitor.apply_config(config(1, allowed_hours=[21]))
    assert monitor.read().verdict.allowed
    monitor.apply_config(config(2, allowed_hours=[3]))
    assert monitor.read().verdict.reason == "21:00 is outside the allowed hours"


def test_without_a_site_or_gpu_the_reading_is_empty_and_work_is_allowed() -> None:
    payload = EnergyMonitor().read().payload()
    assert (payload.source, payload.gpu_w, payload.battery_soc_pct, payload.work_allowed) == (
        "none",
        None,
        None,
        True,
    )


def test_a_site_that_cannot_be_read_gives_an_empty_reading_not_an_error() -> None:
    class Broken:
        source = "powerwall"

        def read(self):
            raise OSError("no route to host")

    monitor = EnergyMonitor(site=Broken())  # type: ignore[arg-type]
    monitor.apply_config(config(1, solar_surplus_only=True))
    reading = monitor.read()
    assert reading.source == "powerwall" and reading.power.battery_soc_pct is None
    assert not reading.verdict.allowed


def test_a_task_without_nvml_gets_an_estimate_and_loads_the_simulated_site() -> None:
    site = simulator(50, load_w=500, gpu_busy_w=300)
    monitor = EnergyMonitor(site=site, watts_per_core=10)
    meter = monitor.start_task(busy_cores=4)
    assert site.gpu_busy and monitor.read().power.load_w == 800
    meter.stop()
    assert not site.gpu_busy
    assert meter.energy(compute_ms=90_000) == (pytest.approx(1.0), "estimate")


def test_the_site_comes_from_the_flag_then_the_environment_then_the_config(monkeypatch) -> None:
    agent = AgentConfig(server_url="http://x", host_id="h", host_token="t", site_simulator={"soc_pct": 70})
    assert energy_monitor(agent, policy_path=None).site is None
    monkeypatch.setenv("HEARTH_SITE", "simulator")
    monkeypatch.setenv("HEARTH_POWER_INTERVAL_S", "0.5")
    from_env = energy_monitor(agent, policy_path=None)
    assert isinstance(from_env.site, SiteSimulator) and from_env.site.params.soc_pct == 70
    assert from_env.interval_s == 0.5
    monkeypatch.setenv("HEARTH_SITE_SIM", '{"soc_pct": 22, "time_scale": 600}')
    site = energy_monitor(agent, policy_path=None).site
    assert isinstance(site, SiteSimulator) and site.params.soc_pct == 22
    assert energy_monitor(agent, policy_path=None, site="none").site is None


def test_bad_site_settings_say_what_to_fix(monkeypatch) -> None:
    agent = AgentConfig(server_url="http://x", host_id="h", host_token="t")
    monkeypatch.delenv("HEARTH_POWERWALL_HOST", raising=False)
    with pytest.raises(SiteConfigError, match="HEARTH_POWERWALL_HOST"):
        energy_monitor(agent, policy_path=None, site="powerwall")
    with pytest.raises(SiteConfigError, match="simulator parameters"):
        energy_monitor(agent, policy_path=None, site="simulator", sim_source='{"soc_pct": 500}')
    monkeypatch.setenv("HEARTH_POWER_INTERVAL_S", "soon")
    with pytest.raises(SiteConfigError, match="HEARTH_POWER_INTERVAL_S"):
        energy_monitor(agent, policy_path=None)
