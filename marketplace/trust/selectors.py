"""Reads for trust: what a host owner sees about its machine's standing, and why."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from marketplace.hosts.models import Host
from marketplace.trust.models import ReliabilityEvent, Strike
from marketplace.trust.scoring import reliability_score
from marketplace.trust.services import host_facts, host_trusted, uptime


def owners_with_withheld_earnings() -> frozenset[int]:
    """Owners of a quarantined machine: their pending earnings wait for the operator's review."""
    return frozenset(Host.objects.filter(earnings_withheld=True).values_list("owner_id", flat=True))


def host_trust_summary(*, host: Host) -> dict[str, Any]:
    """Badge-level facts for host listings."""
    return {
        "verified": host.verified_at is not None,
        "verified_at": host.verified_at,
        "quarantined": host.quarantined_at is not None,
        "quarantine_reason": host.quarantine_reason,
        "reliability": host.reliability,
        "hardware_ok": host.hardware_ok,
        "hardware_reason": host.hardware_reason,
    }


def host_reliability(*, host: Host, events: int = 50) -> dict[str, Any]:
    """The host's standing and its evidence. The strikes are read before the host's counters: the
    lease sweep counts an expiry on the host row before it records the strike for it, so a report
    that shows a strike also shows what it counted (read the other way round, with the `host` the
    caller loaded earlier, a sweep in between gave a strike beside `leases_expired` 0)."""
    now = timezone.now()
    strikes = list(Strike.objects.filter(host=host)[:50])
    host.refresh_from_db()
    facts = host_facts(host=host, now=now)
    parts = reliability_score(facts)
    checks = facts.checks_passed + facts.checks_failed
    runs = facts.tasks_completed + facts.tasks_failed + facts.leases_expired
    return {
        **host_trust_summary(host=host),
        "trusted": host_trusted(host=host, now=now),
        "earnings_withheld": host.earnings_withheld,
        "score_parts": {
            "uptime": parts.uptime,
            "completion_rate": parts.completion_rate,
            "pass_rate": parts.pass_rate,
            "strike_penalty": parts.strike_penalty,
        },
        "uptime": {
            label: round(uptime(host=host, window=timedelta(days=days), now=now), 4)
            for label, days in (("24h", 1), ("7d", 7), ("30d", 30))
        },
        "completion_rate": round(facts.tasks_completed / runs, 4) if runs else None,
        "verification_pass_rate": round(facts.checks_passed / checks, 4) if checks else None,
        "counts": {
            "tasks_completed": host.tasks_completed,
            "tasks_failed": host.tasks_failed,
            "leases_expired": host.leases_expired,
            "canaries_passed": host.canaries_passed,
            "canaries_failed": host.canaries_failed,
            "checks_passed": host.checks_passed,
            "checks_failed": host.checks_failed,
            "pass_streak": host.pass_streak,
        },
        "benchmark": host.benchmark or None,
        "benchmark_at": host.benchmark_at,
        "strikes": [
            {
                "kind": s.kind,
                "evidence": s.evidence,
                "task_id": s.task_id and str(s.task_id),
                "at": s.created_at,
            }
            for s in strikes
        ],
        "events": [
            {
                "at": e.created_at,
                "score_before": e.score_before,
                "score_after": e.score_after,
                "reason": e.reason,
            }
            for e in ReliabilityEvent.objects.filter(host=host)[:events]
        ],
    }
