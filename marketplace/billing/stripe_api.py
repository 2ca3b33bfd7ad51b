"""The one place the `stripe` client is configured.

All calls go through `stripe_client()`: API key, base URL (the local fake in tests
and the demo), timeout and retries come from settings. Every POST we make passes
our own idempotency key, so the client's automatic retries can never double a
charge, an account or a transfer.
"""

from __future__ import annotations

from functools import lru_cache

import stripe
from django.conf import settings


class StripeNotConfigured(RuntimeError):
    pass


@lru_cache(maxsize=4)
def _client(api_key: str, api_base: str, timeout_s: float, retries: int) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base, "connect": api_base},
        max_network_retries=retries,
        http_client=stripe.RequestsClient(timeout=timeout_s),
    )


def stripe_client() -> stripe.StripeClient:
    if not settings.HEARTH_STRIPE_API_KEY:
        raise StripeNotConfigured("HEARTH_STRIPE_API_KEY is not set")
    return _client(
        settings.HEARTH_STRIPE_API_KEY,
        settings.HEARTH_STRIPE_API_BASE.rstrip("/"),
        settings.HEARTH_STRIPE_TIMEOUT_S,
        settings.HEARTH_STRIPE_MAX_NETWORK_RETRIES,
    )


def is_retryable(exc: stripe.StripeError) -> bool:
    """True when the outcome is unknown or transient: try again later with the same key.

    A timeout or dropped connection may hide a success; 409 is an idempotent request
    still in flight; 429 and 5xx are Stripe's way of saying "later".
    """
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError):
        return True
    status = exc.http_status or 0
    return status == 409 or status >= 500 or isinstance(exc, stripe.AuthenticationError)
