"""The Celery app; beat runs the periodic sweeps when Redis is configured."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.config.settings")

app = Celery("hearth")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["marketplace.jobs", "marketplace.billing", "marketplace.matching"])


@app.on_after_finalize.connect
def _schedule(sender: Celery, **kwargs: object) -> None:
    from django.conf import settings

    interval = settings.HEARTH_SWEEP_INTERVAL_S
    sender.add_periodic_task(interval, sender.signature("marketplace.jobs.tasks.sweep"), name="sweep")
    # Idempotent: a payout whose Stripe answer timed out is re-sent with its own key next time.
    sender.add_periodic_task(
        settings.HEARTH_PAYOUT_INTERVAL_S,
        sender.signature("marketplace.billing.tasks.payouts_run"),
        name="payouts",
    )


@worker_init.connect
def _collect_garbage_like_the_server(**kwargs: object) -> None:
    """The worker runs the dispatch rounds, which make tens of thousands of rows and views each: with
    CPython's thresholds they were promoted into full collections that stopped a round for 0.7 to
    6.6 s (bench.dispatch, whose process plays this worker). Pool processes forked from it inherit this."""
    from django.conf import settings

    from marketplace.config.gc_tuning import collect_young_after

    collect_young_after(settings.HEARTH_GC_GEN0)
