"""Which hosts may run a task: pure functions over plain data, no ORM.

The spine only filters (model fits in memory, free slot, ready); scoring by
price, throughput, reliability and energy arrives with the matcher issue.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HostView:
    ready: bool
    slots: int
    leased: int
    memory_mb: int


@dataclass(frozen=True)
class ModelNeeds:
    min_memory_mb: int


def free_slots(host: HostView) -> int:
    if not host.ready:
        return 0
    return max(0, host.slots - host.leased)


def host_can_run(host: HostView, model: ModelNeeds) -> str | None:
    """None when the host can run the model, else the reason it cannot."""
    if not host.ready:
        return "agent is not ready"
    if host.memory_mb < model.min_memory_mb:
        return f"host has {host.memory_mb} MB, model needs {model.min_memory_mb} MB"
    return None
