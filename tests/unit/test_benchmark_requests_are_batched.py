"""The sweep asks a whole fleet to benchmark in a fixed number of queries, not one UPDATE per host."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
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
