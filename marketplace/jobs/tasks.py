"""Celery tasks: thin wrappers over idempotent services (safe to run twice)."""

from __future__ import annotations

from celery import shared_task

from marketplace.config.background import sweep_once


@shared_task(name="marketplace.jobs.tasks.sweep", ignore_result=True)
def sweep() -> dict[str, int]:
    expired, offline = sweep_once()
    return {"expired_leases_requeued": expired, "hosts_marked_offline": offline}
