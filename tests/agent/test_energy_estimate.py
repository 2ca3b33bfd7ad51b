"""The CPU energy estimate used when there is no NVML: watts per busy core × cores × time."""

from __future__ import annotations

import pytest

from hearth_agent.energy.estimate import DEFAULT_WATTS_PER_CORE, estimate_task_wh


@pytest.mark.parametrize(
    ("compute_s", "cores", "watts_per_core", "wh"),
    [
        (3600, 1, 15.0, 15.0),
        (360, 4, 15.0, 6.0),
        (1.2, 8, 10.0, 8 * 10 * 1.2 / 3600),
        (0, 8, 15.0, 0.0),
        (-1, 8, 15.0, 0.0),
        (10, 0, 15.0, 0.0),
        (10, 4, 0.0, 0.0),
    ],
)
def test_it_multiplies_watts_per_core_by_cores_and_time(compute_s, cores, watts_per_core, wh) -> None:
    assert estimate_task_wh(compute_s=compute_s, busy_cores=cores, watts_per_core=watts_per_core) == (
        pytest.approx(wh)
    )


def test_the_default_is_15_watts_per_core() -> None:
    assert DEFAULT_WATTS_PER_CORE == 15.0
    assert estimate_task_wh(compute_s=240, busy_cores=1) == pytest.approx(1.0)
