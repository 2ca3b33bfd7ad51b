"""Energy per task when there is no meter: a benchmark power model, an estimate and labelled so."""

from __future__ import annotations

# A busy desktop core draws roughly 10-20 W at the wall (package TDP / cores, plus memory and
# board); 15 W is the middle of that. Owners with a better figure set it in the agent config.
DEFAULT_WATTS_PER_CORE = 15.0


def estimate_task_wh(
    *, compute_s: float, busy_cores: int, watts_per_core: float = DEFAULT_WATTS_PER_CORE
) -> float:
    """Watts per busy core × cores × compute time, in Wh. Not a measurement."""
    if compute_s <= 0 or busy_cores <= 0 or watts_per_core <= 0:
        return 0.0
    return watts_per_core * busy_cores * compute_s / 3600.0
