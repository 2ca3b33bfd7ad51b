"""How the worker is isolated: which sandbox works on this machine (bwrap, else `unshare -rn`, else
none), the command prefix that applies it, and the probe that verifies what the worker really got."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

SandboxKind = Literal["bwrap", "unshare", "none"]
SANDBOX_MODES = ("auto", "bwrap", "unshare", "none")
_TMP = Path("/tmp")


@dataclass(frozen=True)
class SandboxPlan:
    kind: SandboxKind
    prefix: tuple[str, ...]
    # Layers this kind is meant to give; only the ones the probe confirms are reported.
    claims: tuple[str, ...] = field(default=())


def _minimal_roots(paths: Iterable[Path]) -> list[Path]:
    """Drop paths nested inside another one: binding the parent already exposes them."""
    unique = sorted({p for p in paths})
    roots: list[Path] = []
    for path in unique:
        if not any(path.is_relative_to(root) for root in roots):
            roots.append(path)
    return roots


def python_paths() -> list[Path]:
    """Everything the worker's interpreter must be able to read: the venv, the stdlib, sys.path and
    this package (a source checkout may not be on sys.path as an installed dist)."""
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(os.path.abspath(sys.executable)),
        str(Path(__file__).resolve().parent.parent),
        *sys.path,
    ]
    return [Path(os.path.abspath(p)) for p in candidates if p and os.path.exists(p)]


def bwrap_plan(*, readable: Sequence[Path], hidden: Sequence[Path] = ()) -> SandboxPlan:
    """Read-only root, fresh /tmp, no network. /tmp is a tmpfs, so anything the worker must read
    that lives under /tmp (a venv, a test's cache dir) is bound back read-only."""
    args = [
        "bwrap",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        "--new-session",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
    ]  # fmt: skip
    # The host token lives in the config dir; the worker has no business reading it.
    for path in hidden:
        if path.is_dir():
            args += ["--tmpfs", str(path)]
    hidden_or_tmp = [_TMP, *hidden]
    # Strictly inside only: re-binding /tmp itself (sys.path may hold a script's dir) would undo the tmpfs.
    rebind = [p for p in readable if any(p.is_relative_to(h) and p != h for h in hidden_or_tmp)]
    for path in _minimal_roots(rebind):
        args += ["--ro-bind", str(path), str(path)]
    # GPUs are device nodes; the minimal /dev above would hide them.
    for node in sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/dri")):
        args += ["--dev-bind", node, node]
    args += ["--chdir", "/"]
    return SandboxPlan(kind="bwrap", prefix=tuple(args), claims=("netns:bwrap", "ro-root:bwrap", "tmpfs-tmp"))


def unshare_plan() -> SandboxPlan:
    return SandboxPlan(
        kind="unshare", prefix=("unshare", "--map-root-user", "--net"), claims=("netns:unshare",)
    )


def no_sandbox_plan() -> SandboxPlan:
    return SandboxPlan(kind="none", prefix=(), claims=())


def sandbox_works(plan: SandboxPlan, *, env: Mapping[str, str], timeout_s: float = 30.0) -> bool:
    """Try the sandbox with the worker's own interpreter and package: existing binaries prove nothing
    (user namespaces may be disabled, /tmp re-binds may be missing)."""
    if plan.prefix and shutil.which(plan.prefix[0]) is None:
        return False
    command = [*plan.prefix, sys.executable, "-c", "import hearth_agent.worker"]
    try:
        completed = subprocess.run(
            command, env=dict(env), cwd="/", capture_output=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("sandbox %s does not work here: %s", plan.kind, exc)
        return False
    if completed.returncode != 0:
        log.info(
            "sandbox %s does not work here (exit %d): %s",
            plan.kind,
            completed.returncode,
            completed.stderr.decode(errors="replace").strip()[-500:],
        )
        return False
    return True


def sandbox_choose(
    mode: str, *, env: Mapping[str, str], readable: Sequence[Path], hidden: Sequence[Path] = ()
) -> SandboxPlan:
    """`auto` takes the strongest sandbox that works; a named mode must work or it is an error."""
    if mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}, got {mode!r}")
    plans = {
        "bwrap": bwrap_plan(readable=readable, hidden=hidden),
        "unshare": unshare_plan(),
        "none": no_sandbox_plan(),
    }
    if mode != "auto":
        plan = plans[mode]
        if not sandbox_works(plan, env=env):
            raise RuntimeError(f"sandbox {mode!r} was requested but does not work on this machine")
        return plan
    for kind in ("bwrap", "unshare"):
        if sandbox_works(plans[kind], env=env):
            return plans[kind]
    log.warning("no sandbox works on this machine: the worker runs with network access")
    return plans["none"]


class IsolationProbe:
    """The outside half of the isolation check: a loopback listener the worker must NOT reach, a
    marker in /tmp it must NOT see, and a path it must NOT be able to create."""

    def __init__(self, *, ro_probe_dir: Path) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._listener.setblocking(False)
        nonce = secrets.token_hex(8)
        self.marker = _TMP / f"hearth-probe-{nonce}"
        fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        self.ro_path = ro_probe_dir / f".hearth-ro-probe-{nonce}"

    def env(self) -> dict[str, str]:
        host, port = self._listener.getsockname()
        return {
            "HEARTH_PROBE_ADDR": f"{host}:{port}",
            "HEARTH_PROBE_TMP_MARKER": str(self.marker),
            "HEARTH_PROBE_RO_PATH": str(self.ro_path),
        }

    def _listener_was_reached(self) -> bool:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return False
        conn.close()
        return True

    def verdict(self, plan: SandboxPlan, report: Mapping[str, Any]) -> list[str]:
        """The claimed layers that both the worker's report and the outside evidence confirm."""
        # Trust the listener over the worker: a connection that arrived is proof of network access.
        reached = self._listener_was_reached() or report.get("net_reachable") is not False
        confirmed: list[str] = []
        for layer in plan.claims:
            if layer.startswith("netns:"):
                ok = not reached
            elif layer.startswith("ro-root:"):
                ok = report.get("ro_writable") is False and not self.ro_path.exists()
            elif layer == "tmpfs-tmp":
                ok = report.get("tmp_marker_visible") is False
            else:
                ok = False
            if ok:
                confirmed.append(layer)
            else:
                log.warning("sandbox layer %s was expected but the probe did not confirm it", layer)
        return confirmed

    def close(self) -> None:
        self._listener.close()
        with contextlib.suppress(OSError):
            self.marker.unlink()
        with contextlib.suppress(OSError):
            self.ro_path.unlink()
