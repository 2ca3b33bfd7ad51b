"""Which hosts may run a task, and how well they suit it: pure functions over plain data, no ORM.

The energy rules are `hearth_agent.policy`'s, the same functions the agent
runs locally, so the server and the agent agree on why a host is idle.
`pair_rejection` is the hard filter (a reason, or None); `match_score` ranks
the hosts that pass, in parts an operator can read.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from hearth_agent.policy import EnergyPolicy, PowerState, Verdict, is_green, work_allowed
from marketplace.config.bounded import BoundedCache

K = TypeVar("K", bound=Hashable)
H = TypeVar("H")


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
    verified: bool = True  # False: still on known-answer tasks, no buyer work
    region: str = ""  # blank: the owner did not say
    items_per_s: float | None = None  # measured by the benchmark; None: not measured
    reliability: float | None = None  # 0..1 (marketplace.trust.scoring); None: no score yet

    @property
    def price_per_1k_minor(self) -> int:
        return self.policy.price_per_1k_items_minor


@dataclass(frozen=True)
class ModelNeeds:
    min_memory_mb: int


@dataclass(frozen=True)
class TaskView:
    """What a task asks of its host: its job's limits."""

    min_memory_mb: int
    max_price_per_1k_minor: int
    green_only: bool = False
    region: str = ""  # blank: any region


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
    return work_allowed(_site_rules(host.policy), host.power, local_hour=0)


# The policy without its hours, by the policy's identity: a round asks this of thousands of hosts
# that share a few policy instances (`host_policy` parses each document once), and copying a
# pydantic model per host cost more than the rule itself. The entry keeps its policy alive, so an
# id is never reused while it is here.
_SITE_RULES: BoundedCache[int, tuple[EnergyPolicy, EnergyPolicy]] = BoundedCache(limit=10_000)


def _site_rules(policy: EnergyPolicy) -> EnergyPolicy:
    cached = _SITE_RULES.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    return _SITE_RULES.put(id(policy), (policy, policy.model_copy(update={"allowed_hours": []})))[1]


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


# ---- the hard filter for one task and one host ---------------------------------------


def _takes_work(task: TaskView, host: HostView) -> str | None:
    verdict = host_takes_work(host)
    return None if verdict.allowed else verdict.reason


def _verified(task: TaskView, host: HostView) -> str | None:
    return None if host.verified else "host is not verified yet (it runs known-answer tasks only)"


def _memory(task: TaskView, host: HostView) -> str | None:
    if host.memory_mb < task.min_memory_mb:
        return f"host has {host.memory_mb} MB, model needs {task.min_memory_mb} MB"
    return None


def _region(task: TaskView, host: HostView) -> str | None:
    if task.region and host.region != task.region:
        return f"job asks region {task.region!r}, host is in {host.region or 'no region'!r}"
    return None


def _green(task: TaskView, host: HostView) -> str | None:
    if task.green_only and not is_green(host.power):
        return "job is green-only and the host is not running on solar/battery now"
    return None


def _price(task: TaskView, host: HostView) -> str | None:
    if host.price_per_1k_minor > task.max_price_per_1k_minor:
        return (
            f"host asks {host.price_per_1k_minor} per 1k items, "
            f"job pays at most {task.max_price_per_1k_minor}"
        )
    return None


Filter = Callable[[TaskView, HostView], str | None]

# In this order: the first that fails is the reason given.
FILTERS: tuple[tuple[str, Filter], ...] = (
    ("takes_work", _takes_work),
    ("verified", _verified),
    ("memory", _memory),
    ("region", _region),
    ("green", _green),
    ("price", _price),
)


def pair_rejection(task: TaskView, host: HostView) -> str | None:
    """None when the host may run the task, else the reason of the first filter that fails."""
    for _, check in FILTERS:
        reason = check(task, host)
        if reason is not None:
            return reason
    return None


def fit_rejection(task: TaskView, host: HostView) -> str | None:
    """`pair_rejection` for a host already known to take work (`free_slots` > 0): every filter but
    the first, which does not depend on the task and is the costly one to run per pair."""
    for name, check in FILTERS:
        reason = None if name == "takes_work" else check(task, host)
        if reason is not None:
            return reason
    return None


def fit_key(host: HostView) -> tuple[object, ...]:
    """Everything of the host that `fit_rejection` reads: hosts with equal keys pass or fail every
    task alike, so a round asks once per key, not once per host (keep this beside FILTERS)."""
    return (host.verified, host.memory_mb, host.region, is_green(host.power), host.price_per_1k_minor)


def fitting(task: TaskView, hosts: Sequence[H], view: Callable[[H], HostView]) -> list[H]:
    """Those of `hosts` (in their order) that `fit_rejection` passes for `task`, each distinct
    `fit_key` judged once."""
    verdicts: dict[tuple[object, ...], bool] = {}
    passed: list[H] = []
    for host in hosts:
        key = fit_key(view(host))
        fits = verdicts.get(key)
        if fits is None:
            fits = verdicts[key] = fit_rejection(task, view(host)) is None
        if fits:
            passed.append(host)
    return passed


