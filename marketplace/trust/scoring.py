"""The reliability score and the canary rate: pure functions over a host's counters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrustFacts:
    uptime_7d: float  # share of the last 7 days (or of the host's life, if shorter) it was connected
    tasks_completed: int
    tasks_failed: int
    leases_expired: int
    checks_passed: int  # canaries and comparisons passed
    checks_failed: int
    strikes_30d: int


@dataclass(frozen=True)
class ScoreParts:
    uptime: float
    completion_rate: float
    pass_rate: float
    strike_penalty: float
    score: float


def _laplace(good: int, bad: int) -> float:
    """A rate that starts at 0.5 for a new host and follows the evidence as it accumulates."""
    return (good + 1) / (good + bad + 2)


def reliability_score(facts: TrustFacts) -> ScoreParts:
    """0..1: a quarter uptime, a quarter completion, half verification; each recent strike costs 0.2."""
    completion = _laplace(facts.tasks_completed, facts.tasks_failed + facts.leases_expired)
    passes = _laplace(facts.checks_passed, facts.checks_failed)
    uptime = min(1.0, max(0.0, facts.uptime_7d))
    penalty = 0.2 * facts.strikes_30d
    score = min(1.0, max(0.0, 0.25 * uptime + 0.25 * completion + 0.5 * passes - penalty))
    return ScoreParts(round(uptime, 4), round(completion, 4), round(passes, 4), penalty, round(score, 4))


def canary_rate(pass_streak: int, *, high: float, low: float) -> float:
    """Adaptive replication, as BOINC does it: a host that keeps passing is checked less and less
    (halving every 5 passes in a row), never below `low`; a failure resets the streak."""
    return max(low, high * 0.5 ** (pass_streak / 5))
