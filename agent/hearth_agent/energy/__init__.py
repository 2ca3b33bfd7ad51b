"""What the machine and its home site draw: GPU power (NVML), the site (Tesla gateway via
pypowerwall, or a simulator), the owner's policy kept across restarts, and energy per task."""

from hearth_agent.energy.estimate import DEFAULT_WATTS_PER_CORE, estimate_task_wh
from hearth_agent.energy.monitor import EnergyMonitor, PowerReading, TaskMeter
from hearth_agent.energy.probe import SiteProbe, SiteReading

__all__ = [
    "DEFAULT_WATTS_PER_CORE",
    "EnergyMonitor",
    "PowerReading",
    "SiteProbe",
    "SiteReading",
    "TaskMeter",
    "estimate_task_wh",
]
