"""A server that crashes and comes back: agents reconnect by themselves and no task is lost."""

from __future__ import annotations

import time
from typing import Any

import pytest

from marketplace.devstack import LocalStack

pytestmark = pytest.mark.integration


def test_agents_reconnect_after_a_server_crash_and_finish_the_job(tmp_path: Any, agent_cache: Any) -> None:
    stack = LocalStack(
        workdir=tmp_path,
        agent_cache=agent_cache,
        settings_env={
            "HEARTH_HEARTBEAT_INTERVAL_S": "1",
            "HEARTH_OFFLINE_AFTER_BEATS": "3",
            "HEARTH_SWEEP_INTERVAL_S": "0.5",
            "HEARTH_WORKER_THREADS": "1",
        },
    ).start()
    try:
        owner = stack.signup(email="restart@example.com", role="host")
        agent = stack.start_agent(
            name="steady", home=stack.enroll_agent(name="steady", token=stack.enrollment_token(owner=owner))
        )
        stack.wait_hosts_ready(owner=owner, count=1)
        api_key = stack.buyer()
        inputs = [f"restart item {i}" for i in range(1000)]
        with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
            job_id = http.post(
                "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": inputs, "task_size": 10}
            ).json()["id"]
            deadline = time.monotonic() + 60
            while http.get(f"/api/v1/jobs/{job_id}").json()["items_done"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)

        stack.crash_and_restart_server()

        job = stack.wait_job(api_key=api_key, job_id=job_id, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["items_done"] == len(inputs)
        assert agent.process.poll() is None, "the agent should have reconnected, not exited"
        # Whatever was in flight at the crash was finished after the reconnect or leased again; only
        # those few tasks (at most the agent's slots, here 1 or 2) can have run twice.
        assert job["tasks"]["succeeded"] <= job["task_attempts"] <= job["tasks"]["succeeded"] + 4
        log = agent.log()
        assert log.count("connected to ws://") >= 2
        assert "reconnecting in" in log
    finally:
        stack.stop()
