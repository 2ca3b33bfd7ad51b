"""Reconnect pacing: capped exponential backoff with full jitter, and the websocket URL."""

from __future__ import annotations

import random

import pytest

from hearth_agent.connection import BACKOFF_BASE_S, BACKOFF_CAP_S, Backoff, ws_url


def test_full_jitter_stays_between_zero_and_the_growing_ceiling() -> None:
    backoff = Backoff(rng=random.Random(7).random)
    for attempt in range(40):
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
        delay = backoff.next_delay()
        assert 0 <= delay <= ceiling


def test_the_extremes_of_the_jitter_are_zero_and_the_ceiling() -> None:
    high = Backoff(rng=lambda: 1.0)
    assert [high.next_delay() for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    low = Backoff(rng=lambda: 0.0)
    assert {low.next_delay() for _ in range(5)} == {0.0}


def test_jitter_spreads_a_fleet_of_agents() -> None:
    rng = random.Random(1)
    delays = []
    for _ in range(200):
        backoff = Backoff(rng=rng.random)
        backoff.attempt = 10
        delays.append(backoff.next_delay())
    assert min(delays) < 3 and max(delays) > 27


def test_reset_starts_over_after_a_stable_connection() -> None:
    backoff = Backoff(rng=lambda: 1.0)
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == BACKOFF_BASE_S


def test_a_huge_attempt_count_does_not_overflow() -> None:
    backoff = Backoff(rng=lambda: 1.0)
    backoff.attempt = 10_000
    assert backoff.next_delay() == BACKOFF_CAP_S


@pytest.mark.parametrize(
    ("server", "url"),
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws/agent/"),
        ("https://hearth.example/", "wss://hearth.example/ws/agent/"),
    ],
)
def test_the_websocket_url_follows_the_server_scheme(server: str, url: str) -> None:
    assert ws_url(server) == url
