"""The operator's Django admin: hosts can be quarantined and lifted, money records are read-only."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from marketplace.billing.models import Account, JobEscrow, LedgerTransaction
from marketplace.billing.services import credit_grant, escrow_hold
from marketplace.hosts.models import Host
from tests.factories import HostFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator() -> Client:
    client = Client()
    staff: Any = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(staff)
    return client


def test_an_operator_sees_the_ledger_but_cannot_add_change_or_delete_a_transaction(operator: Client) -> None:
    buyer: Any = UserFactory(role="buyer")
    credit_grant(user=buyer, amount_minor=700, key="admin-test", memo="trial")
    txn = LedgerTransaction.objects.get(idempotency_key="grant:admin-test")
    listing = operator.get("/admin/billing/ledgertransaction/")
    assert listing.status_code == 200 and b"grant:admin-test" in listing.content
    assert operator.get("/admin/billing/ledgertransaction/add/").status_code == 403
    assert (
        operator.post(f"/admin/billing/ledgertransaction/{txn.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    change = operator.post(f"/admin/billing/ledgertransaction/{txn.pk}/change/", {"memo": "edited"})
    assert change.status_code == 403 or b"edited" not in change.content
    assert LedgerTransaction.objects.filter(pk=txn.pk).exists()
    balances = {a.pk: a.balance for a in Account.objects.all()}
    for account_id in balances:
        operator.post(f"/admin/billing/account/{account_id}/change/", {"balance": "999999"})
    assert {a.pk: a.balance for a in Account.objects.all()} == balances


def test_an_operator_quarantines_a_host_and_lifts_it_from_the_host_list(operator: Client) -> None:
    host: Any = HostFactory()
    operator.post("/admin/hosts/host/", {"action": "quarantine_hosts", "_selected_action": [str(host.pk)]})
    host.refresh_from_db()
    assert host.quarantined_at is not None
    operator.post("/admin/hosts/host/", {"action": "lift_quarantine", "_selected_action": [str(host.pk)]})
    assert Host.objects.get(pk=host.pk).quarantined_at is None


def test_an_operator_sees_each_jobs_escrow_but_cannot_change_it(operator: Client) -> None:
    buyer: Any = UserFactory(role="buyer")
    credit_grant(user=buyer, amount_minor=900, key="admin-escrow", memo="trial")
    escrow_hold(job_id="job-in-admin", buyer=buyer, amount_minor=600)
    held = JobEscrow.objects.get(job_id="job-in-admin")
    listing = operator.get("/admin/billing/jobescrow/?q=job-in-admin")
    assert listing.status_code == 200 and b"job-in-admin" in listing.content and b"600" in listing.content
    assert operator.get("/admin/billing/jobescrow/add/").status_code == 403
    operator.post(f"/admin/billing/jobescrow/{held.pk}/change/", {"left": "999999"})
    assert operator.post(f"/admin/billing/jobescrow/{held.pk}/delete/", {"post": "yes"}).status_code == 403
    assert JobEscrow.objects.get(pk=held.pk).left == 600
