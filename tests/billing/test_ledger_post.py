"""ledger_post: balanced, integer, single-currency, idempotent, never below zero where that is forbidden."""

from __future__ import annotations

import pytest

from marketplace.billing.ledger import LedgerError, NegativeBalance, account_get, ledger_post
from marketplace.billing.models import Account, Entry, LedgerTransaction
from tests.billing.conftest import assert_ledger_sound

K = Account.Kind


@pytest.fixture
def accounts(buyer):
    return (
        account_get(kind=K.STRIPE_CLEARING),
        account_get(kind=K.BUYER_CREDIT, owner=buyer),
        account_get(kind=K.BUYER_ESCROW, owner=buyer),
    )


def test_a_balanced_transaction_moves_the_balances(accounts):
    clearing, credit, _ = accounts
    ledger_post(kind="topup", idempotency_key="k1", legs=[(clearing, -700), (credit, 700)])
    credit.refresh_from_db()
    clearing.refresh_from_db()
    assert (credit.balance, clearing.balance) == (700, -700)
    assert_ledger_sound()


def test_an_unbalanced_transaction_is_refused_and_nothing_is_stored(accounts):
    clearing, credit, _ = accounts
    with pytest.raises(LedgerError, match="sum to 1"):
        ledger_post(kind="topup", idempotency_key="k1", legs=[(clearing, -699), (credit, 700)])
    assert not LedgerTransaction.objects.exists()
    assert not Entry.objects.exists()


@pytest.mark.parametrize("amount", [7.0, "7", True])
def test_amounts_must_be_integer_minor_units(accounts, amount):
    clearing, credit, _ = accounts
    with pytest.raises(LedgerError, match="integer minor units"):
        ledger_post(kind="topup", idempotency_key="k1", legs=[(clearing, -7), (credit, amount)])


def test_posting_the_same_key_twice_returns_the_first_transaction_and_changes_nothing(accounts):
    clearing, credit, _ = accounts
    first = ledger_post(kind="topup", idempotency_key="k1", legs=[(clearing, -500), (credit, 500)])
    again = ledger_post(kind="topup", idempotency_key="k1", legs=[(clearing, -900), (credit, 900)])
    credit.refresh_from_db()
    assert again.pk == first.pk
    assert credit.balance == 500
    assert Entry.objects.count() == 2


def test_a_buyer_balance_cannot_go_negative(accounts):
    clearing, credit, escrow = accounts
    ledger_post(kind="topup", idempotency_key="k1", legs=[(clearing, -100), (credit, 100)])
    with pytest.raises(NegativeBalance):
        ledger_post(kind="hold", idempotency_key="k2", legs=[(credit, -101), (escrow, 101)])
    credit.refresh_from_db()
    assert credit.balance == 100
    assert LedgerTransaction.objects.count() == 1


def test_the_platform_clearing_account_may_go_negative(accounts):
    clearing, credit, _ = accounts
    ledger_post(kind="topup", idempotency_key="k1", legs=[(clearing, -100), (credit, 100)])
    clearing.refresh_from_db()
    assert clearing.balance == -100


def test_one_transaction_cannot_mix_currencies(buyer, accounts):
    clearing, _, _ = accounts
    euros = account_get(kind=K.BUYER_CREDIT, owner=buyer, currency="eur")
    with pytest.raises(LedgerError, match="currencies"):
        ledger_post(kind="topup", idempotency_key="k1", legs=[(clearing, -100), (euros, 100)])


def test_platform_accounts_have_no_owner_and_owned_accounts_need_one(buyer):
    with pytest.raises(LedgerError):
        account_get(kind=K.PLATFORM_FEES, owner=buyer)
    with pytest.raises(LedgerError):
        account_get(kind=K.BUYER_CREDIT)
    assert (
        account_get(kind=K.BUYER_CREDIT, owner=buyer).pk == account_get(kind=K.BUYER_CREDIT, owner=buyer).pk
    )
