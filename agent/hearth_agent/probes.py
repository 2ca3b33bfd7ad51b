"""Escape probes that run INSIDE the sandboxed worker as if they were a workload (`selftest`, and probe
tasks in tests). Each returns what it saw; whether that counts as contained is decided outside, in
`hearth_agent.selftest`, which also checks the host side (listeners, planted files, tracer state).

Stdlib only: the worker imports this before torch, and a probe must never depend on the model."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

PTRACE_ATTACH = 16
PTRACE_DETACH = 17
# Fork-bomb probe: never more than this many children, whatever the sandbox allows.
FORK_CAP = 2000
_CHUNK = 64 * 1024 * 1024

ProbeResult = dict[str, Any]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _err(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def ptrace_attach(pid: int) -> int:
    """PTRACE_ATTACH then, if it worked, detach at once. Returns 0 or the errno."""
    libc = _libc()
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
        # The tracee stops on attach; wait for that (__WALL: it may be a thread) before detaching.
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0x40000000)
        libc.ptrace(PTRACE_DETACH, pid, None, None)
        return 0
    return ctypes.get_errno()


def _tcp_loopback(params: dict[str, Any]) -> ProbeResult:
    host, port = params["host"], int(params["port"])
    try:
        with socket.create_connection((host, port), timeout=2.0) as conn:
            conn.sendall(b"hearth-probe")
        return {"connected": True, "evidence": f"connected to {host}:{port}"}
    except OSError as exc:
        return {"connected": False, "evidence": f"connect {host}:{port}: {_err(exc)}"}


def _udp_loopback(params: dict[str, Any]) -> ProbeResult:
    host, port = params["host"], int(params["port"])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sent = sock.sendto(b"hearth-probe", (host, port))
        return {"sent": sent > 0, "evidence": f"sendto {host}:{port} returned {sent}"}
    except OSError as exc:
        return {"sent": False, "evidence": f"sendto {host}:{port}: {_err(exc)}"}


def _dns(params: dict[str, Any]) -> ProbeResult:
    name = str(params.get("name", "example.com"))
    evidence = []
    resolved = False
    try:
        addresses = socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)
        resolved = bool(addresses)
        evidence.append(f"resolved {name}")
    except OSError as exc:
        evidence.append(f"resolve {name}: {exc.__class__.__name__} {exc.errno}")
    # A UDP connect sends no packet, so this never leaks traffic even unsandboxed; in a network
    # namespace without a route it fails with ENETUNREACH.
    routed = False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("8.8.8.8", 53))
        routed = True
        evidence.append("route to 8.8.8.8:53 exists")
    except OSError as exc:
        evidence.append(f"8.8.8.8:53: {_err(exc)}")
    return {"resolved": resolved, "routed": routed, "evidence": "; ".join(evidence)}


def _read_secret(params: dict[str, Any]) -> ProbeResult:
    """Returns only a digest of what it could read, never the content."""
    reads: dict[str, str | None] = {}
    evidence = []
    for path in params["paths"]:
        try:
            with open(path, "rb") as handle:
                reads[path] = hashlib.sha256(handle.read()).hexdigest()
            evidence.append(f"read {path}")
        except OSError as exc:
            reads[path] = None
            evidence.append(f"{path}: {_err(exc)}")
    return {"digests": reads, "evidence": "; ".join(evidence)}


def _write_outside(params: dict[str, Any]) -> ProbeResult:
    written = []
    evidence = []
    for path in params["paths"]:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b"hearth-probe")
            os.close(fd)
            written.append(path)
            evidence.append(f"wrote {path}")
        except OSError as exc:
            evidence.append(f"{os.path.dirname(path)}: {_err(exc)}")
    scratch_ok = False
    if scratch := params.get("scratch"):
        try:
            probe = os.path.join(scratch, "hearth-scratch-probe")
            with open(probe, "wb") as handle:
                handle.write(b"ok")
            os.unlink(probe)
            scratch_ok = True
        except OSError as exc:
            evidence.append(f"scratch {scratch}: {_err(exc)}")
    return {"written": written, "scratch_writable": scratch_ok, "evidence": "; ".join(evidence)}


def _fork_bomb(params: dict[str, Any]) -> ProbeResult:
    """Spawn sleepers until the sandbox says no or the cap is reached, then kill them all. Children
    are tiny `sleep` processes (posix_spawn, no copy of this big process), each with its own
    deadline, so nothing outlives the probe even if this process dies mid-way."""
    cap = min(int(params.get("cap", FORK_CAP)), FORK_CAP)
    sleeper = params.get("sleep_binary", "/bin/sleep")
    children: list[int] = []
    stopped_by = "cap"
    started = time.monotonic()
    try:
        while len(children) < cap and time.monotonic() - started < 20.0:
            try:
                children.append(os.posix_spawn(sleeper, [sleeper, "30"], {}))
            except OSError as exc:
                stopped_by = _err(exc)
                break
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
    return {
        "spawned": len(children),
        "cap": cap,
        "stopped_by": stopped_by,
        "evidence": f"spawned {len(children)} of {cap} processes, stopped by {stopped_by}",
    }


def _memory(params: dict[str, Any]) -> ProbeResult:
    """Touch memory in 64 MiB chunks up to `target_mb` (the caller keeps it well inside the
    machine's free RAM, so an unlimited worker cannot make the machine swap)."""
    target = int(params["target_mb"]) * 1024 * 1024
    held: list[bytearray] = []
    total = 0
    try:
        while total < target:
            held.append(bytearray(b"\x01") * _CHUNK)
            total += _CHUNK
    except MemoryError:
        held.clear()
        return {
            "allocated_mb": total // (1024 * 1024),
            "stopped_by": "MemoryError",
            "evidence": f"MemoryError after {total // (1024 * 1024)} MiB of {target // (1024 * 1024)} MiB",
        }
    held.clear()
    return {
        "allocated_mb": total // (1024 * 1024),
        "stopped_by": "target",
        "evidence": f"allocated all {total // (1024 * 1024)} MiB",
    }


def _cpu_spin(params: dict[str, Any]) -> ProbeResult:
    deadline = time.monotonic() + float(params.get("seconds", 30.0))
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    return {"evidence": f"spun {spins} iterations without being stopped"}


def _ptrace_agent(params: dict[str, Any]) -> ProbeResult:
    targets = {"agent": int(params["agent_pid"]), "parent": os.getppid()}
    attached = []
    evidence = []
    for label, pid in targets.items():
        code = ptrace_attach(pid)
        if code == 0:
            attached.append(label)
            evidence.append(f"attached to {label} pid {pid}")
        else:
            evidence.append(f"{label} pid {pid}: {errno.errorcode.get(code, str(code))}")
    agent_visible = os.path.exists(f"/proc/{targets['agent']}")
    evidence.append(f"/proc/{targets['agent']} {'visible' if agent_visible else 'not visible'}")
    return {"attached": attached, "agent_proc_visible": agent_visible, "evidence": "; ".join(evidence)}


PROBES: dict[str, Callable[[dict[str, Any]], ProbeResult]] = {
    "tcp_loopback": _tcp_loopback,
    "udp_loopback": _udp_loopback,
    "dns": _dns,
    "read_ssh_key": _read_secret,
    "write_outside_scratch": _write_outside,
    "fork_bomb": _fork_bomb,
    "memory_exhaustion": _memory,
    "cpu_spin": _cpu_spin,
    "ptrace_agent": _ptrace_agent,
}


def probe_run(name: str, params: dict[str, Any]) -> ProbeResult:
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}")
    return PROBES[name](params)
