"""The Powerwall adapter against a stand-in with pypowerwall's method names (no network), and the
NVML probe: absent → None without error; present → watts, power cap and metered energy."""

from __future__ import annotations

import sys
import types

import pytest

from hearth_agent.energy.nvml import GpuEnergyMeter, NvmlGpu
from hearth_agent.energy.powerwall import PowerwallError, PowerwallProbe, PowerwallSettings


class FakePowerwall:
    """What pypowerwall.Powerwall answers: level() in %, power() in W keyed site/solar/battery/load."""

    def __init__(self, level=55.5, power=None, fail=False):
        self._level = level
        self._power = (
            power if power is not None else {"site": 1200.0, "solar": -3.0, "battery": 400.0, "load": 1800.0}
        )
        self.fail = fail

    def level(self):
        if self.fail:
            raise ConnectionError("gateway unreachable")
        return self._level

    def power(self):
        return self._power


def test_it_reads_battery_solar_grid_and_load_from_the_gateway() -> None:
    reading = PowerwallProbe(FakePowerwall()).read()
    assert reading.source == "powerwall"
    p = reading.power
    assert (p.battery_soc_pct, p.solar_w, p.grid_w, p.load_w, p.gpu_w) == (55.5, 0.0, 1200.0, 1800.0, None)


def test_it_keeps_what_the_gateway_did_not_answer_as_none_and_clamps_the_level() -> None:
    p = PowerwallProbe(FakePowerwall(level=100.4, power={"site": -2500})).read().power
    assert (p.battery_soc_pct, p.solar_w, p.grid_w, p.load_w) == (100.0, None, -2500.0, None)


def test_a_gateway_failure_is_a_powerwall_error() -> None:
    with pytest.raises(PowerwallError, match="unreachable"):
        PowerwallProbe(FakePowerwall(fail=True)).read()


def test_without_pypowerwall_it_says_which_extra_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pypowerwall", None)
    with pytest.raises(PowerwallError, match=r"hearth-agent\[powerwall\]"):
        PowerwallProbe.connect(PowerwallSettings(host="10.0.1.2"))


def test_it_connects_with_the_customer_login_and_the_gateway_password(monkeypatch) -> None:
    calls = []
    module = types.ModuleType("pypowerwall")

    def powerwall(*args, **kwargs):
        calls.append((args, kwargs))
        return FakePowerwall()

    module.Powerwall = powerwall  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pypowerwall", module)
    monkeypatch.setenv("HEARTH_POWERWALL_PASSWORD", "from-env")
    settings = PowerwallSettings(host="10.0.1.2", email="me@example.com", gw_pwd="ABCDE").with_env()
    probe = PowerwallProbe.connect(settings)
    assert calls == [(("10.0.1.2", "from-env", "me@example.com", "UTC"), {"timeout": 5, "gw_pwd": "ABCDE"})]
    assert probe.read().power.battery_soc_pct == 55.5
    assert "from-env" not in repr(settings)


def test_without_pynvml_there_is_no_gpu_probe_and_no_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert NvmlGpu.open() is None


def test_pynvml_without_a_driver_is_no_gpu_probe(monkeypatch) -> None:
    module = types.ModuleType("pynvml")

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    module.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert NvmlGpu.open() is None


class FakeNvml:
    """pynvml's names, milliwatts and millijoules as the real library returns them."""

    def __init__(self, *, settable=True, counter=True):
        self.power_mw = [180_000, 20_000]
        self.limits_mw: dict[int, int] = {}
        self.energy_mj = 1_000_000
        self.settable = settable
        self.counter = counter

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetPowerUsage(self, h):
        return self.power_mw[h]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h):
        return (100_000, 350_000)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h):
        return 320_000

    def nvmlDeviceSetPowerManagementLimit(self, h, mw):
        if not self.settable:
            raise PermissionError("Insufficient Permissions")
        self.limits_mw[h] = mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter:
            raise RuntimeError("Not Supported")
        return self.energy_mj


def test_nvml_power_is_the_sum_of_the_gpus_in_watts() -> None:
    assert NvmlGpu(FakeNvml(), [0, 1]).power_w() == 200.0


def test_the_power_cap_is_clamped_to_what_the_board_allows_and_can_be_lifted() -> None:
    nvml = FakeNvml()
    gpu = NvmlGpu(nvml, [0, 1])
    assert gpu.set_power_limit(50) is None
    assert nvml.limits_mw == {0: 100_000, 1: 100_000}
    assert gpu.set_power_limit(250) is None and nvml.limits_mw[0] == 250_000
    assert gpu.set_power_limit(None) is None and nvml.limits_mw[0] == 320_000


def test_a_power_cap_the_driver_refuses_is_reported_not_raised() -> None:
    problem = NvmlGpu(FakeNvml(settable=False), [0, 1]).set_power_limit(200)
    assert problem is not None and "Insufficient Permissions" in problem and "GPU 1" in problem


def test_task_energy_is_the_energy_counter_delta_when_the_gpu_has_one() -> None:
    nvml = FakeNvml()
    meter = GpuEnergyMeter(NvmlGpu(nvml, [0, 1]))
    meter.start()
    nvml.energy_mj += 3_600_000  # 3600 J
    assert meter.stop() == pytest.approx(1.0)


def test_task_energy_is_integrated_from_power_samples_without_a_counter() -> None:
    import time

    meter = GpuEnergyMeter(NvmlGpu(FakeNvml(counter=False), [0, 1]), interval_s=0.01)
    meter.start()
    time.sleep(0.2)
    wh = meter.stop()
    # 180 W for ~0.2 s
    assert wh is not None and 180 * 0.15 / 3600 < wh < 180 * 0.5 / 3600