def queued_reason(task: TaskView, hosts: Sequence[HostView]) -> str | None:
    """Why none of `hosts` (the online ones) can run the task, or None when one can.

    The hosts pass through the filters in order; the reason is the first filter
    that leaves none of them, said of the whole fleet rather than of one host.
    """
    if not hosts:
        return "no host online"
    left = list(hosts)
    for name, check in FILTERS:
        passed = [host for host in left if check(task, host) is None]
        if not passed:
            return _fleet_reason(name, task, left)
        left = passed
    return None


def _fleet_reason(name: str, task: TaskView, hosts: list[HostView]) -> str:
    if name == "takes_work":
        return f"no online host takes work now (one says: {host_takes_work(hosts[0]).reason})"
    if name == "verified":
        return "no online host is verified yet"
    if name == "memory":
        return f"no online host has {task.min_memory_mb} MB"
    if name == "region":
        return f"no online host is in region {task.region!r}"
    if name == "green":
        return "no online host is on solar/battery now"
    cheapest = min(host.price_per_1k_minor for host in hosts)
    return f"no online host asks ≤ {task.max_price_per_1k_minor} per 1k items (cheapest online: {cheapest})"


# ---- the score of a host that passed the filter -------------------------------------

# Weights of the parts; they sum to 1, so a total is 0..1.
WEIGHT_PRICE = 0.35
WEIGHT_RELIABILITY = 0.25
WEIGHT_THROUGHPUT = 0.2
WEIGHT_ENERGY = 0.1
WEIGHT_REGION = 0.1
# Items/s at which the throughput part is half its weight: faster hosts approach the full weight.
THROUGHPUT_HALF_ITEMS_PER_S = 200.0
# The score of a host nobody has judged yet.
RELIABILITY_UNKNOWN = 0.5


@dataclass(frozen=True)
class ScoreParts:
    """Each part already weighted, so `total` is their sum (0..1)."""

    price: float  # headroom under the job's max: paying less scores more
    throughput: float  # measured items/s; 0 when not measured
    reliability: float
    energy: float  # running on solar/battery now
    region: float  # in the region the job asked for
    total: float


def match_score(task: TaskView, host: HostView) -> ScoreParts:
    """How well the host suits the task, higher better; meaningful for hosts `pair_rejection` passes."""
    limit = task.max_price_per_1k_minor
    headroom = (limit - host.price_per_1k_minor) / limit if limit > 0 else 0.0
    rate = host.items_per_s or 0.0
    parts = {
        "price": WEIGHT_PRICE * _unit(headroom),
        "throughput": WEIGHT_THROUGHPUT * rate / (rate + THROUGHPUT_HALF_ITEMS_PER_S),
        "reliability": WEIGHT_RELIABILITY
        * _unit(RELIABILITY_UNKNOWN if host.reliability is None else host.reliability),
        "energy": WEIGHT_ENERGY if is_green(host.power) else 0.0,
        "region": WEIGHT_REGION if task.region and host.region == task.region else 0.0,
    }
    rounded = {name: round(value, 4) for name, value in parts.items()}
    return ScoreParts(**rounded, total=round(sum(parts.values()), 4))


def _unit(value: float) -> float:
    return min(1.0, max(0.0, value))


# ---- fairness across buyers ---------------------------------------------------------


@dataclass(frozen=True)
class BuyerQueue:
    """One buyer's side of a claim round: what it has in flight and what it has waiting."""

    leased: int  # tasks of the buyer's running now, on any host
    queued: int  # of its tasks, how many this host could take
    oldest: datetime  # when its oldest waiting job was submitted: breaks ties, first come first served


def fair_shares(queues: dict[K, BuyerQueue], slots: int) -> dict[K, int]:
    """How many of `slots` each buyer gets: one at a time to the buyer with the fewest tasks in flight
    (counting the ones given in this round), so a buyer with a huge job cannot starve a small one."""
    given: dict[K, int] = {}
    # (in flight, oldest, position): the position keeps the first-listed buyer first on a full tie
    # and means keys themselves are never compared.
    turns = [(queue.leased, queue.oldest, position) for position, queue in enumerate(queues.values())]
    keys = list(queues)
    heapq.heapify(turns)
    for _ in range(slots):
        while turns and given.get(keys[turns[0][2]], 0) >= queues[keys[turns[0][2]]].queued:
            heapq.heappop(turns)
        if not turns:
            break
        leased, oldest, position = turns[0]
        key = keys[position]
        given[key] = given.get(key, 0) + 1
        heapq.heapreplace(turns, (leased + 1, oldest, position))
    return given
