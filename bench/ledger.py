"""The ledger under concurrency vs a naive single-entry baseline, side by side, same operations.

    python -m bench.ledger [--buyers 4] [--rounds 60] [--payout-runners 2]

Buyer threads each run `rounds` of: a top-up whose webhook arrives twice, a hold
(job submit), two verified runs (one reported twice), a release (job end). Payout
threads keep maturing earnings and running payouts against the local fake Stripe,
whose first transfer responses arrive after the client timed out. Every thread
has its own database connection. Then the same plan runs against the baseline:
balances in one table, read-then-write without locks, transactions or
idempotency keys (what a first version often looks like).

PostgreSQL: DATABASE_URL's server (a scratch database is created and dropped),
or, without DATABASE_URL, a throwaway cluster started here on a free loopback port.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._pg import scratch_database, setup_django, throwaway_postgres

TOPUP_MINOR = 5_000
HOLD_MINOR = 3_000
CAPTURE_MINOR = (1_000, 700)
THRESHOLD_MINOR = 1_000


# ---- the plan, run against either implementation ----------------------------------


@dataclass
class Figures:
    operations: int = 0
    seconds: float = 0.0
    imbalance_minor_units: int = 0
    double_credits: int = 0
    double_payouts: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "operations": self.operations,
            "imbalance_minor_units": self.imbalance_minor_units,
            "double_credits": self.double_credits,
            "double_payouts": self.double_payouts,
            "ops_per_s": round(self.operations / self.seconds, 1) if self.seconds else 0.0,
            "seconds": round(self.seconds, 2),
            "errors": dict(self.errors),
        }


class Implementation:
    name = ""

    def topup_delivered(self, buyer: Any, session: str, amount: int) -> None: ...
    def hold(self, buyer: Any, job: str, amount: int) -> bool:
        raise NotImplementedError

    def capture(self, buyer: Any, host: Any, job: str, run: str, amount: int) -> None: ...
    def release(self, buyer: Any, job: str) -> None: ...
    def payouts(self) -> None: ...
    def audit(self, figures: Figures, sessions: dict[str, int]) -> None: ...


def run_plan(
    impl: Implementation, buyers: list[Any], hosts: list[Any], rounds: int, payout_runners: int
) -> Figures:
    from django.db import connection

    figures = Figures()
    sessions: dict[str, int] = {}
    count_lock = threading.Lock()
    done = threading.Event()

    def counted(kind: str, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except Exception as exc:  # the baseline has no answer for some races; count them
            with count_lock:
                figures.errors[f"{kind}: {type(exc).__name__}"] += 1
            return None
        finally:
            with count_lock:
                figures.operations += 1

    def buyer_loop(index: int) -> None:
        buyer = buyers[index]
        try:
            for round_ in range(rounds):
                session = f"cs_bench_{impl.name}_{index}_{round_}"
                with count_lock:
                    sessions[session] = TOPUP_MINOR
                for _ in range(2):  # Stripe delivers webhooks at least once
                    counted("topup", impl.topup_delivered, buyer, session, TOPUP_MINOR)
                job = str(uuid.uuid4())
                if not counted("hold", impl.hold, buyer, job, HOLD_MINOR):
                    continue
                for number, amount in enumerate(CAPTURE_MINOR):
                    host = hosts[(index + number) % len(hosts)]
                    run = str(uuid.uuid4())
                    for _ in range(2 if number == 0 else 1):  # a verdict reported twice
                        counted("capture", impl.capture, buyer, host, job, run, amount)
                counted("release", impl.release, buyer, job)
        finally:
            connection.close()

    def payout_loop() -> None:
        try:
            while not done.is_set():
                counted("payouts", impl.payouts)
                time.sleep(0.01)
            counted("payouts", impl.payouts)
        finally:
            connection.close()

    started = time.perf_counter()
    payers = [threading.Thread(target=payout_loop) for _ in range(payout_runners)]
    workers = [threading.Thread(target=buyer_loop, args=(i,)) for i in range(len(buyers))]
    for thread in [*payers, *workers]:
        thread.start()
    for thread in workers:
        thread.join()
    done.set()
    for thread in payers:
        thread.join()
    # Settle what is still in flight (a payout whose answer timed out), as the next beat would.
    for _ in range(3):
        impl.payouts()
    figures.seconds = time.perf_counter() - started
    impl.audit(figures, sessions)
    return figures


class Ledger(Implementation):
    name = "ledger"

    def __init__(self, fake: Any) -> None:
        self.fake = fake

    def topup_delivered(self, buyer: Any, session: str, amount: int) -> None:
        # The core of the checkout.session.completed handler once Stripe says "paid".
        from marketplace.billing.ledger import account_get, ledger_post

        ledger_post(
            kind="topup",
            idempotency_key=f"topup:{session}",
            legs=[
                (account_get(kind="stripe_clearing"), -amount),
                (account_get(kind="buyer_credit", owner=buyer), amount),
            ],
            stripe_id=session,
        )

    def hold(self, buyer: Any, job: str, amount: int) -> bool:
        from marketplace.billing.services import escrow_hold

        escrow_hold(job_id=job, buyer=buyer, amount_minor=amount)
        return True

    def capture(self, buyer: Any, host: Any, job: str, run: str, amount: int) -> None:
        from marketplace.billing.services import escrow_capture

        escrow_capture(
            run_id=run,
            job_id=job,
            buyer=buyer,
            host_owner=host,
            host_id=f"host-{host.pk}",
            amount_minor=amount,
        )

    def release(self, buyer: Any, job: str) -> None:
        from marketplace.billing.services import escrow_release

        escrow_release(job_id=job, buyer=buyer)

    def payouts(self) -> None:
        from django.utils import timezone

        from marketplace.billing.services import earnings_mature, payouts_run

        earnings_mature(now=timezone.now())
        payouts_run(now=timezone.now())

    def audit(self, figures: Figures, sessions: dict[str, int]) -> None:
        from django.db.models import Sum

        from marketplace.billing.models import Account, Entry, LedgerTransaction, Payout

        unbalanced = Entry.objects.values("transaction_id").annotate(t=Sum("amount")).exclude(t=0)
        figures.imbalance_minor_units = sum(abs(int(row["t"])) for row in unbalanced)
        figures.imbalance_minor_units += abs(int(Entry.objects.aggregate(s=Sum("amount"))["s"] or 0))
        paid_in = sum(sessions.values())
        keys = set(Payout.objects.values_list("idempotency_key", flat=True))
        transfers = [t for t in self.fake.of_type("transfer") if t["transfer_group"] in keys]
        paid_out = sum(t["amount"] for t in transfers)
        held = int(
            Account.objects.exclude(kind="stripe_clearing").aggregate(s=Sum("balance"))["s"] or 0
        )  # credit + escrow + pending + available + in transit + fees
        figures.imbalance_minor_units += abs(paid_in - (held + paid_out))
        credits = LedgerTransaction.objects.filter(kind="topup").count()
        figures.double_credits = credits - len(sessions)
        per_group = Counter(t["transfer_group"] for t in transfers)
        figures.double_payouts = sum(n - 1 for n in per_group.values()) + max(
            0, LedgerTransaction.objects.filter(kind="payout_settle").count() - len(per_group)
        )


class Naive(Implementation):
    """Single-entry balances, read then write, no locks, no idempotency keys."""

    name = "naive"

    def __init__(self, fake: Any) -> None:
        from django.db import connection

        self.fake = fake
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE bench_naive_balance (owner_id bigint, kind text, balance bigint NOT NULL DEFAULT 0,"
                " PRIMARY KEY (owner_id, kind))"
            )
            cursor.execute("CREATE TABLE bench_naive_credit (session text)")

    def _get(self, owner: int, kind: str) -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO bench_naive_balance VALUES (%s, %s, 0) ON CONFLICT DO NOTHING", [owner, kind]
            )
            cursor.execute(
                "SELECT balance FROM bench_naive_balance WHERE owner_id = %s AND kind = %s", [owner, kind]
            )
            return int(cursor.fetchone()[0])

    def _set(self, owner: int, kind: str, value: int) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE bench_naive_balance SET balance = %s WHERE owner_id = %s AND kind = %s",
                [value, owner, kind],
            )

    def topup_delivered(self, buyer: Any, session: str, amount: int) -> None:
        from django.db import connection

        self._set(buyer.pk, "credit", self._get(buyer.pk, "credit") + amount)
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO bench_naive_credit VALUES (%s)", [session])

    def hold(self, buyer: Any, job: str, amount: int) -> bool:
        credit = self._get(buyer.pk, "credit")
        if credit < amount:
            return False
        self._set(buyer.pk, "credit", credit - amount)
        self._set(buyer.pk, "escrow", self._get(buyer.pk, "escrow") + amount)
        return True

    def capture(self, buyer: Any, host: Any, job: str, run: str, amount: int) -> None:
        fee = amount * 1500 // 10_000
        self._set(buyer.pk, "escrow", self._get(buyer.pk, "escrow") - amount)
        self._set(host.pk, "available", self._get(host.pk, "available") + amount - fee)
        self._set(0, "fees", self._get(0, "fees") + fee)

    def release(self, buyer: Any, job: str) -> None:
        # Without per-job tracking the baseline releases what it computes the job has left.
        left = HOLD_MINOR - sum(CAPTURE_MINOR)
        self._set(buyer.pk, "escrow", self._get(buyer.pk, "escrow") - left)
        self._set(buyer.pk, "credit", self._get(buyer.pk, "credit") + left)

    def payouts(self) -> None:
        import stripe

        from marketplace.billing.models import ConnectAccount
        from marketplace.billing.stripe_api import stripe_client

        for connect in ConnectAccount.objects.filter(payouts_enabled=True):
            available = self._get(connect.owner_id, "available")
            if available < THRESHOLD_MINOR:
                continue
            group = f"naive-{uuid.uuid4()}"
            params: Any = {
                "amount": available,
                "currency": "usd",
                "destination": connect.stripe_account_id,
                "transfer_group": group,
            }
            for _ in range(3):  # retry on timeout, without an idempotency key
                try:
                    stripe_client().v1.transfers.create(params=params)
                    break
                except stripe.APIConnectionError:
                    continue
            self._set(connect.owner_id, "available", self._get(connect.owner_id, "available") - available)

    def audit(self, figures: Figures, sessions: dict[str, int]) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT COALESCE(SUM(balance), 0) FROM bench_naive_balance")
            held = int(cursor.fetchone()[0])
            cursor.execute("SELECT COUNT(*) FROM bench_naive_credit")
            credits = int(cursor.fetchone()[0])
        transfers = [
            t for t in self.fake.of_type("transfer") if str(t["transfer_group"]).startswith("naive-")
        ]
        paid_out = sum(t["amount"] for t in transfers)
        figures.imbalance_minor_units = abs(sum(sessions.values()) - (held + paid_out))
        figures.double_credits = credits - len(sessions)
        per_group = Counter(t["transfer_group"] for t in transfers)
        figures.double_payouts = sum(n - 1 for n in per_group.values())


# ---- main ---------------------------------------------------------------------------


def _people(fake: Any, buyers: int, hosts: int) -> tuple[list[Any], list[Any]]:
    from marketplace.accounts.models import User
    from marketplace.billing.services import connect_account_sync, connect_onboarding_start

    made_buyers = [
        User.objects.create(username=f"b{i}@bench", email=f"b{i}@bench", role="buyer") for i in range(buyers)
    ]
    made_hosts = [
        User.objects.create(username=f"h{i}@bench", email=f"h{i}@bench", role="host") for i in range(hosts)
    ]
    for owner in made_hosts:
        account, _ = connect_onboarding_start(owner=owner)
        fake.enable_payouts(account.stripe_account_id)
        connect_account_sync(stripe_account_id=account.stripe_account_id)
    return made_buyers, made_hosts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--buyers", type=int, default=4)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--payout-runners", type=int, default=2)
    parser.add_argument(
        "--timeouts", type=int, default=2, help="transfer responses that arrive after the timeout"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    from marketplace.billing.fake_stripe import FakeStripe

    fake = FakeStripe().start()
    os.environ.update(
        HEARTH_STRIPE_API_KEY="sk_test_bench",
        HEARTH_STRIPE_API_BASE=fake.api_base,
        HEARTH_STRIPE_TIMEOUT_S="0.3",
        HEARTH_STRIPE_MAX_NETWORK_RETRIES="0",
        HEARTH_PLATFORM_FEE_PCT="15",
        HEARTH_EARNINGS_HOLD_S="0",
        HEARTH_PAYOUT_THRESHOLD_MINOR=str(THRESHOLD_MINOR),
    )
    server = os.environ.get("DATABASE_URL")
    with contextlib.ExitStack() as stack:
        if not server:
            server = stack.enter_context(throwaway_postgres())
            print(f"started a throwaway PostgreSQL at {server}", file=sys.stderr)
        database = stack.enter_context(scratch_database(server))
        setup_django(database)
        buyers, hosts = _people(fake, args.buyers, args.hosts)

        results: dict[str, Figures] = {}
        for impl in (Ledger(fake), Naive(fake)):
            fake.hold_transfer_responses(args.timeouts, seconds=0.6)
            results[impl.name] = run_plan(impl, buyers, hosts, args.rounds, args.payout_runners)
        fake.stop()

    ledger, naive = results["ledger"].as_json(), results["naive"].as_json()
    print(f"{'':24}{'ledger':>14}{'naive baseline':>18}")
    for key in (
        "operations",
        "seconds",
        "ops_per_s",
        "imbalance_minor_units",
        "double_credits",
        "double_payouts",
    ):
        print(f"{key:24}{ledger[key]!s:>14}{naive[key]!s:>18}")
    if naive["errors"] or ledger["errors"]:
        print(f"errors: ledger {ledger['errors']}, naive {naive['errors']}")
    print(
        json.dumps(
            {
                **{
                    k: ledger[k]
                    for k in (
                        "operations",
                        "imbalance_minor_units",
                        "double_credits",
                        "double_payouts",
                        "ops_per_s",
                    )
                },
                "errors": sum(ledger["errors"].values()),
                "baseline": {
                    k: naive[k]
                    for k in (
                        "operations",
                        "imbalance_minor_units",
                        "double_credits",
                        "double_payouts",
                        "ops_per_s",
                    )
                },
                "threads": {"buyers": args.buyers, "payout_runners": args.payout_runners},
            }
        )
    )


if __name__ == "__main__":
    main()
