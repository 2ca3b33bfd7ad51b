"""Where the agent keeps its identity (config.json, 0600) and its model cache, and how they are read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_FILENAME = "config.json"
POLICY_FILENAME = "energy-policy.json"
DEFAULT_SLOTS = 2


class ConfigError(Exception):
    """The config is missing or unreadable; the message tells the owner what to do."""


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server_url: str = Field(description="http(s) base URL of the Hearth server")
    host_id: str
    host_token: str = Field(repr=False)
    name: str = ""
    slots: int = Field(default=DEFAULT_SLOTS, ge=1, le=64)
    # Used only until the server's Welcome says otherwise.
    heartbeat_interval_s: float = Field(default=15.0, gt=0)
    # The home site the agent reads (`run --site` and $HEARTH_SITE override it). The two dicts
    # hold energy.simulator.SimulatorParams / energy.powerwall.PowerwallSettings fields, validated
    # when the agent starts (the energy package imports this module, not the other way round).
    site: Literal["none", "simulator", "powerwall"] = "none"
    site_simulator: dict[str, Any] = Field(default_factory=dict)
    powerwall: dict[str, Any] = Field(default_factory=dict, repr=False)
    # CPU energy estimate when there is no NVML: watts per busy core.
    watts_per_core: float = Field(default=15.0, gt=0)
    # The precision the worker's encoder runs in (`run --worker-dtype` and $HEARTH_WORKER_DTYPE
    # override it): bfloat16 is faster on CPUs that have it, its vectors differ slightly.
    worker_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def config_dir(home: Path | None = None) -> Path:
    """`--home` wins, then $HEARTH_AGENT_HOME, then the XDG per-user location."""
    if home is not None:
        return home
    if env_home := os.environ.get("HEARTH_AGENT_HOME"):
        return Path(env_home)
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "hearth-agent"


def cache_dir(home: Path | None = None) -> Path:
    """$HEARTH_AGENT_CACHE wins; an explicit home keeps its cache beside its config so
    several agents on one machine do not share (and race on) one cache."""
    if env_cache := os.environ.get("HEARTH_AGENT_CACHE"):
        return Path(env_cache)
    if home is None and (env_home := os.environ.get("HEARTH_AGENT_HOME")):
        home = Path(env_home)
    if home is not None:
        return home / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "hearth-agent"


def config_path(home: Path | None = None) -> Path:
    return config_dir(home) / CONFIG_FILENAME


def policy_path(home: Path | None = None) -> Path:
    """The owner's newest energy policy, as the server last pushed it."""
    return config_dir(home) / POLICY_FILENAME


def ensure_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask and ignored for existing dirs.
    os.chmod(path, 0o700)


def write_private_file(target: Path, text: str) -> None:
    """Write atomically, 0600 from the first byte (mkstemp opens with 0o600)."""
    ensure_private_dir(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=target.suffix, dir=target.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def config_save(config: AgentConfig, *, home: Path | None = None) -> Path:
    """The host token is a long-lived secret: the file is private from the first byte."""
    target = config_dir(home) / CONFIG_FILENAME
    write_private_file(target, config.model_dump_json(indent=2))
    return target


def config_load(*, home: Path | None = None) -> AgentConfig:
    path = config_path(home)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"no agent config at {path}; enroll first: hearth-agent enroll --server URL --token TOKEN"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        return AgentConfig.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"{path} is not a valid agent config: {exc}") from exc
