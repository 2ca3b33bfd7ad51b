"""Which hosts take work: a table of host states and the verdict with its reason."""

from __future__ import annotations

import pytest

from hearth_agent.policy import EnergyPolicy, PowerState, Verdict
from marketplace.matching.scoring import HostView, ModelNeeds, free_slots, host_can_run

MODEL = ModelNeeds(min_memory_mb=1024)
SUNNY = PowerState(battery_soc_pct=80, solar_w=3000, grid_w=-1200, load_w=900)
EVENING = PowerState(battery_soc_pct=15, solar_w=0, grid_w=600, load_w=900)


def _host(**kwargs: object) -> HostView:
    base: dict[str, object] = {"ready": True, "slots": 2, "leased": 0, "memory_mb": 8192}
    return HostView(**{**base, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "green_only", "reason"),
    [
        (_host(), False, None),
        (_host(ready=False), False, "agent is not ready"),
        (_host(draining=True), False, "owner is draining the machine"),
        (_host(memory_mb=512), False, "host has 512 MB, model needs 1024 MB"),
        (_host(power=EVENING), False, "battery at 15.0% is below the 20% reserve"),
        (
            _host(power=SUNNY, policy=EnergyPolicy(battery_reserve_pct=90)),
            False,
            "battery at 80.0% is below the 90% reserve",
        ),
        (_host(power=SUNNY, policy=EnergyPolicy(solar_surplus_only=True)), False, None),
        (
            _host(
                power=PowerState(solar_w=200, load_w=900, grid_w=700),
                policy=EnergyPolicy(solar_surplus_only=True),
            ),
            False,
            "no solar surplus (-700 W)",
        ),
        (
            _host(policy=EnergyPolicy(solar_surplus_only=True)),
            False,
            "solar-surplus-only, but the site reports no solar",
        ),
        (
            _host(agent_verdict=Verdict(False, "03:00 is outside the allowed hours")),
            False,
            "agent reports: 03:00 is outside",
        ),
        (_host(power=SUNNY), True, None),
        (_host(power=PowerState(battery_soc_pct=60, grid_w=600)), True, "job is green-only"),
        (_host(), True, "job is green-only"),
    ],
)
def test_a_host_takes_a_task_only_when_every_rule_allows(
    host: HostView, green_only: bool, reason: str | None
) -> None:
    verdict = host_can_run(host, MODEL, green_only=green_only)
    if reason is None:
        assert verdict is None
    else:
        assert verdict is not None and verdict.startswith(reason)


def test_a_host_that_may_not_work_has_no_free_slots() -> None:
    assert free_slots(_host(leased=1)) == 1
    assert free_slots(_host(power=EVENING)) == 0
    assert free_slots(_host(draining=True)) == 0
