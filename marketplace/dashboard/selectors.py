"""Reads for the pages: plain dicts shaped for the templates, built on the other apps' selectors.

Nothing here writes. Queries are per page, not per row, where a page lists many rows.
"""

from __future__ import annotations

import statistics
import uuid
from collections import Counter
from datetime import date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate, TruncHour
from django.utils import timezone

from hearth_agent.policy import is_green
from marketplace.accounts.models import User
from marketplace.billing.errors import format_minor
from marketplace.billing.models import Account, Entry, LedgerTransaction
from marketplace.billing.selectors import balances_for_user, earnings_by_day, usage_by_job
from marketplace.catalog.models import CatalogModel
from marketplace.catalog.selectors import catalog_model_list
from marketplace.hosts.models import Host
from marketplace.hosts.power import METERS, power_history, power_latest
from marketplace.hosts.selectors import host_list_for_owner
from marketplace.hosts.services import host_policy
from marketplace.jobs.models import Job, Task, TaskRole, Verification
from marketplace.jobs.selectors import job_list_for_buyer, job_summary
from marketplace.jobs.states import JOB_FINISHED, TaskStatus

# Throughput is measured over this window of finished tasks.
THROUGHPUT_WINDOW = timedelta(seconds=60)
# The job page draws one square per task up to this many; beyond it the bar alone tells progress.
TIMELINE_MAX_TASKS = 400


def money(amount_minor: int | None) -> str:
    return "—" if amount_minor is None else format_minor(int(amount_minor), settings.HEARTH_CURRENCY)


def _online_hosts() -> list[Host]:
    return list(
        Host.objects.filter(status=Host.Status.ONLINE, revoked_at__isnull=True, quarantined_at__isnull=True)
    )


def _gpu_label(host: Host) -> str:
    gpus = (host.capabilities or {}).get("gpus") or []
    if gpus:
        return str(gpus[0].get("name") or "GPU")
    cpu = (host.capabilities or {}).get("cpu_model") or ""
    return f"CPU only ({cpu})" if cpu else "CPU only"


def _price(host: Host) -> int:
    return host_policy(host=host).price_per_1k_items_minor


def price_range_per_1k(*, model: CatalogModel | None = None) -> tuple[int, int] | None:
    """The lowest and highest asking price per 1,000 items among verified hosts that can hold the
    model: those online now, or when none is, all of them (what the queue will be offered at).
    None when no host is verified yet."""
    verified = Host.objects.filter(
        verified_at__isnull=False, revoked_at__isnull=True, quarantined_at__isnull=True
    )
    online = [h for h in verified if h.status == Host.Status.ONLINE]
    prices = [
        _price(h)
        for h in (online or list(verified))
        if model is None or not h.memory_mb or h.memory_mb >= model.min_memory_mb
    ]
    return (min(prices), max(prices)) if prices else None


def market_snapshot(*, now: datetime | None = None) -> dict[str, Any]:
    """The public market: the fleet online now, its throughput, prices and energy."""
    now = now or timezone.now()
    hosts = _online_hosts()
    gpus = Counter(
        _gpu_label(h) for h in hosts for _ in range(max(1, len((h.capabilities or {}).get("gpus") or [])))
    )
    green_ids = {h.pk for h in hosts if is_green(power_latest(h))}
    leased = list(
        Task.objects.filter(status=TaskStatus.LEASED, leased_to__in=hosts).values_list(
            "leased_to_id", flat=True
        )
    )
    done = Task.objects.filter(
        status=TaskStatus.SUCCEEDED, completed_at__gte=now - THROUGHPUT_WINDOW
    ).aggregate(items=Sum("item_count"))["items"]
    capacity = sum(float((h.benchmark or {}).get("minilm_items_per_s") or 0) * max(1, h.slots) for h in hosts)
    models = []
    for model in catalog_model_list():
        fitting = [
            _price(h)
            for h in hosts
            if h.verified_at is not None and (not h.memory_mb or h.memory_mb >= model.min_memory_mb)
        ]
        models.append(
            {
                "name": model.name,
                "hosts": len(fitting),
                "low": money(min(fitting)) if fitting else "—",
                "median": money(round(statistics.median(fitting))) if fitting else "—",
                "high": money(max(fitting)) if fitting else "—",
            }
        )
    return {
        "at": now,
        "hosts_online": len(hosts),
        "hosts_verified": sum(1 for h in hosts if h.verified_at is not None),
        "gpus": sorted(gpus.items(), key=lambda kv: (-kv[1], kv[0])),
        "items_per_s": round((done or 0) / THROUGHPUT_WINDOW.total_seconds(), 1),
        "capacity_items_per_s": round(capacity, 1),
        "tasks_running": len(leased),
        "tasks_running_green": sum(1 for host_id in leased if host_id in green_ids),
        "green_share_pct": round(100 * sum(1 for h in leased if h in green_ids) / len(leased))
        if leased
        else None,
        "hosts_green": len(green_ids),
        "models": models,
    }


