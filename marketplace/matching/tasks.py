"""Celery tasks of the matcher: thin wrappers over idempotent services (safe to run twice)."""

from __future__ import annotations

from marketplace.config.celery import app
from marketplace.matching.services import tasks_claim_batch


# On the project's app, not `shared_task`: the web process enqueues this after commits, and there
# nothing else may have loaded the app that reads the broker (or eager mode) from the settings.
@app.task(name="marketplace.matching.tasks.dispatch_round", ignore_result=True)
def dispatch_round() -> int:
    """One batch round (`tasks_claim_batch`): what is queued goes to the best free hosts, each told on
    its own channel. Run twice, the second round leases only what is still queued. Returns how many
    tasks (and canaries) it leased."""
    return sum(len(assignments) for assignments in tasks_claim_batch().values())
