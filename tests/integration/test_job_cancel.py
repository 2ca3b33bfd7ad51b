"""Cancelling a running job stops its tasks on the agents, and the fleet goes on working."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from marketplace.devstack import LocalStack
from tests.integration.conftest import TEST_SETTINGS

pytestmark = pytest.mark.integration


def test_a_cancelled_job_stops_and_the_next_job_still_completes(stack: LocalStack, fleet: list[Any]) -> None:
    api_key = stack.buyer()
    inputs = [f"long job item {i}" for i in range(4000)]
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        big = http.post(
            "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": inputs, "task_size": 20}
        ).json()
        deadline = time.monotonic() + 60
        while http.get(f"/api/v1/jobs/{big['id']}").json()["items_done"] == 0:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)

        asked_at = datetime.now()
        cancelled = http.post(f"/api/v1/jobs/{big['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert cancelled["tasks"]["queued"] == cancelled["tasks"]["leased"] == 0
        assert 0 < cancelled["items_done"] < len(inputs)

        small = http.post(
            "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": ["after the cancel"]}
        ).json()
        done = stack.wait_job(api_key=api_key, job_id=small["id"], timeout=120)
        assert done["status"] == "succeeded"
        after = http.get(f"/api/v1/jobs/{big['id']}").json()
    assert after["status"] == "cancelled"
    assert after["items_done"] == cancelled["items_done"]
    assert all(agent.process.poll() is None for agent in fleet)
    # Leases held at the moment of cancel reached the agents as task.cancel frames; a batch that
    # finished in the meantime makes the agent log the cancel as one for a lease it no longer holds.
    cancel_lines = ("cancelled by the server (cancelled by the buyer)", "cancel for unknown lease")
    heard_at = [
        _logged_at(line)
        for agent in fleet
        for line in agent.log().splitlines()
        if any(text in line for text in cancel_lines) and _logged_at(line) >= asked_at
    ]
    assert heard_at, "no agent heard the cancel"
    # Pushed to each holder's own channel, not picked up at the next heartbeat: the agents hear of
    # it within one heartbeat interval of the server cancelling the job. Timed from the server's own
    # stamp of the cancel (`finished_at`, written in the cancel's transaction), not from this
    # process's clock before the POST: this process, with the whole suite loaded, stops for full
    # garbage collections of 0.25-0.35 s, and such a stop before the request went out was counted
    # as the cancel's journey.
    cancelled_at = _local(cancelled["finished_at"])
    assert asked_at <= cancelled_at
    heartbeat = timedelta(seconds=float(TEST_SETTINGS["HEARTH_HEARTBEAT_INTERVAL_S"]))
    assert min(heard_at) - cancelled_at <= heartbeat, (min(heard_at) - cancelled_at, cancelled_at - asked_at)


def _local(stamp: str) -> datetime:
    """An API timestamp (ISO 8601 with its offset) as the agent logs time: local, naive."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone().replace(tzinfo=None)


def _logged_at(line: str) -> datetime:
    """The agent logs `%(asctime)s …`: local time with milliseconds, like `datetime.now()`."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
