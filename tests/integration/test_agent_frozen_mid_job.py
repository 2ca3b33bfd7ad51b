"""An agent SIGSTOPped mid-job (no disconnect, its socket stays open): the sweep marks it offline and
requeues its lease within two heartbeat intervals, and another agent finishes the job."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marketplace.devstack import LocalStack
from tests.integration.conftest import FAST_TRUST

pytestmark = pytest.mark.integration

# The production offline rule (HEARTH_OFFLINE_AFTER_BEATS left at its default), on a stack of its
# own: the shared test stack relaxes it for its many busy agents.
HEARTBEAT_S = 2.0
SWEEP_S = 0.5
# Polling the API, the flush and a busy two-core machine.
SLACK_S = 1.0


@pytest.fixture
def own_stack(tmp_path: Path, agent_cache: Path) -> Iterator[LocalStack]:
    stack = LocalStack(
        workdir=tmp_path,
        agent_cache=agent_cache,
        settings_env={
            "HEARTH_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "HEARTH_SWEEP_INTERVAL_S": str(SWEEP_S),
            "HEARTH_LEASE_SECONDS": "60",
            "HEARTH_WORKER_THREADS": "1",
            **FAST_TRUST,
        },
    ).start()
    try:
        yield stack
    finally:
        stack.stop()


def test_a_frozen_agent_goes_offline_within_two_heartbeats_and_another_agent_finishes_its_job(
    own_stack: Any,
) -> None:
    stack: LocalStack = own_stack
    owner = stack.signup(email="frozen-test@example.com", role="host")
    frozen = stack.start_agent(
        name="frozen", home=stack.enroll_agent(name="frozen", token=stack.enrollment_token(owner=owner))
    )
    stack.wait_hosts_ready(owner=owner, count=1)

    sentences = [f"Item {i}: the battery reported {i * 7 % 100}% charge." for i in range(1280)]
    api_key = stack.buyer()
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        job_id = http.post(
            "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": sentences, "task_size": 32}
        ).json()["id"]
        # Freeze the agent while it holds a lease of this job (not a known-answer task, which is not
        # the job's). It is frozen first and looked at after, so the lease cannot be answered between
        # the look and the freeze; if it was, the agent thaws and the test waits for the next one.
        deadline = time.monotonic() + 60
        held = False
        while not held and time.monotonic() < deadline:
            if http.get(f"/api/v1/jobs/{job_id}").json()["tasks"]["leased"] > 0:
                os.killpg(frozen.process.pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
                time.sleep(0.3)  # frames already on the wire land
                held = http.get(f"/api/v1/jobs/{job_id}").json()["tasks"]["leased"] > 0
                if not held:
                    os.killpg(frozen.process.pid, signal.SIGCONT)
            time.sleep(0.02)
        assert held, "the agent never held a lease of the job"
        try:
            while time.monotonic() - stopped_at < 10:
                host = http.get("/api/v1/hosts", headers=stack.auth_headers(owner)).json()[0]
                if host["status"] == "offline":
                    break
                time.sleep(0.05)
            gone_after = time.monotonic() - stopped_at
            job = http.get(f"/api/v1/jobs/{job_id}").json()
        finally:
            frozen.kill()

    print(f"offline and requeued {gone_after:.2f} s after SIGSTOP")
    assert host["status"] == "offline" and host["tasks_in_flight"] == 0, host
    assert gone_after <= 2 * HEARTBEAT_S + SWEEP_S + SLACK_S, gone_after
    assert job["status"] != "succeeded", "the frozen agent finished the job before it was stopped"

    survivor = stack.start_agent(
        name="thawed-survivor",
        home=stack.enroll_agent(name="thawed-survivor", token=stack.enrollment_token(owner=owner)),
    )
    job = stack.wait_job(api_key=api_key, job_id=job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert job["task_attempts"] > job["tasks"]["succeeded"] == 40
    survivor.stop()
