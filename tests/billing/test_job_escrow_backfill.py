"""The migration that adds each job's escrow balance fills it from the ledger posted before it."""

from __future__ import annotations

from typing import Any

from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor

BEFORE = [("billing", "0003_alter_ledgertransaction_kind")]
AFTER = [("billing", "0004_job_escrow")]


def _post(apps: Any, key: str, job_id: str, legs: list[tuple[Any, int]]) -> None:
    LedgerTransaction = apps.get_model("billing", "LedgerTransaction")
    Entry = apps.get_model("billing", "Entry")
    Account = apps.get_model("billing", "Account")
    with transaction.atomic():  # PostgreSQL checks at commit that a transaction's entries sum to 0
        posted = LedgerTransaction.objects.create(kind="adjustment", idempotency_key=key, job_id=job_id)
        for account, amount in legs:
            Entry.objects.create(transaction=posted, account=account, amount=amount)
            Account.objects.filter(pk=account.pk).update(balance=account.balance + amount)
            account.refresh_from_db()


def test_the_migration_fills_each_jobs_escrow_from_the_entries_posted_before_it(transactional_db):
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    apps = executor.loader.project_state(BEFORE).apps
    User = apps.get_model("accounts", "User")
    Account = apps.get_model("billing", "Account")
    buyer = User.objects.create(username="backfill@example.com", email="backfill@example.com")
    other = User.objects.create(username="backfill2@example.com", email="backfill2@example.com")
    credit = Account.objects.create(kind="buyer_credit", owner=buyer, currency="usd")
    escrow = Account.objects.create(kind="buyer_escrow", owner=buyer, currency="usd")
    other_escrow = Account.objects.create(kind="buyer_escrow", owner=other, currency="usd")
    fees = Account.objects.create(kind="platform_fees", currency="usd")
    _post(apps, "grant", "", [(fees, -5_000), (credit, 5_000)])
    _post(apps, "hold-a", "job-a", [(credit, -1_000), (escrow, 1_000)])
    _post(apps, "capture-a1", "job-a", [(escrow, -300), (fees, 300)])
    _post(apps, "capture-a2", "job-a", [(escrow, -200), (fees, 200)])
    _post(apps, "hold-b", "job-b", [(credit, -400), (escrow, 400)])
    _post(apps, "release-b", "job-b", [(escrow, -400), (credit, 400)])
    _post(apps, "hold-c", "job-c", [(fees, -90), (other_escrow, 90)])

    executor = MigrationExecutor(connection)
    executor.migrate(AFTER)

    JobEscrow = executor.loader.project_state(AFTER).apps.get_model("billing", "JobEscrow")
    assert {(e.account_id, e.job_id): e.left for e in JobEscrow.objects.all()} == {
        (escrow.pk, "job-a"): 500,
        (escrow.pk, "job-b"): 0,
        (other_escrow.pk, "job-c"): 90,
    }
