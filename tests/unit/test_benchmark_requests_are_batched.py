"""The sweep asks a whole fleet to benchmark in a fixed number of queries, not one UPDATE per host,
and at most a capped number of hosts a sweep, so a stale fleet is asked over several sweeps."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from marketplace.hosts.models import Host
from marketplace.trust.services import hosts_request_benchmark
from tests import fake_runs as fr

pytestmark = pytest.mark.django_db


def test_asking_fifty_hosts_that_never_measured_costs_two_queries_and_reaches_each_channel() -> None:
    layer = get_channel_layer()
    assert layer is not None
    channels = [async_to_sync(layer.new_channel)() for _ in range(50)]
    hosts = [fr.host(channel_name=channel, benchmark_at=None) for channel in channels]
    now = timezone.now()
    with CaptureQueriesContext(connection) as captured:
        assert hosts_request_benchmark(now=now) == 50
    assert len(captured) == 2  # the hosts to ask, and one UPDATE for all of them
    assert Host.objects.filter(pk__in=[h.pk for h in hosts], benchmark_requested_at=now).count() == 50
    for channel in channels:
        message = async_to_sync(layer.receive)(channel)
        assert message == {"type": "agent.benchmark", "reason": "periodic re-benchmark"}


def test_a_sweep_asks_at_most_the_cap_oldest_numbers_first_and_the_next_sweeps_ask_the_rest() -> None:
    layer = get_channel_layer()
    assert layer is not None
    now = timezone.now()
    never = [fr.host(channel_name=async_to_sync(layer.new_channel)(), benchmark_at=None) for _ in range(3)]
    stale = [
        fr.host(
            channel_name=async_to_sync(layer.new_channel)(), benchmark_at=now - timedelta(days=2, hours=h)
        )
        for h in range(4)
    ]
    fresh = fr.host(channel_name=async_to_sync(layer.new_channel)(), benchmark_at=now)
    rounds: list[set[uuid.UUID]] = []
    with override_settings(HEARTH_REBENCHMARK_PER_SWEEP=3, HEARTH_REBENCHMARK_RANDOM_MEAN_S=1e12):
        for _ in range(4):
            asked_before = set(Host.objects.filter(benchmark_requested_at=now).values_list("pk", flat=True))
            count = hosts_request_benchmark(now=now)
            asked = set(Host.objects.filter(benchmark_requested_at=now).values_list("pk", flat=True))
            assert len(asked - asked_before) == count
            rounds.append(asked - asked_before)
    assert rounds[0] == {h.pk for h in never}
    assert rounds[1] == {h.pk for h in stale[1:]}  # 2 days and 3, 2 and 1 hours old: the oldest three
    assert rounds[2] == {stale[0].pk}
    assert rounds[3] == set()
    assert all(fresh.pk not in asked for asked in rounds)
    for host in [*never, *stale]:
        assert async_to_sync(layer.receive)(host.channel_name)["type"] == "agent.benchmark"


def test_a_random_re_benchmark_picks_each_fresh_host_at_the_configured_rate_and_every_host_in_time() -> None:
    # A sweep interval a quarter of the random mean: each fresh host is asked with probability 1/4 a sweep.
    hosts = [fr.host(channel_name=f"fresh.{n}", benchmark_at=timezone.now()) for n in range(200)]
    picked: dict[uuid.UUID, int] = {host.pk: 0 for host in hosts}
    sweeps = 60
    with override_settings(HEARTH_SWEEP_INTERVAL_S=1.0, HEARTH_REBENCHMARK_RANDOM_MEAN_S=4.0):
        for _ in range(sweeps):
            Host.objects.update(benchmark_requested_at=None)
            now = timezone.now()
            count = hosts_request_benchmark(now=now)
            asked = list(Host.objects.filter(benchmark_requested_at=now).values_list("pk", flat=True))
            assert len(asked) == count
            for pk in asked:
                picked[pk] += 1
    share = sum(picked.values()) / (sweeps * len(hosts))
    assert 0.2 < share < 0.3, share
    assert min(picked.values()) > 0  # a window from a random start reaches every id in time
