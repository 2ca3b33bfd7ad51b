"""`hearth-agent uninstall` removes the agent's own files (config, state, cache, unit, the installer's
venv) after confirmation, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from hearth_agent import owner_cli
from hearth_agent.cli import main
from hearth_agent.config import AgentConfig, config_save


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for name in ("HEARTH_AGENT_HOME", "HEARTH_AGENT_CACHE", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    venv = home / ".local" / "share" / "hearth-agent" / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin" / "hearth-agent").write_text("#!/bin/sh\n")
    monkeypatch.setenv("HEARTH_AGENT_VENV", str(venv))
    config = config_save(AgentConfig(server_url="http://s", host_id="h", host_token="t"))
    (config.parent / "state.json").write_text("{}")
    (config.parent / "owner-notes.txt").write_text("mine")
    cache = home / ".cache" / "hearth-agent"
    (cache / "models" / ("a" * 64)).mkdir(parents=True)
    unit = home / ".config" / "systemd" / "user" / "hearth-agent.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    neighbour = home / ".local" / "share" / "other-app"
    neighbour.mkdir(parents=True)
    monkeypatch.setattr(owner_cli, "_systemd_user", lambda: False)
    return {"venv": venv, "config": config, "cache": cache, "unit": unit, "neighbour": neighbour}


def test_it_removes_only_what_the_agent_made(
    installed: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["uninstall", "--yes"]) == 0
    assert not installed["venv"].exists() and not installed["config"].exists()
    assert not installed["cache"].exists() and not installed["unit"].exists()
    assert not (installed["config"].parent / "state.json").exists()
    assert (installed["config"].parent / "owner-notes.txt").read_text() == "mine"
    assert installed["neighbour"].is_dir()
    assert "revoke it on the host dashboard" in capsys.readouterr().out


def test_it_asks_first_and_removes_nothing_without_a_yes(
    installed: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["uninstall"]) == owner_cli.EXIT_DECLINED
    assert all(path.exists() for path in installed.values())
