"""An agent SIGKILLed mid-job: the job completes on the other agent, every item exactly once."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from marketplace.devstack import LocalStack

pytestmark = pytest.mark.integration


def _buyer_leases(host: dict[str, Any]) -> int:
    return int(host["tasks_in_flight"]) - int(host["canaries_in_flight"])


def test_the_job_completes_on_the_other_agent_when_one_is_killed(stack: LocalStack, minilm: Any) -> None:
    owner = stack.signup(email="killer-test@example.com", role="host")
    victim = stack.start_agent(
        name="victim", home=stack.enroll_agent(name="victim", token=stack.enrollment_token(owner=owner))
    )
    survivor = stack.start_agent(
        name="survivor", home=stack.enroll_agent(name="survivor", token=stack.enrollment_token(owner=owner))
    )
    stack.wait_hosts_ready(owner=owner, count=2)

    sentences = [f"Item {i}: the Powerwall reported {i * 7 % 100}% charge." for i in range(1280)]
    api_key = stack.buyer()
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        job_id = http.post(
            "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": sentences, "task_size": 32}
        ).json()["id"]
        # Kill the victim while it holds a buyer's lease (not a known-answer check, which is no
        # job's), once some work is done. It is frozen first, so the lease the server shows cannot
        # be answered between our look and the kill.
        deadline = time.monotonic() + 120
        held = False
        while not held and time.monotonic() < deadline:
            job = http.get(f"/api/v1/jobs/{job_id}").json()
            hosts = {
                h["name"]: h for h in http.get("/api/v1/hosts", headers=stack.auth_headers(owner)).json()
            }
            if job["items_done"] > 0 and _buyer_leases(hosts["victim"]) > 0:
                os.killpg(victim.process.pid, signal.SIGSTOP)
                time.sleep(0.3)  # frames already on the wire land
                hosts = {
                    h["name"]: h for h in http.get("/api/v1/hosts", headers=stack.auth_headers(owner)).json()
                }
                held = _buyer_leases(hosts["victim"]) > 0
                if not held:
                    os.killpg(victim.process.pid, signal.SIGCONT)
            time.sleep(0.05)
        assert hosts["victim"]["status"] == "online"
        assert held, "the victim never held a lease"
        victim.kill()

    job = stack.wait_job(api_key=api_key, job_id=job_id, timeout=300)
    assert job["status"] == "succeeded", job
    assert survivor.process.poll() is None
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        rows = [json.loads(line) for line in http.get(f"/api/v1/jobs/{job_id}/results").text.splitlines()]
        hosts = {h["name"]: h for h in http.get("/api/v1/hosts", headers=stack.auth_headers(owner)).json()}
    assert [row["index"] for row in rows] == list(range(len(sentences)))
    assert hosts["victim"]["status"] == "offline"
    assert hosts["victim"]["tasks_in_flight"] == 0
    # The victim's leases were run again elsewhere: more leases than tasks.
    assert job["task_attempts"] > job["tasks"]["succeeded"] == len(sentences) // 32
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    expected = minilm.encode(sentences, convert_to_numpy=True)
    assert float((got * expected).sum(axis=1).min()) >= 0.9999
    survivor.stop()
