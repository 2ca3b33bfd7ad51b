"""Escape attempts sent as real jobs: each is contained, fails only its own task, and the agent keeps serving."""

from __future__ import annotations

from typing import Any

import pytest

from marketplace.devstack import LocalStack

pytestmark = pytest.mark.integration


def test_a_contained_probe_fails_its_job_with_the_reason_and_the_agent_serves_the_next_job(
    tmp_path: Any, agent_cache: Any
) -> None:
    stack = LocalStack(
        workdir=tmp_path,
        settings_env={
            "HEARTH_HEARTBEAT_INTERVAL_S": "1",
            "HEARTH_OFFLINE_AFTER_BEATS": "3",
            "HEARTH_MAX_ATTEMPTS": "2",
        },
        agent_cache=agent_cache,
    ).start()
    try:
        owner = stack.signup(email="probe-owner@example.com", role="host")
        home = stack.enroll_agent(name="probed", token=stack.enrollment_token(owner=owner))
        # Test-only switch: inputs named __hearth_probe__:<name> run that escape probe in the worker.
        agent = stack.start_agent(name="probed", home=home, env={"HEARTH_AGENT_ALLOW_PROBES": "1"})
        stack.wait_hosts_ready(owner=owner, count=1)
        api_key = stack.buyer()
        headers = {"Authorization": f"Bearer {api_key}"}
        with stack.client(headers=headers) as http:
            probe_jobs = {
                probe: http.post(
                    "/api/v1/jobs",
                    json={
                        "model": "all-MiniLM-L6-v2",
                        "inputs": [f"__hearth_probe__:{probe}"],
                        "task_size": 1,
                    },
                ).json()["id"]
                # Each probe leaves a fresh worker (~5 s); tests/agent runs all nine in the sandbox.
                for probe in ("read_ssh_key", "ptrace_agent")
            }
        for probe, job_id in probe_jobs.items():
            job = stack.wait_job(api_key=api_key, job_id=job_id, timeout=180)
            assert job["status"] == "failed", (probe, job)
            assert f"sandbox contained probe {probe}" in job["failure_reason"], job["failure_reason"]
            assert job["task_attempts"] == 2

        assert agent.process.poll() is None, "a contained probe must not take the agent down"
        with stack.client(headers=headers) as http:
            normal = http.post(
                "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": ["an honest sentence"]}
            ).json()
        assert stack.wait_job(api_key=api_key, job_id=normal["id"], timeout=120)["status"] == "succeeded"
    finally:
        stack.stop()
