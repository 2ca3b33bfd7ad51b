"""Which hosts may run a task: pure functions over plain data, no ORM.

The energy rules are `hearth_agent.policy`'s, the same functions the agent
runs locally, so the server and the agent agree on why a host is idle.
Scoring by price, throughput and reliability arrives with the matcher issue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hearth_agent.policy import EnergyPolicy, PowerState, Verdict, is_green, work_allowed


@dataclass(frozen=True)
class HostView:
    ready: bool
    slots: int
    leased: int
    memory_mb: int
    draining: bool = False
    policy: EnergyPolicy = field(default_factory=EnergyPolicy)
    power: PowerState | None = None  # None when no fresh power frame
    agent_verdict: Verdict = field(default_factory=lambda: Verdict(True, ""))
    quarantine_reason: str | None = None  # None: not quarantined
    hardware_ok: bool | None = None  # None: no benchmark yet
    hardware_reason: str = ""


@dataclass(frozen=True)
class ModelNeeds:
    min_memory_mb: int


def free_slots(host: HostView) -> int:
    if not host_takes_work(host).allowed:
        return 0
    return max(0, host.slots - host.leased)


def host_takes_work(host: HostView) -> Verdict:
    """Whether the host gets new tasks at all, and the reason when not."""
    if not host.ready:
        return Verdict(False, "agent is not ready")
    if host.quarantine_reason is not None:
        return Verdict(False, f"host is quarantined: {host.quarantine_reason}")
    if host.hardware_ok is False:
        return Verdict(False, f"hardware claim failed verification: {host.hardware_reason}")
    if host.draining:
        return Verdict(False, "owner is draining the machine")
    if not host.agent_verdict.allowed:
        return Verdict(False, f"agent reports: {host.agent_verdict.reason}")
    # Hours are the agent's call (it knows its time zone); battery and solar rules
    # are checked here too, on the last reading, so a stale agent verdict cannot win.
    site_rules = host.policy.model_copy(update={"allowed_hours": []})
    return work_allowed(site_rules, host.power, local_hour=0)


def host_can_run(host: HostView, model: ModelNeeds, *, green_only: bool = False) -> str | None:
    """None when the host can run a task of this model, else the reason it cannot."""
    verdict = host_takes_work(host)
    if not verdict.allowed:
        return verdict.reason
    if host.memory_mb < model.min_memory_mb:
        return f"host has {host.memory_mb} MB, model needs {model.min_memory_mb} MB"
    if green_only and not is_green(host.power):
        return "job is green-only and the host is not running on solar/battery now"
    return None
