"""How the worker is isolated: which sandbox works on this machine (bwrap, else `unshare -rn`, else
none), the command prefix that applies it, and the probe that verifies what the worker really got."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
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
_RUN = Path("/run")
SCRATCH_MB = 512


@dataclass(frozen=True)
class SandboxPlan:
    kind: SandboxKind
    prefix: tuple[str, ...]
    # Layers this kind is meant to give; only the ones the probe confirms are reported.
    claims: tuple[str, ...] = field(default=())
    # The worker's only writable directory inside the sandbox, or None: the supervisor makes one.
    scratch: str | None = None


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


def hidden_homes() -> list[Path]:
    """Where the owner's files live: every home, root's, and the invoking user's (which may be
    elsewhere, e.g. /srv/alice or a test's temporary $HOME)."""
    homes = [Path("/home"), Path("/root")]
    for candidate in (os.environ.get("HOME"), _passwd_home()):
        if candidate and os.path.isabs(candidate) and Path(candidate) != Path("/"):
            homes.append(Path(candidate))
    return homes


def _passwd_home() -> str | None:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return None


def bwrap_plan(
    *,
    readable: Sequence[Path],
    hidden: Sequence[Path] = (),
    scratch_mb: int = SCRATCH_MB,
) -> SandboxPlan:
    """Read-only root, no network, own pid namespace, no capabilities; homes, /run (sockets of
    docker, postgres, the session bus) and the agent's config dir are empty read-only tmpfs; the only
    writable place is a private, size-capped /tmp (the worker's HOME and TMPDIR). What the worker
    must read that lives under a hidden path (a venv in a home, the model cache) is bound back
    read-only."""
    args = [
        "bwrap",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-pid",
        "--die-with-parent",
        "--new-session",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--size", str(scratch_mb * 1024 * 1024), "--tmpfs", "/tmp",
        "--size", str(16 * 1024 * 1024), "--tmpfs", "/dev/shm",
    ]  # fmt: skip
    if os.geteuid() == 0:
        # Unprivileged bwrap drops every capability by itself; as root it keeps them unless told.
        args += ["--cap-drop", "ALL"]
    wanted = [p.resolve() for p in [*hidden_homes(), _RUN, *hidden] if p.is_dir()]
    masked = [p for p in _minimal_roots(wanted) if not p.is_relative_to(_TMP)]
    for path in masked:
        args += ["--tmpfs", str(path)]
    hidden_or_tmp = [_TMP, *masked]
    # Strictly inside only: re-binding /tmp itself (sys.path may hold a script's dir) would undo the tmpfs.
    rebind = [p for p in readable if any(p.is_relative_to(h) and p != h for h in hidden_or_tmp)]
    for path in _minimal_roots(rebind):
        args += ["--ro-bind", str(path), str(path)]
    for path in masked:
        args += ["--remount-ro", str(path)]
    # GPUs are device nodes; the minimal /dev above would hide them.
    for node in sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/dri")):
        args += ["--dev-bind", node, node]
    args += ["--chdir", "/"]
    return SandboxPlan(
        kind="bwrap",
        prefix=tuple(args),
        claims=(
            "netns:bwrap",
            "pidns:bwrap",
            "ro-root:bwrap",
            "tmpfs-tmp",
            "home-hidden:bwrap",
            "scratch-only:bwrap",
            "no-caps:bwrap",
        ),
        scratch="/tmp",
    )


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


