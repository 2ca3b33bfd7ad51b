"""The agent's identity on disk (0600, per-home) and the enroll command against a small HTTP server."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hearth_agent.cli import main
from hearth_agent.config import AgentConfig, cache_dir, config_dir, config_load, config_save

from .conftest import FileServer


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_it_saves_the_host_token_readable_only_by_its_owner(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = config_save(AgentConfig(server_url="http://x", host_id="h1", host_token="secret"), home=home)
    assert _mode(path) == 0o600
    assert _mode(home) == 0o700
    assert config_load(home=home).host_token == "secret"


def test_a_home_dir_holds_both_config_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEARTH_AGENT_CACHE", raising=False)
    assert config_dir(tmp_path) == tmp_path
    assert cache_dir(tmp_path) == tmp_path / "cache"
    monkeypatch.setenv("HEARTH_AGENT_CACHE", str(tmp_path / "shared"))
    assert cache_dir(tmp_path) == tmp_path / "shared"


def test_without_a_home_it_uses_the_xdg_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HEARTH_AGENT_HOME", "HEARTH_AGENT_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert config_dir() == tmp_path / "cfg" / "hearth-agent"
    assert cache_dir() == tmp_path / "cache" / "hearth-agent"


def test_enroll_saves_the_identity_the_server_returns(
    tmp_path: Path, file_server: FileServer, capsys: pytest.CaptureFixture[str]
) -> None:
    file_server.add_json("/api/v1/agents/enroll", {"host_id": "h-42", "host_token": "tok-42"}, status=201)
    code = main(
        [
            "enroll",
            "--server",
            file_server.url,
            "--token",
            "one-time",
            "--name",
            "box",
            "--home",
            str(tmp_path),
        ]
    )
    assert code == 0
    config = config_load(home=tmp_path)
    assert (config.host_id, config.host_token, config.name, config.server_url) == (
        "h-42",
        "tok-42",
        "box",
        file_server.url,
    )
    assert _mode(tmp_path / "config.json") == 0o600
    assert "enrolled as host h-42" in capsys.readouterr().out


def test_enroll_shows_why_the_server_refused_the_token(
    tmp_path: Path, file_server: FileServer, capsys: pytest.CaptureFixture[str]
) -> None:
    file_server.add_json("/api/v1/agents/enroll", {"token": ["This token was already used."]}, status=400)
    code = main(["enroll", "--server", file_server.url, "--token", "used", "--home", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "refused the enrollment token" in err and "already used" in err
    assert not (tmp_path / "config.json").exists()


def test_enroll_says_when_the_server_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["enroll", "--server", "http://127.0.0.1:9", "--token", "t", "--home", str(tmp_path)])
    assert code == 1
    assert "cannot reach the server" in capsys.readouterr().err


def test_run_without_enrollment_tells_the_owner_to_enroll(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--home", str(tmp_path)]) == 2
    assert "enroll first" in capsys.readouterr().err
