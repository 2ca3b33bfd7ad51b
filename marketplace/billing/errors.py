"""Billing errors other apps may catch or the API maps to a status (no model imports here)."""

from __future__ import annotations


def format_minor(amount_minor: int, currency: str) -> str:
    """`150, "usd"` → `"1.50 USD"` (two-decimal currencies; others print minor units)."""
    if currency.lower() in {"jpy", "krw", "vnd", "clp", "isk", "huf"}:
        return f"{amount_minor} {currency.upper()}"
    sign = "-" if amount_minor < 0 else ""
    whole, cents = divmod(abs(amount_minor), 100)
    return f"{sign}{whole}.{cents:02d} {currency.upper()}"


class InsufficientCredit(Exception):
    """The buyer's credit does not cover a hold; the API answers 402 naming the shortfall."""

    def __init__(self, shortfall_minor: int, currency: str) -> None:
        self.shortfall_minor = shortfall_minor
        self.currency = currency
        super().__init__(
            f"insufficient credit: top up at least {format_minor(shortfall_minor, currency)} "
            f"(shortfall_minor={shortfall_minor})"
        )


class EscrowExhausted(Exception):
    """A capture asked for more than the job still holds in escrow (the hold was too small)."""

    def __init__(self, job_id: str, wanted_minor: int, left_minor: int) -> None:
        self.job_id = job_id
        self.wanted_minor = wanted_minor
        self.left_minor = left_minor
        super().__init__(f"job {job_id} holds {left_minor} in escrow; a capture wanted {wanted_minor}")


class StripeUnavailable(Exception):
    """Stripe could not be reached or refused the request; nothing was charged."""
