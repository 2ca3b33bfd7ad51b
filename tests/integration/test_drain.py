"""An owner drains a machine mid-job: leases go back, the other agent finishes, nothing is lost."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from marketplace.devstack import LocalStack

pytestmark = pytest.mark.integration


def _hosts(stack: LocalStack, owner: tuple[str, str]) -> dict[str, dict[str, Any]]:
    with stack.client(auth=owner) as http:
        return {h["name"]: h for h in http.get("/api/v1/hosts").json()}


def _wait(predicate: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_drained_machine_hands_back_its_work_and_takes_work_again_after_resume(stack: LocalStack) -> None:
    owner = stack.signup(email="drainer@example.com", role="host")
    agents = {
        name: stack.start_agent(
            name=name, home=stack.enroll_agent(name=name, token=stack.enrollment_token(owner=owner))
        )
        for name in ("owner-box", "spare-box")
    }
    stack.wait_hosts_ready(owner=owner, count=2)
    api_key = stack.buyer()
    inputs = [f"drain item {i}" for i in range(3000)]
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        job_id = http.post(
            "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": inputs, "task_size": 10}
        ).json()["id"]
    _wait(
        lambda: _hosts(stack, owner)["owner-box"]["tasks_in_flight"] > 0,
        timeout=60,
        what="owner-box never got work",
    )

    drain = subprocess.run(
        stack.agent_command("drain", "--home", str(agents["owner-box"].home), "--timeout", "10"),
        env=stack._agent_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert drain.returncode == 0, drain.stdout + drain.stderr
    _wait(
        lambda: _hosts(stack, owner)["owner-box"]["draining"], timeout=10, what="server never saw the drain"
    )
    _wait(
        lambda: _hosts(stack, owner)["owner-box"]["tasks_in_flight"] == 0,
        timeout=20,
        what="leases not handed back",
    )

    job = stack.wait_job(api_key=api_key, job_id=job_id, timeout=240)
    assert job["status"] == "succeeded", job
    assert job["items_done"] == len(inputs)
    assert _hosts(stack, owner)["owner-box"]["tasks_in_flight"] == 0
    assert "lease(s) handed back" in agents["owner-box"].log()

    resume = subprocess.run(
        stack.agent_command("drain", "--resume", "--home", str(agents["owner-box"].home)),
        env=stack._agent_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert resume.returncode == 0, resume.stdout + resume.stderr
    _wait(
        lambda: not _hosts(stack, owner)["owner-box"]["draining"],
        timeout=10,
        what="resume never reached the server",
    )
    agents["spare-box"].stop()
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        again = http.post(
            "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": ["back to work"]}
        ).json()["id"]
    assert stack.wait_job(api_key=api_key, job_id=again, timeout=60)["status"] == "succeeded"
    for agent in agents.values():
        agent.stop()
