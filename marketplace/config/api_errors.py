"""One error shape for the API: `{"field": ["message"]}` or `{"detail": "..."}`.

Services raise Django's ValidationError keyed by field; this turns it into a
400 so views stay thin. Billing's InsufficientCredit becomes 402 naming the
shortfall, wherever it is raised (e.g. escrow_hold inside job submit).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from marketplace.billing.errors import InsufficientCredit, StripeUnavailable


class PayloadTooLarge(exceptions.APIException):
    status_code = 413
    default_detail = "request is too large"
    default_code = "payload_too_large"


class Conflict(exceptions.APIException):
    status_code = 409
    default_detail = "the object is not in a state that allows this"
    default_code = "conflict"


def pydantic_errors_by_field(exc: Any) -> dict[str, list[str]]:
    """A pydantic ValidationError as `{"field": ["message"]}`."""
    errors: dict[str, list[str]] = {}
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "detail"
        errors.setdefault(field, []).append(str(error["msg"]))
    return errors


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, InsufficientCredit):
        return Response(
            {"detail": str(exc), "shortfall_minor": exc.shortfall_minor, "currency": exc.currency},
            status=402,
        )
    if isinstance(exc, StripeUnavailable):
        exc = exceptions.APIException(str(exc))
        exc.status_code = 503
    if isinstance(exc, DjangoValidationError):
        detail: Any = exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}
        exc = exceptions.ValidationError(detail)
    return drf_exception_handler(exc, context)
