"""Deliberately dishonest agents — real agent processes with a cheat mode only tests turn on — are
caught and handled; honest agents that differ legitimately (bf16, other thread counts) never are."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from marketplace.devstack import AgentProcess, LocalStack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cheats_owner(stack: LocalStack) -> tuple[str, str]:
    """The owner of the machines these tests start, so they stay out of the shared fleet owner's listings."""
    return stack.signup(email="cheats-owner@example.com", role="host")


SENTENCES = [f"The heat pump in house {i} ran for {i % 7 + 1} hours on solar power today." for i in range(48)]


def _host(stack: LocalStack, owner: tuple[str, str], name: str) -> dict[str, Any]:
    with stack.client(auth=owner) as http:
        return next(h for h in http.get("/api/v1/hosts").json() if h["name"] == name)


def _reliability(stack: LocalStack, owner: tuple[str, str], host_id: str) -> dict[str, Any]:
    with stack.client(auth=owner) as http:
        response = http.get(f"/api/v1/hosts/{host_id}/reliability")
        assert response.status_code == 200, response.text
        return dict(response.json())


def _wait(
    what: str,
    probe: Callable[[], dict[str, Any]],
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 120,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = probe()
        if done(seen):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last seen: {json.dumps(seen, default=str)[:3000]}")


def _start(
    stack: LocalStack, owner: tuple[str, str], name: str, env: dict[str, str], *args: str
) -> AgentProcess:
    home = stack.enroll_agent(name=name, token=stack.enrollment_token(owner=owner))
    return stack.start_agent(name=name, home=home, extra_args=args, env=env)


def _submit(stack: LocalStack, api_key: str, **fields: Any) -> str:
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        created = http.post("/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": SENTENCES, **fields})
        assert created.status_code == 201, created.text
        return str(created.json()["id"])


def _results(stack: LocalStack, api_key: str, job_id: str) -> np.ndarray:
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        response = http.get(f"/api/v1/jobs/{job_id}/results")
        assert response.status_code == 200, response.text
        return np.array(
            [json.loads(line)["embedding"] for line in response.text.splitlines()], dtype=np.float32
        )


def _min_cosine(got: np.ndarray, expected: np.ndarray) -> float:
    cosines = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    return float(cosines.min())


def test_cheaters_are_caught_by_known_answer_tasks_before_they_see_buyer_work(
    stack: LocalStack, owner: tuple[str, str], cheats_owner: tuple[str, str], fleet: list[Any]
) -> None:
    cheats = ["random", "constant", "cheaper", "copy"]
    agents = [_start(stack, cheats_owner, f"cheat-{kind}", {"HEARTH_AGENT_CHEAT": kind}) for kind in cheats]
    try:
        for kind in cheats:
            host = _host(stack, cheats_owner, f"cheat-{kind}")
            report = _wait(
                f"the {kind} cheater's quarantine",
                lambda host=host: _reliability(stack, cheats_owner, host["id"]),  # type: ignore[misc]
                lambda r: r["quarantined"],
                timeout=180,
            )
            assert report["verified"] is False, kind
            assert report["earnings_withheld"] is True
            assert {s["kind"] for s in report["strikes"]} == {"canary"}, report["strikes"]
            assert all("cosine" in s["evidence"] for s in report["strikes"])
            assert report["counts"]["canaries_failed"] >= 3
            # Each step down carries its reason.
            assert any("strike" in e["reason"] for e in report["events"])
            assert any("quarantined" in e["reason"] for e in report["events"])
        # The honest fleet is untouched.
        for name in ("alpha", "beta"):
            honest = _reliability(stack, owner, _host(stack, owner, name)["id"])
            assert honest["strikes"] == [] and honest["verified"] and not honest["quarantined"]
    finally:
        for agent in agents:
            agent.stop()