@dataclass(frozen=True)
class WorkerLimits:
    """Hard limits for the worker (None = not set). The CPU limit is a lifetime budget: the
    supervisor replaces a worker that has used most of it, and each request gets its own soft budget."""

    memory_mb: int | None = 4096
    cpu_s: int | None = 24 * 3600
    nproc: int | None = None  # default: scaled with the core count (torch runs a thread per core)
    fsize_mb: int | None = 256
    nofile: int | None = 1024
    pids: int | None = None  # cgroup pids.max, where this agent may create cgroups; default = nproc

    def effective_nproc(self) -> int:
        return self.nproc or max(128, 4 * (os.cpu_count() or 1) + 64)

    def rlimits(self) -> dict[str, int]:
        """The worker's `confine_self` input, in bytes/seconds/counts; core dumps always off."""
        values = {
            "as": self.memory_mb * 1024 * 1024 if self.memory_mb else None,
            "cpu": self.cpu_s,
            "nproc": self.effective_nproc(),
            "fsize": self.fsize_mb * 1024 * 1024 if self.fsize_mb else None,
            "nofile": self.nofile,
            "core": 0,
        }
        return {name: value for name, value in values.items() if value is not None}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerLimits:
        """HEARTH_WORKER_MEMORY_MB, _CPU_S, _NPROC, _FSIZE_MB, _NOFILE, _PIDS; 0 turns one off. The
        memory limit is address space (RLIMIT_AS), which CUDA's huge reservations break: it is off
        by default when the machine has NVIDIA devices."""

        def read(name: str, default: int | None) -> int | None:
            raw = env.get(f"HEARTH_WORKER_{name}")
            if raw is None or raw == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"HEARTH_WORKER_{name} must be an integer, got {raw!r}") from None
            if value < 0:
                raise ValueError(f"HEARTH_WORKER_{name} must be >= 0, got {value}")
            return value or None

        base = cls()
        memory_default = None if glob.glob("/dev/nvidia[0-9]*") else base.memory_mb
        return cls(
            memory_mb=read("MEMORY_MB", memory_default),
            cpu_s=read("CPU_S", base.cpu_s),
            nproc=read("NPROC", None),
            fsize_mb=read("FSIZE_MB", base.fsize_mb),
            nofile=read("NOFILE", base.nofile),
            pids=read("PIDS", None),
        )


class PidsCgroup:
    """A pids cgroup for one worker: the fork-bomb guard that also works when the worker's uid is 0,
    for which the kernel ignores RLIMIT_NPROC. Needs a writable cgroup (v1 pids hierarchy, or a v2
    group whose subtree delegates pids); otherwise this layer is simply not there."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit

    @classmethod
    def create(cls, name: str, limit: int) -> PidsCgroup | None:
        for parent in _pids_cgroup_parents():
            _sweep_stale(parent)
            path = parent / name
            try:
                path.mkdir()
                (path / "pids.max").write_text(f"{limit}\n")
            except OSError as exc:
                log.debug("no pids cgroup under %s: %s", parent, exc)
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            return cls(path, limit)
        return None

    def prefix(self) -> tuple[str, ...]:
        """A shell that joins the cgroup and execs the sandbox, so no process escapes the group."""
        script = 'echo $$ > "$1" && shift && exec "$@"'
        return ("sh", "-c", script, "hearth-cgroup", str(self.path / "cgroup.procs"))

    def holds(self, pid: int) -> bool:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            current = (self.path / "pids.max").read_text().strip()
        except OSError:
            return False
        relative = "/" + self.path.name
        return current == str(self.limit) and any(line.rstrip().endswith(relative) for line in lines)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _sweep_stale(parent: Path) -> None:
    """Remove empty worker cgroups left by agents that are gone (named hearth-worker-<agent pid>-…)."""
    with contextlib.suppress(OSError):
        for path in parent.glob("hearth-worker-*"):
            agent_pid = path.name.split("-")[2]
            if agent_pid.isdigit() and not Path(f"/proc/{agent_pid}").exists():
                with contextlib.suppress(OSError):
                    path.rmdir()


def _pids_cgroup_parents() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    parents: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return parents
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if "pids" in controllers.split(",") and (root / "pids").is_dir():
            parents.append(root / "pids" / relative.lstrip("/"))
        elif controllers == "" and (root / "cgroup.controllers").exists():
            own = root / relative.lstrip("/")
            with contextlib.suppress(OSError):
                if "pids" in (own / "cgroup.subtree_control").read_text().split():
                    parents.append(own)
    return parents


@dataclass(frozen=True)
class ProcessView:
    """The worker as the host kernel sees it, read from /proc outside the sandbox."""

    pid: int
    uid: int
    cap_eff: int
    seccomp_mode: int
    hard_limits: dict[str, int | None]

    @classmethod
    def find(cls, root_pid: int, inner_pid: int) -> ProcessView | None:
        """The descendant of `root_pid` (bwrap, unshare or the worker itself) whose pid in its own
        namespace is `inner_pid`."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            status = _status(int(entry))
            if status and "PPid" in status:
                children.setdefault(int(status["PPid"].split()[0]), []).append(int(entry))
        queue = [root_pid]
        while queue:
            pid = queue.pop(0)
            status = _status(pid)
            if status and status.get("NSpid", "").split()[-1:] == [str(inner_pid)]:
                return cls._read(pid, status)
            queue.extend(children.get(pid, []))
        return None

    @classmethod
    def _read(cls, pid: int, status: dict[str, str]) -> ProcessView | None:
        try:
            limits_text = Path(f"/proc/{pid}/limits").read_text()
        except OSError:
            return None
        rows = {
            "as": "Max address space",
            "cpu": "Max cpu time",
            "nproc": "Max processes",
            "fsize": "Max file size",
            "nofile": "Max open files",
            "core": "Max core file size",
        }
        hard: dict[str, int | None] = {}
        for line in limits_text.splitlines():
            for name, label in rows.items():
                if line.startswith(label):
                    value = line[len(label) :].split()[1]
                    hard[name] = None if value == "unlimited" else int(value)
        return cls(
            pid=pid,
            uid=int(status.get("Uid", "0").split()[0]),
            cap_eff=int(status.get("CapEff", "0"), 16),
            seccomp_mode=int(status.get("Seccomp", "0")),
            hard_limits=hard,
        )


