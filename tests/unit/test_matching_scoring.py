"""The matcher's hard filter, the fleet-wide queued reason and the score: tables of plain data."""

from __future__ import annotations

import pytest

from hearth_agent.policy import EnergyPolicy, PowerState
from marketplace.matching.scoring import (
    HostView,
    TaskView,
    fit_rejection,
    fitting,
    match_score,
    pair_rejection,
    queued_reason,
)

SUNNY = PowerState(battery_soc_pct=80, solar_w=3000, grid_w=-1200, load_w=900)
GRID = PowerState(battery_soc_pct=60, solar_w=0, grid_w=600, load_w=900)


def _host(price: int = 10, **kwargs: object) -> HostView:
    base: dict[str, object] = {
        "ready": True,
        "slots": 2,
        "leased": 0,
        "memory_mb": 8192,
        "policy": EnergyPolicy(price_per_1k_items_minor=price),
    }
    return HostView(**{**base, **kwargs})  # type: ignore[arg-type]


def _task(**kwargs: object) -> TaskView:
    base: dict[str, object] = {"min_memory_mb": 1024, "max_price_per_1k_minor": 100}
    return TaskView(**{**base, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("task", "host", "reason"),
    [
        (_task(), _host(), None),
        (_task(), _host(ready=False), "agent is not ready"),
        (_task(), _host(quarantine_reason="wrong answers"), "host is quarantined: wrong answers"),
        (_task(), _host(verified=False), "host is not verified yet"),
        (_task(min_memory_mb=4096), _host(memory_mb=2048), "host has 2048 MB, model needs 4096 MB"),
        (_task(region="eu-west"), _host(region="eu-west"), None),
        (_task(region="eu-west"), _host(region="us-east"), "job asks region 'eu-west', host is in 'us-east'"),
        (_task(region="eu-west"), _host(), "job asks region 'eu-west', host is in 'no region'"),
        (_task(), _host(region="us-east"), None),
        (_task(green_only=True), _host(power=SUNNY), None),
        (_task(green_only=True), _host(power=GRID), "job is green-only"),
        (_task(green_only=True), _host(), "job is green-only"),
        (_task(max_price_per_1k_minor=100), _host(price=100), None),
        (
            _task(max_price_per_1k_minor=100),
            _host(price=150),
            "host asks 150 per 1k items, job pays at most 100",
        ),
        # The first filter that fails is the one named.
        (_task(min_memory_mb=9999, max_price_per_1k_minor=1), _host(price=50), "host has 8192 MB"),
    ],
)
def test_a_pair_is_rejected_by_the_first_filter_that_fails(
    task: TaskView, host: HostView, reason: str | None
) -> None:
    rejection = pair_rejection(task, host)
    if reason is None:
        assert rejection is None
    else:
        assert rejection is not None and rejection.startswith(reason)


@pytest.mark.parametrize(
    ("task", "hosts", "reason"),
    [
        (_task(), [], "no host online"),
        (_task(), [_host(price=500), _host()], None),
        (_task(), [_host(ready=False)], "no online host takes work now (one says: agent is not ready)"),
        (_task(), [_host(verified=False)], "no online host is verified yet"),
        (_task(min_memory_mb=4096), [_host(memory_mb=2048)], "no online host has 4096 MB"),
        (_task(region="eu-west"), [_host(region="us-east")], "no online host is in region 'eu-west'"),
        (_task(green_only=True), [_host(power=GRID)], "no online host is on solar/battery now"),
        (
            _task(),
            [_host(price=150), _host(price=300), _host(price=90, memory_mb=10)],
            "no online host asks ≤ 100 per 1k items (cheapest online: 150)",
        ),
        # A host that passes one filter and fails the next does not mask another that fails the first.
        (
            _task(green_only=True, max_price_per_1k_minor=20),
            [_host(price=10, power=GRID), _host(price=40, power=SUNNY)],
            "no online host asks ≤ 20 per 1k items (cheapest online: 40)",
        ),
    ],
)
def test_a_queued_task_says_which_filter_left_no_online_host(
    task: TaskView, hosts: list[HostView], reason: str | None
) -> None:
    assert queued_reason(task, hosts) == reason


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        (_host(price=10), _host(price=90)),
        (_host(items_per_s=400.0), _host(items_per_s=50.0)),
        (_host(items_per_s=50.0), _host()),
        (_host(reliability=0.95), _host(reliability=0.3)),
        (_host(reliability=0.6), _host()),
        (_host(power=SUNNY), _host(power=GRID)),
    ],
)
def test_a_host_scores_higher_when_it_is_cheaper_faster_more_reliable_or_green(
    better: HostView, worse: HostView
) -> None:
    assert match_score(_task(), better).total > match_score(_task(), worse).total


def test_a_host_in_the_asked_region_gets_the_region_part() -> None:
    task = _task(region="eu-west")
    assert match_score(task, _host(region="eu-west")).region > 0
    assert match_score(_task(), _host(region="eu-west")).region == 0


@pytest.mark.parametrize(
    "host",
    [
        _host(),
        _host(price=0, items_per_s=10_000.0, reliability=1.0, power=SUNNY, region="eu-west"),
        _host(price=500, reliability=-3.0),
    ],
)
def test_the_total_is_the_sum_of_the_parts_and_stays_between_0_and_1(host: HostView) -> None:
    score = match_score(_task(region="eu-west"), host)
    parts = score.price + score.throughput + score.reliability + score.energy + score.region
    assert score.total == pytest.approx(parts, abs=1e-3)
    assert 0.0 <= score.total <= 1.0


def test_a_job_that_pays_nothing_gets_no_price_part() -> None:
    assert match_score(_task(max_price_per_1k_minor=0), _host(price=0)).price == 0.0


FLEET = [
    _host(price=10),
    _host(price=10, region="eu-west"),
    _host(price=90),
    _host(price=10, power=SUNNY),
    _host(price=10, memory_mb=512),
    _host(price=10),  # the same fit key as the first
    _host(price=10, verified=False),
]


@pytest.mark.parametrize(
    "task",
    [
        _task(),
        _task(max_price_per_1k_minor=50),
        _task(green_only=True),
        _task(region="eu-west"),
        _task(min_memory_mb=4096, max_price_per_1k_minor=50, region="us-east"),
    ],
)
def test_fitting_keeps_exactly_the_hosts_fit_rejection_passes_in_their_order(task: TaskView) -> None:
    expected = [index for index, host in enumerate(FLEET) if fit_rejection(task, host) is None]
    assert fitting(task, list(range(len(FLEET))), FLEET.__getitem__) == expected