# ---- buyers -------------------------------------------------------------------


def buyer_balance(*, buyer: User) -> dict[str, Any]:
    balances = balances_for_user(user=buyer)
    return {
        "credit_minor": balances["buyer_credit_minor"],
        "credit": money(balances["buyer_credit_minor"]),
        "escrow": money(balances["buyer_escrow_minor"]),
    }


def job_rows_for_buyer(*, buyer: User, limit: int = 100) -> list[dict[str, Any]]:
    """The buyer's jobs with progress, cost (from the ledger) and energy, newest first."""
    jobs = list(job_list_for_buyer(buyer=buyer)[:limit])
    energy = dict(
        Task.objects.filter(job__in=jobs, status=TaskStatus.SUCCEEDED, role=TaskRole.PRIMARY)
        .values("job_id")
        .annotate(wh=Sum("energy_wh"))
        .values_list("job_id", "wh")
    )
    costs = {str(row["job_id"]): row for row in usage_by_job(buyer=buyer)}
    return [
        {
            "job": job,
            "percent": progress_percent(job.items_done, job.items_total),
            "spent": money(costs[str(job.pk)]["spent_minor"]) if str(job.pk) in costs else money(0),
            "held": money(costs[str(job.pk)]["in_escrow_minor"]) if str(job.pk) in costs else money(0),
            "energy_wh": round(energy.get(job.pk) or 0.0, 3),
        }
        for job in jobs
    ]


def progress_percent(done: int, total: int) -> int:
    return int(100 * done / total) if total else 0


def job_live(*, job: Job) -> dict[str, Any]:
    """What the job page shows and its websocket pushes: summary, cost, per-task timeline."""
    summary = job_summary(job=job)
    tasks = list(
        Task.objects.filter(job=job, role=TaskRole.PRIMARY)
        .order_by("index")
        .values("index", "status", "settled", "item_count", "attempt", "completed_at", "leased_to__name")[
            :TIMELINE_MAX_TASKS
        ]
    )
    cost = summary["cost"]
    return {
        "id": summary["id"],
        "status": job.status,
        "finished": job.status in JOB_FINISHED,
        "items_done": job.items_done,
        "items_total": job.items_total,
        "percent": progress_percent(job.items_done, job.items_total),
        "tasks": summary["tasks"],
        "attempts": summary["task_attempts"],
        "energy_wh": summary["energy"]["wh"],
        "failure_reason": job.failure_reason,
        "spent": money(cost["charged_minor"]),
        "held": money(cost["in_escrow_minor"]),
        "timeline": [
            {
                "index": t["index"],
                "status": t["status"],
                "host": t["leased_to__name"] or "",
                "items": t["item_count"],
                "attempt": t["attempt"],
            }
            for t in tasks
        ],
        "timeline_truncated": job.items_total and len(tasks) >= TIMELINE_MAX_TASKS,
        "verification": summary["verification"],
    }


def spend_by_day(*, buyer: User, days: int = 30, today: date | None = None) -> list[tuple[date, int]]:
    """Credit spent on verified runs per UTC day, the last `days` days, oldest first (0 on idle days)."""
    today = today or timezone.now().date()
    start = today - timedelta(days=days - 1)
    rows = dict(
        Entry.objects.filter(
            account__owner=buyer,
            account__kind=Account.Kind.BUYER_ESCROW,
            account__currency=settings.HEARTH_CURRENCY,
            transaction__kind=LedgerTransaction.Kind.CAPTURE,
            transaction__created_at__date__gte=start,
        )
        .annotate(day=TruncDate("transaction__created_at"))
        .values("day")
        .annotate(total=Sum("amount"))
        .values_list("day", "total")
    )
    return [(start + timedelta(days=i), -int(rows.get(start + timedelta(days=i)) or 0)) for i in range(days)]


def estimate_range(
    *,
    items: int,
    model: CatalogModel | None,
    verification: str,
    spot_fraction: float | None,
    replicas: int | None,
) -> dict[str, Any] | None:
    """The price range a job of `items` would cost at today's asking prices, with verification's
    extra runs; None when no host is online to price it."""
    prices = price_range_per_1k(model=model)
    if prices is None or items <= 0:
        return None
    if verification == Verification.REDUNDANT:
        runs = float(replicas or 2)
    elif verification == Verification.SPOT:
        runs = 1 + float(spot_fraction or settings.HEARTH_DEFAULT_SPOT_FRACTION)
    else:
        runs = 1.0
    low, high = (round(price * items * runs / 1000) for price in prices)
    return {"low_minor": low, "high_minor": high, "low": money(low), "high": money(high), "runs": runs}


