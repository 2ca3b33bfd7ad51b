"""Power readings: the latest on the host row, history in minute/hour buckets.

`power_record` adds a reading to its minute bucket with one conditional
UPDATE (a sum and a count per meter), so concurrent frames never lose a
sample; `power_rollup` folds old minute buckets into hour buckets and drops
what is past retention. Both are idempotent.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F, QuerySet, Sum
from django.utils import timezone

from hearth_agent import protocol
from hearth_agent.policy import PowerState
from marketplace.hosts.models import Host, PowerSample

METERS = ("gpu_w", "battery_soc_pct", "solar_w", "grid_w", "load_w")
MINUTE_RETENTION = timedelta(days=2)
HOUR_RETENTION = timedelta(days=400)


def power_latest(host: Host) -> PowerState | None:
    """The host's last reading, or None when it never sent one."""
    if host.power_at is None:
        return None
    return PowerState(**{meter: getattr(host, meter) for meter in METERS})


def _bucket(at: datetime, resolution_s: int) -> datetime:
    epoch = int(at.timestamp())
    return datetime.fromtimestamp(epoch - epoch % resolution_s, tz=at.tzinfo)


def power_record(
    *, host_id: uuid.UUID, channel_name: str, payload: protocol.PowerPayload, at: datetime
) -> None:
    """Keep the reading on the host (for dispatch) and in its minute bucket (for charts)."""
    Host.objects.filter(pk=host_id, channel_name=channel_name).update(
        power_source=payload.source,
        power_at=at,
        agent_work_allowed=payload.work_allowed,
        agent_work_reason=payload.reason[:200],
        last_seen_at=at,
        **{meter: getattr(payload, meter) for meter in METERS},
    )
    increments: dict[str, Any] = {"samples": F("samples") + 1}
    for meter in METERS:
        value = getattr(payload, meter)
        if value is not None:
            increments[f"{meter}_sum"] = F(f"{meter}_sum") + value
            increments[f"{meter}_n"] = F(f"{meter}_n") + 1
    bucket = {
        "host_id": host_id,
        "resolution_s": PowerSample.MINUTE,
        "bucket_start": _bucket(at, PowerSample.MINUTE),
    }
    for _attempt in range(2):
        if PowerSample.objects.filter(**bucket).update(**increments):
            return
        try:
            with transaction.atomic():
                PowerSample.objects.create(**bucket)
        except IntegrityError:
            pass  # another frame created the bucket first; add to it on the next pass


@transaction.atomic
def power_rollup(*, now: datetime | None = None) -> int:
    """Fold minute buckets older than two days into hour buckets; drop hours past a year."""
    now = now or timezone.now()
    cutoff = _bucket(now - MINUTE_RETENTION, PowerSample.HOUR)
    old = PowerSample.objects.filter(resolution_s=PowerSample.MINUTE, bucket_start__lt=cutoff)
    sums = [f"{meter}_{part}" for meter in METERS for part in ("sum", "n")]
    folded = 0
    groups: dict[tuple[uuid.UUID, datetime], list[datetime]] = {}
    for host_id, start in old.values_list("host_id", "bucket_start"):
        groups.setdefault((host_id, _bucket(start, PowerSample.HOUR)), []).append(start)
    for (host_id, hour), starts in groups.items():
        minutes = PowerSample.objects.filter(
            host_id=host_id, resolution_s=PowerSample.MINUTE, bucket_start__in=starts
        )
        totals = minutes.aggregate(samples=Sum("samples"), **{name: Sum(name) for name in sums})
        hour_row, _ = PowerSample.objects.select_for_update().get_or_create(
            host_id=host_id, resolution_s=PowerSample.HOUR, bucket_start=hour
        )
        PowerSample.objects.filter(pk=hour_row.pk).update(
            **{name: F(name) + (totals[name] or 0) for name in ["samples", *sums]}
        )
        folded += minutes.delete()[0]
    PowerSample.objects.filter(resolution_s=PowerSample.HOUR, bucket_start__lt=now - HOUR_RETENTION).delete()
    return folded


def power_history(*, host: Host, since: datetime) -> QuerySet[PowerSample]:
    """Buckets of one host since a moment, finest resolution available first."""
    return PowerSample.objects.filter(host=host, bucket_start__gte=since).order_by(
        "bucket_start", "resolution_s"
    )