def test_a_sleeper_cheater_that_earned_trust_is_caught_and_the_buyer_of_a_redundant_job_gets_true_results(
    stack: LocalStack, cheats_owner: tuple[str, str], fleet: list[Any], minilm: Any
) -> None:
    # Honest for its first known-answer tasks (so it is verified), random vectors afterwards.
    sleeper = _start(
        stack, cheats_owner, "sleeper", {"HEARTH_AGENT_CHEAT": "random", "HEARTH_AGENT_CHEAT_AFTER": "2"}
    )
    try:
        host = _host(stack, cheats_owner, "sleeper")
        _wait(
            "the sleeper's verification",
            lambda: _reliability(stack, cheats_owner, host["id"]),
            lambda r: r["verified"],
        )
        api_key = stack.buyer()
        job_id = _submit(stack, api_key, task_size=4, verification="redundant", replicas=2)
        job = stack.wait_job(api_key=api_key, job_id=job_id, timeout=300)
        assert job["status"] == "succeeded", job
        got = _results(stack, api_key, job_id)
        assert _min_cosine(got, minilm.encode(SENTENCES, convert_to_numpy=True)) >= 0.999
        # Caught either way: outvoted in the job (its runs failed, a tie-break decided) or by a
        # known-answer task mixed into its work; each strike carries the evidence.
        report = _reliability(stack, cheats_owner, host["id"])
        assert report["strikes"], "the sleeper lied after verification and was never caught"
        assert {s["kind"] for s in report["strikes"]} <= {"mismatch", "canary"}
        assert all("cosine" in s["evidence"] for s in report["strikes"])
        if job["verification"]["runs_failed"]:
            assert job["verification"]["tie_breaks"] >= 1
            assert any(s["kind"] == "mismatch" for s in report["strikes"])
    finally:
        sleeper.stop()


def test_a_host_claiming_a_gpu_it_does_not_have_fails_its_hardware_check_and_gets_no_work(
    stack: LocalStack, cheats_owner: tuple[str, str], fleet: list[Any]
) -> None:
    agent = _start(
        stack, cheats_owner, "fake-4090", {"HEARTH_AGENT_CHEAT": "claim-gpu:NVIDIA GeForce RTX 4090"}
    )
    try:
        host = _host(stack, cheats_owner, "fake-4090")
        report = _wait(
            "the hardware verdict",
            lambda: _reliability(stack, cheats_owner, host["id"]),
            lambda r: r["hardware_ok"] is False,
        )
        assert "RTX 4090" in report["hardware_reason"] and "GFLOP/s" in report["hardware_reason"]
        assert [s["kind"] for s in report["strikes"]] == ["hardware"]
        assert report["verified"] is False
        assert report["counts"]["tasks_completed"] == 0
    finally:
        agent.stop()


def test_a_host_that_accepts_tasks_and_never_answers_loses_them_with_a_strike(
    stack: LocalStack, cheats_owner: tuple[str, str], fleet: list[Any]
) -> None:
    agent = _start(stack, cheats_owner, "silent", {"HEARTH_AGENT_CHEAT": "silent"})
    try:
        host = _host(stack, cheats_owner, "silent")
        report = _wait(
            "a no-answer strike",
            lambda: _reliability(stack, cheats_owner, host["id"]),
            lambda r: any(s["kind"] == "no_answer" for s in r["strikes"]),
            timeout=90,
        )
        strike = next(s for s in report["strikes"] if s["kind"] == "no_answer")
        assert "never answered" in strike["evidence"]
        assert report["counts"]["leases_expired"] >= 1 and report["verified"] is False
    finally:
        agent.stop()


def test_honest_agents_that_differ_in_precision_and_threads_agree_with_no_false_positives(
    stack: LocalStack, owner: tuple[str, str], cheats_owner: tuple[str, str], fleet: list[Any], minilm: Any
) -> None:
    bf16 = _start(stack, cheats_owner, "honest-bf16", {}, "--worker-dtype", "bfloat16")
    threads = _start(stack, cheats_owner, "honest-2-threads", {"HEARTH_WORKER_THREADS": "2"})
    try:
        stack.wait_hosts_ready(owner=cheats_owner, count=2, timeout=180)
        api_key = stack.buyer()
        job_id = _submit(stack, api_key, task_size=3, verification="redundant", replicas=3)
        job = stack.wait_job(api_key=api_key, job_id=job_id, timeout=300)
        assert job["status"] == "succeeded", job
        assert job["verification"]["runs_failed"] == 0
        assert job["verification"]["runs_passed"] == 3 * job["tasks"]["succeeded"]
        assert (
            _min_cosine(_results(stack, api_key, job_id), minilm.encode(SENTENCES, convert_to_numpy=True))
            >= 0.999
        )
        for who, name in [
            (owner, "alpha"),
            (owner, "beta"),
            (cheats_owner, "honest-bf16"),
            (cheats_owner, "honest-2-threads"),
        ]:
            report = _reliability(stack, who, _host(stack, who, name)["id"])
            assert report["strikes"] == [], (name, report["strikes"])
        # The bf16 agent really ran in bf16 and took part.
        bf16_report = _reliability(stack, cheats_owner, _host(stack, cheats_owner, "honest-bf16")["id"])
        assert bf16_report["counts"]["checks_passed"] + bf16_report["counts"]["canaries_passed"] >= 2
    finally:
        bf16.stop()
        threads.stop()