# ---- hosts --------------------------------------------------------------------


def machine_rows_for_owner(*, owner: User) -> list[dict[str, Any]]:
    hosts = list(host_list_for_owner(owner=owner).filter(revoked_at__isnull=True))
    return [
        {
            "host": host,
            "online": host.status == Host.Status.ONLINE,
            "verified": host.verified_at is not None,
            "quarantined": host.quarantined_at is not None,
            "reliability_pct": round(100 * host.reliability),
            "gpu": _gpu_label(host),
            "green": is_green(power_latest(host)),
            "policy": host_policy(host=host),
        }
        for host in hosts
    ]


def machine_get_for_owner(*, owner: User, host_id: str) -> Host | None:
    try:
        key = uuid.UUID(str(host_id))
    except ValueError:
        return None
    return host_list_for_owner(owner=owner).filter(pk=key, revoked_at__isnull=True).first()


def machine_power_series(*, host: Host, hours: float = 24) -> dict[str, list[tuple[datetime, float]]]:
    """Each meter's averages over time, for the charts; meters the site lacks are left out."""
    since = timezone.now() - timedelta(hours=hours)
    series: dict[str, list[tuple[datetime, float]]] = {meter: [] for meter in METERS}
    for sample in power_history(host=host, since=since):
        for meter in METERS:
            value = sample.average(meter)
            if value is not None:
                series[meter].append((sample.bucket_start, value))
    return {meter: points for meter, points in series.items() if points}


def machine_tasks_per_hour(*, host: Host, hours: int = 24) -> list[tuple[datetime, int]]:
    now = timezone.now()
    first = (now - timedelta(hours=hours - 1)).replace(minute=0, second=0, microsecond=0)
    rows = dict(
        Task.objects.filter(completed_by=host, completed_at__gte=first)
        .annotate(hour=TruncHour("completed_at"))
        .values("hour")
        .annotate(n=Count("id"))
        .values_list("hour", "n")
    )
    return [
        (first + timedelta(hours=i), int(rows.get(first + timedelta(hours=i)) or 0)) for i in range(hours)
    ]


def machine_earnings_by_day(*, host: Host, days: int = 14) -> list[tuple[date, int]]:
    """What this machine earned its owner per UTC day (after the platform fee), oldest first."""
    today = timezone.now().date()
    start = today - timedelta(days=days - 1)
    rows = dict(
        Entry.objects.filter(
            account__owner_id=host.owner_id,
            account__kind=Account.Kind.HOST_PENDING,
            account__currency=settings.HEARTH_CURRENCY,
            transaction__kind=LedgerTransaction.Kind.CAPTURE,
            transaction__host_id=str(host.pk),
            transaction__created_at__date__gte=start,
        )
        .annotate(day=TruncDate("transaction__created_at"))
        .values("day")
        .annotate(total=Sum("amount"))
        .values_list("day", "total")
    )
    return [(start + timedelta(days=i), int(rows.get(start + timedelta(days=i)) or 0)) for i in range(days)]


def machine_current_tasks(*, host: Host) -> list[dict[str, Any]]:
    return [
        dict(row)
        for row in Task.objects.filter(leased_to=host, status=TaskStatus.LEASED)
        .order_by("assigned_at")
        .values("job_id", "index", "item_count", "role", "assigned_at")[:20]
    ]


def earnings_overview(*, owner: User, days: int = 30) -> dict[str, Any]:
    balances = balances_for_user(user=owner)
    by_day = {row["day"]: row for row in earnings_by_day(owner=owner)}
    today = timezone.now().date()
    chart = [
        (
            today - timedelta(days=i),
            int(by_day.get((today - timedelta(days=i)).isoformat(), {}).get("earned_minor", 0)),
        )
        for i in reversed(range(days))
    ]
    return {
        "pending": money(balances["host_pending_minor"]),
        "available": money(balances["host_available_minor"]),
        "in_transit": money(balances["payouts_in_transit_minor"]),
        "chart": chart,
        "rows": sorted(by_day.values(), key=lambda r: r["day"], reverse=True)[:days],
    }


def hosts_online_count_for_owner(*, owner: User) -> int:
    return Host.objects.filter(owner=owner, status=Host.Status.ONLINE, revoked_at__isnull=True).count()


def jobs_active_count_for_buyer(*, buyer: User) -> int:
    return job_list_for_buyer(buyer=buyer).filter(~Q(status__in=JOB_FINISHED)).count()
