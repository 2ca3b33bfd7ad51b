"""The shape every site probe returns: a policy.PowerState plus the label of where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from hearth_agent.policy import PowerState

SiteSource = Literal["powerwall", "simulator"]


@dataclass(frozen=True)
class SiteReading:
    source: SiteSource
    power: PowerState
    # The site's own clock, when it has one (the simulator runs faster than the wall clock).
    local_hour: int | None = None


class SiteProbe(Protocol):
    """Reads the home site. `read()` may block on the network: callers run it in a thread."""

    @property
    def source(self) -> SiteSource: ...

    def read(self) -> SiteReading: ...
