"""An idle agent keeps one connection: nothing on the server side times it out while it waits."""

from __future__ import annotations

import time
from typing import Any

import pytest

from marketplace.devstack import LocalStack

pytestmark = pytest.mark.integration


def test_an_idle_agent_keeps_its_connection_for_longer_than_socket_timeouts(
    stack: LocalStack, fleet: list[Any]
) -> None:
    before = [agent.log().count("connected to ws://") for agent in fleet]
    # Longer than redis-py 8's default 5 s socket timeout, twice over.
    time.sleep(12)
    assert [agent.log().count("connected to ws://") for agent in fleet] == before
    assert all("reconnecting in" not in agent.log() for agent in fleet)
