"""Giving the machine back to its owner: drain on request (`hearth-agent drain`) or when another
process takes the GPU, and resume after. The GPU decision is a pure function; NVML sits behind a
small probe interface so machines without a GPU (and tests) plug in something else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from websockets.exceptions import ConnectionClosed

if TYPE_CHECKING:
    from hearth_agent.connection import Agent

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 30.0
GPU_POLL_S = 5.0
# The GPU must stay free of other processes this long before work resumes: a game between
# levels or a notebook between cells should not bounce the host in and out of the fleet.
GPU_RESUME_AFTER_S = 60.0

DrainSource = Literal["owner", "gpu"]


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    used_mb: int | None = None


class GpuProcessProbe(Protocol):
    def foreign_processes(self) -> list[GpuProcess] | None:
        """Processes other than this agent (and its worker) using a GPU; None when it cannot tell."""


@dataclass(frozen=True)
class GpuDecision:
    action: Literal["drain", "resume", "none"]
    reason: str


def gpu_drain_decide(
    *,
    foreign: Sequence[GpuProcess] | None,
    draining: bool,
    source: DrainSource | None,
    free_for_s: float | None,
    resume_after_s: float = GPU_RESUME_AFTER_S,
) -> GpuDecision:
    """What to do after one look at the GPU. Only a drain the GPU started is ended by the GPU
    becoming free; the owner's own `hearth-agent drain` waits for `drain --resume`."""
    if foreign is None:
        return GpuDecision("none", "GPU processes cannot be listed")
    if foreign:
        if draining:
            return GpuDecision("none", "already draining")
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return GpuDecision("drain", f"another process is using the GPU: {names}{more}")
    if not draining or source != "gpu":
        return GpuDecision("none", "GPU free")
    if free_for_s is not None and free_for_s >= resume_after_s:
        return GpuDecision("resume", f"the GPU has been free of other processes for {free_for_s:.0f} s")
    return GpuDecision("none", "waiting for the GPU to stay free")


def _own_process_tree(root: int) -> set[int]:
    """The agent and every process under it (the sandboxed worker), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses; ppid is the 2nd field after the last ')'.
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


class NvmlProcessProbe:
    """Compute and graphics processes on every NVIDIA GPU, through NVML."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nvml = nvml
        self.handles = handles

    @classmethod
    def open(cls) -> NvmlProcessProbe | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # no module, no driver or no device: nothing to watch
            log.debug("NVML not available for the GPU watch: %s", exc)
            return None
        return cls(pynvml, handles) if handles else None

    def foreign_processes(self) -> list[GpuProcess] | None:
        own = _own_process_tree(os.getpid())
        found: dict[int, GpuProcess] = {}
        try:
            for handle in self.handles:
                listed = [
                    *self.nvml.nvmlDeviceGetComputeRunningProcesses(handle),
                    *self.nvml.nvmlDeviceGetGraphicsRunningProcesses(handle),
                ]
                for proc in listed:
                    if proc.pid in own or proc.pid in found:
                        continue
                    name = "?"
                    with contextlib.suppress(OSError):
                        name = Path(f"/proc/{proc.pid}/comm").read_text().strip()
                    used = getattr(proc, "usedGpuMemory", None)
                    found[proc.pid] = GpuProcess(
                        pid=proc.pid, name=name, used_mb=int(used) // (1 << 20) if used else None
                    )
        except Exception as exc:
            log.debug("NVML process list failed: %s", exc)
            return None
        return sorted(found.values(), key=lambda p: p.pid)


class DrainController:
    """Drain and resume at the agent level: the state outlives connections, and a session that
    starts while draining says so before it says ready."""

    def __init__(
        self,
        agent: Agent,
        *,
        probe: GpuProcessProbe | None = None,
        poll_s: float = GPU_POLL_S,
        resume_after_s: float = GPU_RESUME_AFTER_S,
        default_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    ) -> None:
        self.agent = agent
        self.probe = probe
        self.poll_s = poll_s
        self.resume_after_s = resume_after_s
        self.default_timeout_s = default_timeout_s
        self._lock = asyncio.Lock()

    async def drain(
        self, *, reason: str, source: DrainSource = "owner", timeout_s: float | None = None
    ) -> dict[str, Any]:
        agent = self.agent
        async with self._lock:
            agent.draining, agent.drain_reason, agent.drain_source = True, reason, source
            session = agent.session
            released: list[str] = []
            sent = False
            if session is not None and session.welcomed:
                with contextlib.suppress(ConnectionClosed):
                    released = await session.drain(
                        reason=reason, timeout_s=self.default_timeout_s if timeout_s is None else timeout_s
                    )
                    sent = True
        return {"draining": True, "reason": reason, "released": released, "told_server": sent}

    async def resume(self, *, reason: str) -> dict[str, Any]:
        agent = self.agent
        async with self._lock:
            was = agent.draining
            agent.draining, agent.drain_reason, agent.drain_source = False, "", None
            session = agent.session
            sent = False
            if session is not None and session.welcomed:
                with contextlib.suppress(ConnectionClosed):
                    await session.resume(reason=reason)
                    sent = True
        return {"draining": False, "was_draining": was, "told_server": sent}

    async def watch_gpu(self) -> None:
        """Poll the probe; drain when another process shows up on the GPU, resume when it has
        been gone for a while. Runs until cancelled; does nothing without a probe."""
        if self.probe is None:
            return
        free_since: float | None = None
        while True:
            foreign = await asyncio.to_thread(self.probe.foreign_processes)
            now = time.monotonic()
            if foreign:
                free_since = None
            elif foreign is not None and free_since is None:
                free_since = now
            decision = gpu_drain_decide(
                foreign=foreign,
                draining=self.agent.draining,
                source=self.agent.drain_source,
                free_for_s=None if free_since is None else now - free_since,
                resume_after_s=self.resume_after_s,
            )
            if decision.action == "drain":
                log.warning("draining: %s", decision.reason)
                await self.drain(reason=decision.reason, source="gpu")
            elif decision.action == "resume":
                log.info("resuming: %s", decision.reason)
                await self.resume(reason=decision.reason)
            await asyncio.sleep(self.poll_s)
