"""PostgreSQL enforces the ledger's rules even behind the services' back."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connection, transaction

from marketplace.billing.ledger import account_get, ledger_post
from marketplace.billing.models import Account, Entry, LedgerTransaction
from tests.billing.conftest import requires_postgres

pytestmark = requires_postgres
K = Account.Kind


def _check_deferred_constraints_now():
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")


def test_an_unbalanced_transaction_inserted_directly_is_rejected_at_commit(buyer):
    credit = account_get(kind=K.BUYER_CREDIT, owner=buyer)
    with pytest.raises(DatabaseError, match="unbalanced"), transaction.atomic():
        forged = LedgerTransaction.objects.create(kind="adjustment", idempotency_key="behind-the-back")
        Entry.objects.create(transaction=forged, account=credit, amount=1_000_000)
        _check_deferred_constraints_now()
    assert not LedgerTransaction.objects.filter(idempotency_key="behind-the-back").exists()


def test_a_balanced_transaction_inserted_entry_by_entry_is_accepted(buyer):
    credit = account_get(kind=K.BUYER_CREDIT, owner=buyer)
    clearing = account_get(kind=K.STRIPE_CLEARING)
    with transaction.atomic():
        tx = LedgerTransaction.objects.create(kind="adjustment", idempotency_key="two-steps")
        Entry.objects.create(transaction=tx, account=credit, amount=10)
        Entry.objects.create(transaction=tx, account=clearing, amount=-10)  # balanced again before commit
        _check_deferred_constraints_now()
    assert Entry.objects.filter(transaction=tx).count() == 2


def test_entries_cannot_be_updated_or_deleted(buyer):
    credit = account_get(kind=K.BUYER_CREDIT, owner=buyer)
    clearing = account_get(kind=K.STRIPE_CLEARING)
    ledger_post(kind="topup", idempotency_key="k", legs=[(clearing, -50), (credit, 50)])
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        Entry.objects.filter(account=credit).update(amount=5000)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        Entry.objects.filter(account=credit).delete()
    assert Entry.objects.get(account=credit).amount == 50
