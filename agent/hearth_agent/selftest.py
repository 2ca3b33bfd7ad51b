"""`hearth-agent selftest`: run every escape probe (probes.py) inside the real sandboxed worker, as a
workload would run, and judge each from outside too: the listener that must stay silent, the
planted secret whose digest must not come back, the files that must not appear, the agent that
must not become traced. Also the test-only probe tasks the supervisor runs when
HEARTH_AGENT_ALLOW_PROBES=1 (never set in production).

Exit codes: 0 every probe contained, 1 at least one was not, 4 the worker could not be started."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hearth_agent.probes import FORK_CAP
from hearth_agent.supervisor import WorkerCrashed, WorkerError, WorkerSupervisor

log = logging.getLogger(__name__)

EXIT_ESCAPED = 1
EXIT_WORKER = 4
# Light probes first; the ones that end (or should end) with a fresh worker last.
PROBE_ORDER = (
    "tcp_loopback",
    "udp_loopback",
    "dns",
    "read_ssh_key",
    "write_outside_scratch",
    "ptrace_agent",
    "fork_bomb",
    "memory_exhaustion",
    "cpu_spin",
)
# The worker is replaced after these even when they were contained: its state is suspect.
_RETIRE_AFTER = frozenset({"fork_bomb", "memory_exhaustion", "cpu_spin"})
_CPU_SPIN_BUDGET_S = 2.0
_CPU_SPIN_WALL_S = 20.0


@dataclass(frozen=True)
class ProbeOutcome:
    name: str
    contained: bool
    evidence: str
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _mem_available_mb() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 2048


def _tracer_of_self() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class _Harness:
    """The outside half of one probe: what to give it, and how to judge what came back."""

    def __init__(self, name: str, supervisor: WorkerSupervisor) -> None:
        self.name = name
        self.supervisor = supervisor
        self.nonce = secrets.token_hex(6)
        self.cleanup: list[Path] = []
        self.sockets: list[socket.socket] = []

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        for path in self.cleanup:
            with contextlib.suppress(OSError):
                path.unlink()

    def params(self) -> dict[str, Any]:
        home = Path(os.environ.get("HOME") or Path.home())
        if self.name in ("tcp_loopback", "udp_loopback"):
            kind = socket.SOCK_STREAM if self.name == "tcp_loopback" else socket.SOCK_DGRAM
            sock = socket.socket(socket.AF_INET, kind)
            sock.bind(("127.0.0.1", 0))
            if kind == socket.SOCK_STREAM:
                sock.listen(4)
            sock.setblocking(False)
            self.sockets.append(sock)
            host, port = sock.getsockname()
            return {"host": host, "port": port}
        if self.name == "dns":
            return {"name": "example.com"}
        if self.name == "read_ssh_key":
            # Never touch a real key: plant a uniquely named secret of our own, and only *try*
            # the real ~/.ssh/id_rsa if there is one (the worker returns a digest, never content).
            self.planted: dict[str, str] = {}
            planted = home / f".hearth-selftest-secret-{self.nonce}"
            try:
                fd = os.open(planted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(secrets.token_bytes(64))
                self.cleanup.append(planted)
                self.planted[str(planted)] = _digest(planted) or ""
            except OSError as exc:
                log.warning("could not plant a secret in %s: %s", home, exc)
            real_key = home / ".ssh" / "id_rsa"
            if (digest := _digest(real_key)) is not None:
                self.planted[str(real_key)] = digest
            return {"paths": list(self.planted)}
        if self.name == "write_outside_scratch":
            self.targets = [
                Path(d) / f".hearth-selftest-{self.nonce}"
                for d in ("/etc", "/usr", "/var/tmp", str(home), str(self.supervisor.cache_dir))
            ]
            self.cleanup.extend(self.targets)
            return {"paths": [str(p) for p in self.targets]}
        if self.name == "ptrace_agent":
            return {"agent_pid": os.getpid()}
        if self.name == "fork_bomb":
            return {"cap": FORK_CAP}
        if self.name == "memory_exhaustion":
            # Far past the limit, but never more than half of what the machine has free: an
            # unlimited worker must not push the machine into swap or the OOM killer.
            limit = self.supervisor.limits.memory_mb
            self.target_mb = min(2 * limit if limit else 1 << 20, _mem_available_mb() // 2)
            return {"target_mb": self.target_mb}
        if self.name == "cpu_spin":
            return {"seconds": 3 * _CPU_SPIN_WALL_S}
        raise ValueError(f"unknown probe {self.name!r}")

    def judge(self, result: dict[str, Any] | None, crash: str | None) -> tuple[bool, str]:
        """Contained or not, and why. `result` is None when the worker died running the probe."""
        said = str((result or {}).get("evidence", "")) or (crash or "")
        if self.name in ("tcp_loopback", "udp_loopback"):
            sock = self.sockets[0]
            time.sleep(0.2)  # a datagram in flight
            try:
                if self.name == "tcp_loopback":
                    sock.accept()[0].close()
                else:
                    sock.recvfrom(64)
                arrived = True
            except (BlockingIOError, OSError):
                arrived = False
            if arrived:
                return False, f"{said}; the host-side socket RECEIVED traffic"
            return True, f"{said}; the host-side socket received nothing"
        if self.name == "dns":
            if result is None:
                return True, said
            return not result.get("resolved") and not result.get("routed"), said
        if self.name == "read_ssh_key":
            got = (result or {}).get("digests", {})
            leaked = [path for path, digest in self.planted.items() if digest and got.get(path) == digest]
            if leaked:
                return False, f"the worker read {', '.join(leaked)}"
            return bool(self.planted), said or "nothing planted"
        if self.name == "write_outside_scratch":
            appeared = [str(p) for p in self.targets if p.exists()]
            if appeared:
                return False, f"{said}; files appeared on the host: {', '.join(appeared)}"
            written = (result or {}).get("written", [])
            return not written, said + ("" if written else "; nothing appeared on the host")
        if self.name == "ptrace_agent":
            tracer = _tracer_of_self()
            attached = (result or {}).get("attached", [])
            return not attached and tracer == 0, f"{said}; agent TracerPid={tracer}"
        if self.name == "fork_bomb":
            if result is None:
                return True, said
            spawned = int(result.get("spawned", FORK_CAP))
            # Contained means a limit said no, well before the probe's own cap.
            return result.get("stopped_by") != "cap" and spawned < FORK_CAP // 2, said
        if self.name == "memory_exhaustion":
            if result is None:
                return True, said
            return result.get("stopped_by") == "MemoryError", said
        if self.name == "cpu_spin":
            if result is None:
                return True, said
            return False, said
        return False, said


async def probe_execute(supervisor: WorkerSupervisor, name: str, *, retire: bool = False) -> ProbeOutcome:
    """Run one probe in the supervisor's live worker and judge it inside and out.

    `retire` replaces that worker afterwards, under the same lock as the probe, so
    a worker that another task is already starting is never the one killed.
    """
    harness = _Harness(name, supervisor)
    started = time.perf_counter()
    try:
        params = harness.params()
        timeout_s, budget = (_CPU_SPIN_WALL_S, _CPU_SPIN_BUDGET_S) if name == "cpu_spin" else (90.0, None)
        result: dict[str, Any] | None = None
        crash: str | None = None
        try:
            result = await supervisor.run_probe(
                name, params, timeout_s=timeout_s, cpu_budget_s=budget, retire=retire or name in _RETIRE_AFTER
            )
        except WorkerCrashed as exc:
            crash = exc.reason
        contained, evidence = await asyncio.to_thread(harness.judge, result, crash)
    finally:
        harness.close()
    return ProbeOutcome(
        name=name,
        contained=contained,
        evidence=evidence[:600],
        seconds=round(time.perf_counter() - started, 2),
    )


async def probe_task(supervisor: WorkerSupervisor, name: str) -> WorkerError:
    """A probe that arrived as a task (tests only): it always fails its own task, never the agent."""
    if name not in PROBE_ORDER:
        return WorkerError(f"unknown sandbox probe {name!r}", retryable=False)
    # Any escape attempt, contained or not, leaves a fresh worker behind.
    outcome = await probe_execute(supervisor, name, retire=True)
    if outcome.contained:
        return WorkerError(f"sandbox contained probe {name}: {outcome.evidence}", retryable=False)
    return WorkerError(f"sandbox did NOT contain probe {name}: {outcome.evidence}", retryable=False)


async def selftest_run(
    *,
    sandbox: str = "auto",
    hidden_paths: Sequence[Path] = (),
    probes: Sequence[str] = PROBE_ORDER,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Start a worker as `run` would, run the probes in it, and return the report."""
    own_cache = cache_dir is None
    cache = cache_dir or Path(tempfile.mkdtemp(prefix="hearth-selftest-"))
    supervisor = WorkerSupervisor(cache_dir=cache, sandbox=sandbox, hidden_paths=hidden_paths)
    try:
        info = await supervisor.start()
        outcomes = []
        for name in probes:
            outcome = await probe_execute(supervisor, name)
            log.info(
                "probe %s: %s (%s)", name, "contained" if outcome.contained else "ESCAPED", outcome.evidence
            )
            outcomes.append(outcome)
        final = await supervisor.start()
    finally:
        await supervisor.stop()
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    return {
        "sandbox": info.sandbox,
        "layers": list(info.isolation),
        "probes_total": len(outcomes),
        "probes_contained": sum(o.contained for o in outcomes),
        "probes": [o.as_json() for o in outcomes],
        "worker_starts": supervisor.starts,
        "layers_after_restarts": list(final.isolation),
    }


def cmd_selftest(args: argparse.Namespace, *, hidden_paths: Sequence[Path]) -> int:
    # stdout carries exactly one JSON object with --json; everything else goes to stderr.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    try:
        report = asyncio.run(selftest_run(sandbox=args.sandbox, hidden_paths=hidden_paths))
    except (WorkerError, RuntimeError) as exc:
        print(f"hearth-agent: the worker could not be started: {exc}", file=sys.stderr)
        return EXIT_WORKER
    if args.json:
        print(json.dumps(report))
    else:
        print(f"sandbox {report['sandbox']}: {', '.join(report['layers']) or 'NO isolation'}")
        for probe in report["probes"]:
            print(
                f"  {'contained' if probe['contained'] else 'ESCAPED  '} {probe['name']}: {probe['evidence']}"
            )
        print(f"{report['probes_contained']}/{report['probes_total']} probes contained")
    return 0 if report["probes_contained"] == report["probes_total"] else EXIT_ESCAPED
