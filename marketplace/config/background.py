"""The periodic work: lease reaper, offline sweeper, deadlines, re-benchmark requests.

Under Celery, beat schedules `marketplace.jobs.tasks.*`; in the embedded
default the ASGI process runs the same functions on an asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

logger = logging.getLogger(__name__)


def sweep_once(*, now: datetime | None = None) -> tuple[int, int]:
    """One round of the periodic work at `now` (the clock by default); (leases expired, hosts gone offline)."""
    from marketplace.billing.services import earnings_mature
    from marketplace.hosts.power import power_rollup
    from marketplace.hosts.presence import presence_store
    from marketplace.hosts.services import hosts_presence_flush, hosts_sweep_offline
    from marketplace.jobs.services import jobs_fail_past_deadline, leases_requeue_expired
    from marketplace.trust.selectors import owners_with_withheld_earnings
    from marketplace.trust.services import hosts_request_benchmark

    with presence_store().sweeping() as mine:
        if not mine:
            # Another sweep is between draining heartbeats and writing them: judged now, the hosts
            # whose beats it holds would look silent.
            logger.info("sweep skipped: another sweep is running")
            return 0, 0
        # Silence is judged as of now, taken before the heartbeats since the last sweep are written
        # (the lease and offline checks below read what that wrote): a flush that waits on a busy
        # disk must not make the beats it carries look older than they were when it took them.
        now = now or timezone.now()
        hosts_presence_flush()
        power_rollup(now=now)
        hosts_request_benchmark(now=now)
        # Pending host earnings past the verification window become available, except a quarantined
        # machine's owner's, which wait for review.
        earnings_mature(now=now, withheld_owner_ids=owners_with_withheld_earnings())
        past_deadline = jobs_fail_past_deadline(now=now)
        if past_deadline:
            logger.info("sweep: %d queued jobs failed past their deadline", past_deadline)
        return leases_requeue_expired(now=now), hosts_sweep_offline(now=now)


def payouts_once() -> int:
    from marketplace.billing.services import payouts_run

    return payouts_run(now=timezone.now())


async def run_forever() -> None:
    payouts_due = time.monotonic() + settings.HEARTH_PAYOUT_INTERVAL_S
    while True:
        await asyncio.sleep(settings.HEARTH_SWEEP_INTERVAL_S)
        if time.monotonic() >= payouts_due:
            payouts_due = time.monotonic() + settings.HEARTH_PAYOUT_INTERVAL_S
            try:
                # Idempotent: a payout whose Stripe answer timed out is re-sent with its own key.
                await database_sync_to_async(payouts_once)()
            except Exception:
                logger.exception("payouts failed; retrying next interval")
        try:
            expired, offline = await database_sync_to_async(sweep_once)()
            if expired or offline:
                logger.info(
                    "sweep: %d expired leases requeued, %d silent hosts marked offline", expired, offline
                )
        except Exception:
            logger.exception("background sweep failed; retrying next interval")
