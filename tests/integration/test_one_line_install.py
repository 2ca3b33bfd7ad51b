"""`curl -fsSL <server>/install.sh | sh -s -- <token>` against a real server: it keeps the torch already
in the target venv, installs the agent wheel the server built, enrolls, says how to start the agent
where there is no systemd user session, and the agent it installed comes online."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from marketplace.devstack import LocalStack

# Installing the agent (venv, torch kept, pip, enrollment) is the same on any server database; the
# server side of a session is covered on PostgreSQL + Redis by every other integration test.
pytestmark = [pytest.mark.integration, pytest.mark.once]

# The only torch this machine may install: a local CPU wheel. Anything else pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"


def _clean_env(home: Path, venv: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        # No repo checkout on the path (the installed wheel must stand alone), no user bus (no systemd).
        if k not in {"PYTHONPATH", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "VIRTUAL_ENV"}
        and not k.startswith(("XDG_", "HEARTH_"))
    }
    env.update(
        HOME=str(home),
        HEARTH_AGENT_VENV=str(venv),
        HEARTH_AGENT_NAME="installed-box",
        HEARTH_WORKER_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def test_the_one_line_installer_keeps_torch_enrolls_and_the_agent_comes_online(
    stack: LocalStack, tmp_path: Path
) -> None:
    started = time.monotonic()
    owner = stack.signup(email=f"installer-{uuid.uuid4().hex[:8]}@example.com", role="host")
    token = stack.enrollment_token(owner=owner)
    home, venv = tmp_path / "home", tmp_path / "venv"
    home.mkdir()
    env = _clean_env(home, venv)

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", TORCH],
        check=True,
        timeout=600,
        env=env,
    )
    torch_before = (venv / "bin" / "python").resolve()
    prepared = time.monotonic()

    installed = subprocess.run(
        ["sh", "-c", f"curl -fsSL {stack.url}/install.sh | sh -s -- {token}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = installed.stdout + installed.stderr
    assert installed.returncode == 0, out
    installed_at = time.monotonic()
    assert "keeping torch 2.13.0" in out, out
    assert f"start the agent with:\nhearth:   {venv}/bin/hearth-agent run" in out, out
    torch_after = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    assert torch_after.startswith("2.13.0"), torch_after
    assert (venv / "bin" / "python").resolve() == torch_before
    config = home / ".config" / "hearth-agent" / "config.json"
    assert config.stat().st_mode & 0o777 == 0o600

    with httpx.Client(base_url=stack.url, auth=owner, timeout=30) as http:
        hosts = http.get("/api/v1/hosts").json()
    assert [h["name"] for h in hosts] == ["installed-box"], hosts

    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [str(venv / "bin" / "hearth-agent"), "run"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            ready = stack.wait_hosts_ready(owner=owner, count=1, timeout=180)
        except TimeoutError:
            pytest.fail((tmp_path / "agent.log").read_text(errors="replace")[-4000:])
        assert ready[0]["name"] == "installed-box"
        status = subprocess.run(
            [str(venv / "bin" / "hearth-agent"), "status"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert status.returncode == 0 and "connected" in status.stdout, status.stdout + status.stderr
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=30)
    print(
        f"\nwall time: venv+torch {prepared - started:.1f} s, install.sh {installed_at - prepared:.1f} s, "
        f"total {time.monotonic() - started:.1f} s"
    )