def _status(pid: int) -> dict[str, str] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


class IsolationProbe:
    """The outside half of the isolation check at every worker start: a loopback listener the worker
    must NOT reach, a marker in /tmp and one in the owner's home it must NOT see, and paths outside
    its scratch dir it must NOT be able to create. The worker's own answers count only where the
    host side agrees."""

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
        self.home_marker: Path | None = None
        home = Path(os.environ.get("HOME") or _passwd_home() or "/nonexistent")
        candidate = home / f".hearth-probe-{nonce}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self.home_marker = candidate
        except OSError as exc:
            log.info("cannot plant a marker in %s (%s): home hiding will not be confirmed", home, exc)
        # Places a workload must not be able to create files in; the cache dir is one of them.
        self.write_paths = [
            self.ro_path,
            Path("/etc") / f".hearth-probe-{nonce}",
            Path("/usr") / f".hearth-probe-{nonce}",
            Path("/var/tmp") / f".hearth-probe-{nonce}",
            home / f".hearth-probe-w-{nonce}",
        ]

    def env(self) -> dict[str, str]:
        host, port = self._listener.getsockname()
        env = {
            "HEARTH_PROBE_ADDR": f"{host}:{port}",
            "HEARTH_PROBE_TMP_MARKER": str(self.marker),
            "HEARTH_PROBE_RO_PATH": str(self.ro_path),
            "HEARTH_PROBE_WRITE_PATHS": os.pathsep.join(str(p) for p in self.write_paths),
            "HEARTH_PROBE_AGENT_PID": str(os.getpid()),
        }
        if self.home_marker is not None:
            env["HEARTH_PROBE_HOME_MARKER"] = str(self.home_marker)
        return env

    def _listener_was_reached(self) -> bool:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return False
        conn.close()
        return True

    def verdict(
        self, plan: SandboxPlan, report: Mapping[str, Any], view: ProcessView | None = None
    ) -> list[str]:
        """The claimed layers that both the worker's report and the outside evidence confirm."""
        # Trust the listener over the worker: a connection that arrived is proof of network access.
        reached = self._listener_was_reached() or report.get("net_reachable") is not False
        leaked = [p for p in self.write_paths if p.exists()]
        confirmed: list[str] = []
        for layer in plan.claims:
            if layer.startswith("netns:"):
                ok = not reached
            elif layer.startswith("ro-root:"):
                ok = report.get("ro_writable") is False and not self.ro_path.exists()
            elif layer == "tmpfs-tmp":
                ok = report.get("tmp_marker_visible") is False
            elif layer.startswith("pidns:"):
                ok = (
                    view is not None
                    and view.pid != report.get("pid")
                    and report.get("agent_pid_visible") is False
                )
            elif layer.startswith("home-hidden:"):
                ok = self.home_marker is not None and report.get("home_marker_visible") is False
            elif layer.startswith("scratch-only:"):
                ok = report.get("written_outside") == [] and report.get("scratch_writable") is True
                ok = ok and not leaked
            elif layer.startswith("no-caps:"):
                ok = view is not None and view.cap_eff == 0
            else:
                ok = False
            if ok:
                confirmed.append(layer)
            else:
                log.warning("sandbox layer %s was expected but the probe did not confirm it", layer)
        return confirmed

    def close(self) -> None:
        self._listener.close()
        for path in [self.marker, *self.write_paths, *([self.home_marker] if self.home_marker else [])]:
            with contextlib.suppress(OSError):
                path.unlink()
