"""Escape probes run inside the real sandboxed worker as a workload would: each one is contained,
the supervisor survives it, and a fresh worker (with the model warm again) takes the next task."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hearth_agent.selftest import PROBE_ORDER, selftest_run
from hearth_agent.supervisor import (
    PROBE_TASK_PREFIX,
    EmbedResult,
    WorkerCrashed,
    WorkerError,
    WorkerSupervisor,
)

from .conftest import LoopThread, WarmWorker
from .test_sandbox import BWRAP_WORKS

needs_bwrap = pytest.mark.skipif(not BWRAP_WORKS, reason="bwrap does not work on this machine")


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A home with a planted private key, standing in for the owner's."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh" / "id_rsa"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n")
    key.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    yield home


@needs_bwrap
def test_the_selftest_command_contains_every_probe_prints_one_json_object_and_leaves_the_home_as_it_found_it(
    fake_home: Path,
) -> None:
    # One run of the real command (a whole selftest takes ~20 s here): what it prints, and the report.
    key = fake_home / ".ssh" / "id_rsa"
    before = key.read_bytes()
    env = {**os.environ, "HOME": str(fake_home)}
    completed = subprocess.run(
        [sys.executable, "-m", "hearth_agent", "selftest", "--json", "--home", str(fake_home / "agent")],
        capture_output=True,
        env=env,
        timeout=600,
        check=False,
    )
    lines = completed.stdout.decode().strip().splitlines()
    assert completed.returncode == 0, completed.stderr.decode()[-2000:]
    assert len(lines) == 1
    report = json.loads(lines[0])
    escaped = [p for p in report["probes"] if not p["contained"]]
    assert escaped == []
    assert report["probes_total"] == report["probes_contained"] == len(PROBE_ORDER)
    assert [p["name"] for p in report["probes"]] == list(PROBE_ORDER)
    assert {"netns:bwrap", "home-hidden:bwrap", "scratch-only:bwrap", "seccomp"} <= set(report["layers"])
    # The probe tried the real key (it exists here) and the planted secret; neither came back.
    read_probe = next(p for p in report["probes"] if p["name"] == "read_ssh_key")
    assert str(key) in read_probe["evidence"]
    # The containing limits, not the probes' own caps, stopped the heavy probes.
    evidence = {p["name"]: p["evidence"] for p in report["probes"]}
    assert "MemoryError" in evidence["memory_exhaustion"]
    assert "SIGXCPU" in evidence["cpu_spin"] or "wall-clock" in evidence["cpu_spin"]
    assert "EAGAIN" in evidence["fork_bomb"]
    assert key.read_bytes() == before
    assert "-----BEGIN" not in lines[0]
    assert sorted(p.name for p in fake_home.iterdir()) == [".ssh"], sorted(fake_home.iterdir())
    assert report["layers_after_restarts"] == report["layers"]  # fresh workers are as confined


def test_without_a_sandbox_the_probes_say_escaped(fake_home: Path) -> None:
    # The control: proves a probe can fail, so "contained" above means something.
    report = asyncio.run(selftest_run(sandbox="none", probes=["tcp_loopback", "read_ssh_key"]))
    assert [(p["name"], p["contained"]) for p in report["probes"]] == [
        ("tcp_loopback", False),
        ("read_ssh_key", False),
    ]
    assert "-----BEGIN" not in json.dumps(report)  # a digest came back, never the key


def _embed(worker: WarmWorker, inputs: list[str]) -> EmbedResult:
    return worker.loop.run(
        worker.supervisor.embed(model_dir=worker.model_dir, model_sha256=worker.model_sha, inputs=inputs)
    )


def _wait_running(supervisor: WorkerSupervisor, old_pid: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = supervisor.info
        if supervisor.running and info is not None and info.pid != old_pid and supervisor.warm_models:
            return
        time.sleep(0.2)
    raise AssertionError("no fresh warm worker came up")


@needs_bwrap
@pytest.mark.parametrize("probe", ["ptrace_agent", "memory_exhaustion"])
def test_a_probe_task_fails_only_itself_and_a_fresh_warm_worker_takes_the_next_task(
    minilm_worker: WarmWorker, probe: str
) -> None:
    supervisor = minilm_worker.supervisor
    _embed(minilm_worker, ["make the model warm"])
    assert supervisor.info is not None
    old_pid = supervisor.info.pid
    supervisor.allow_probes = True
    try:
        with pytest.raises(WorkerError) as failed:
            _embed(minilm_worker, [f"{PROBE_TASK_PREFIX}{probe}", "rest of the batch"])
    finally:
        supervisor.allow_probes = False
    assert failed.value.reason.startswith(f"sandbox contained probe {probe}: ")
    assert failed.value.retryable is False
    _wait_running(supervisor, old_pid)
    assert supervisor.info is not None and supervisor.info.pid != old_pid
    result = _embed(minilm_worker, ["after the probe"])
    assert result.count == 1
    # The replacement loaded the model before the task came: no load on the task's clock.
    assert result.load_ms == 0.0


def test_probe_inputs_are_plain_text_unless_the_test_switch_is_on(minilm_worker: WarmWorker) -> None:
    assert minilm_worker.supervisor.allow_probes is False
    result = _embed(minilm_worker, [f"{PROBE_TASK_PREFIX}fork_bomb"])
    assert result.count == 1


@needs_bwrap
def test_a_worker_past_the_wall_clock_is_killed_and_replaced(tmp_path: Path) -> None:
    loop = LoopThread()
    supervisor = WorkerSupervisor(cache_dir=tmp_path, sandbox="auto")
    try:
        first = loop.run(supervisor.start())
        started = time.monotonic()
        with pytest.raises(WorkerCrashed, match="wall-clock"):
            loop.run(supervisor.run_probe("cpu_spin", {"seconds": 60}, timeout_s=3.0, cpu_budget_s=600.0))
        assert time.monotonic() - started < 15
        second = loop.run(supervisor.start())
        assert second.pid != first.pid
        assert loop.run(supervisor.run_probe("dns", {})) is not None  # the new worker serves
    finally:
        loop.run(supervisor.stop())
        loop.close()


@needs_bwrap
def test_the_worker_s_fate_is_named_even_when_something_else_reaped_the_sandbox_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a stray waitpid elsewhere in the agent's process does to asyncio's child watcher: it can only
    # report 255. bwrap's status pipe still says how the worker inside ended.
    monkeypatch.setattr(asyncio.unix_events, "waitstatus_to_exitcode", lambda status: 255)
    loop = LoopThread()
    supervisor = WorkerSupervisor(cache_dir=tmp_path, sandbox="bwrap")
    try:
        loop.run(supervisor.start())
        with pytest.raises(WorkerCrashed, match=r"killed by SIGXCPU \(CPU time limit\)"):
            loop.run(supervisor.run_probe("cpu_spin", {"seconds": 60}, timeout_s=30.0, cpu_budget_s=1.0))
    finally:
        loop.run(supervisor.stop())
        loop.close()
