"""The simulated home site: dispatch (solar → load → battery → grid), bounds, seed and time scale."""

from __future__ import annotations

import json

import pytest

from hearth_agent.energy.simulator import SimulatorParams, SiteSimulator


def site(**overrides) -> SiteSimulator:
    params = {"load_noise_w": 0, "gpu_busy_w": 0, "start_hour": 12.0, "soc_pct": 50, **overrides}
    return SiteSimulator(SimulatorParams(**params))


def test_solar_covers_the_load_before_anything_else() -> None:
    sim = site(solar_peak_w=5000, load_w=800)
    flows = sim.flows()
    assert flows.solar_w > 4800
    assert flows.grid_w == 0
    assert flows.battery_w == pytest.approx(-(flows.solar_w - 800))


def test_surplus_charges_the_battery() -> None:
    sim = site(solar_peak_w=5000, load_w=800, sunrise_h=0, sunset_h=24, start_hour=11.5)
    before = sim.soc_pct
    sim.step(3600)
    # ~4.2 kW surplus for an hour into 13.5 kWh
    assert sim.soc_pct - before == pytest.approx(31, abs=1.5)


def test_surplus_beyond_the_battery_power_limit_is_exported() -> None:
    flows = site(solar_peak_w=5000, load_w=800, battery_max_w=1000).flows()
    assert flows.battery_w == -1000
    assert flows.grid_w == pytest.approx(-(flows.solar_w - 800 - 1000))


def test_a_full_battery_exports_the_whole_surplus() -> None:
    sim = site(solar_peak_w=5000, load_w=800, soc_pct=100)
    flows = sim.step(600)
    assert flows.battery_w == 0
    assert flows.grid_w < -3000
    assert sim.soc_pct == 100


def test_a_deficit_discharges_the_battery() -> None:
    sim = site(start_hour=22.0, load_w=800)
    flows = sim.flows()
    assert (flows.solar_w, flows.battery_w, flows.grid_w) == (0, 800, 0)
    sim.step(3600)
    assert sim.energy_wh == pytest.approx(13500 / 2 - 800)


def test_an_empty_battery_imports_from_the_grid_and_pays_the_tariff() -> None:
    sim = site(start_hour=1.0, load_w=1000, capacity_kwh=1, soc_pct=10)
    flows = sim.step(3600)
    assert sim.soc_pct == 0
    assert (flows.battery_w, flows.grid_w) == (0, 1000)
    # 100 Wh came from the battery, the other ~900 Wh from the grid at the night rate.
    assert sim.grid_cost == pytest.approx(0.9 * 0.15, rel=0.1)


def test_the_state_of_charge_stays_between_0_and_100_over_days() -> None:
    sim = SiteSimulator(
        SimulatorParams(capacity_kwh=2, soc_pct=50, solar_peak_w=9000, load_w=1500, load_noise_w=800, seed=7)
    )
    for _ in range(24 * 3):
        sim.gpu_busy = not sim.gpu_busy
        sim.step(3600)
        assert 0 <= sim.soc_pct <= 100
        reading = sim.read()
        assert reading.power.load_w is not None and reading.power.load_w >= 0


def test_it_is_deterministic_for_a_seed() -> None:
    def trace(seed: int) -> list[tuple[float, float]]:
        sim = SiteSimulator(SimulatorParams(load_noise_w=200, start_hour=8.0, seed=seed))
        out = []
        for _ in range(50):
            flows = sim.step(300)
            out.append((round(sim.energy_wh, 6), flows.load_w))
        return out

    assert trace(3) == trace(3)
    assert trace(3) != trace(4)


def test_the_time_scale_runs_the_site_faster_than_the_wall_clock() -> None:
    now = [100.0]
    sim = SiteSimulator(
        SimulatorParams(time_scale=3600, start_hour=20.0, load_w=1000, load_noise_w=0, gpu_busy_w=0),
        clock=lambda: now[0],
    )
    first = sim.read()
    assert first.local_hour == 20 and first.power.battery_soc_pct == 50
    now[0] += 1.0  # one real second is one simulated hour
    second = sim.read()
    assert second.local_hour == 21
    assert sim.energy_wh == pytest.approx(13500 / 2 - 1000)


def test_a_busy_gpu_adds_its_draw_to_the_house_load() -> None:
    sim = site(load_w=500, gpu_busy_w=300)
    assert sim.read().power.load_w == 500 and sim.read().power.gpu_w == 0
    sim.gpu_busy = True
    assert sim.read().power.load_w == 800 and sim.read().power.gpu_w == 300


def test_parameters_come_from_a_json_string_or_a_file(tmp_path) -> None:
    text = '{"capacity_kwh": 13.5, "soc_pct": 22, "time_scale": 600, "solar_peak_w": 0, "load_w": 800}'
    assert SimulatorParams.from_source(text).soc_pct == 22
    path = tmp_path / "site.json"
    path.write_text(json.dumps({"soc_pct": 80, "seed": 5}))
    params = SimulatorParams.from_source(str(path))
    assert (params.soc_pct, params.seed, params.capacity_kwh) == (80, 5, 13.5)


@pytest.mark.parametrize(
    "bad",
    ['{"soc_pct": 120}', '{"capacity": 13.5}', '{"sunrise_h": 20, "sunset_h": 6}', "{not json"],
)
def test_bad_parameters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        SimulatorParams.from_json(bad)
