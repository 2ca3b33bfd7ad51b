"""The billing REST API: top-ups, the Stripe webhook, Connect onboarding, balances, payouts, statements."""

from __future__ import annotations

import csv
import io
from typing import Any

from django.http import Http404
from rest_framework import exceptions, renderers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.accounts.authentication import request_user
from marketplace.accounts.models import User
from marketplace.billing import selectors
from marketplace.billing.models import Payout, TopUp
from marketplace.billing.services import (
    WebhookRejected,
    check_topup_amount,
    connect_onboarding_start,
    stripe_webhook_receive,
    topup_create,
)
from marketplace.hosts.selectors import host_list_for_owner


class CSVRenderer(renderers.BaseRenderer):
    """A list of flat dicts as CSV (`?format=csv`), header from the first row's keys."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> bytes:
        rows = data if isinstance(data, list) else [data]
        out = io.StringIO()
        if rows:
            writer = csv.DictWriter(out, fieldnames=list(rows[0].keys()), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return out.getvalue().encode()


def _topup_json(topup: TopUp) -> dict[str, Any]:
    return {
        "id": topup.pk,
        "amount_minor": topup.amount_minor,
        "currency": topup.currency,
        "status": topup.status,
        "checkout_url": topup.checkout_url,
        "session_id": topup.session_id,
        "credited_minor": topup.credited_minor,
        "refunded_minor": topup.refunded_minor,
        "created_at": topup.created_at,
    }


def _payout_json(payout: Payout) -> dict[str, Any]:
    return {
        "id": payout.pk,
        "amount_minor": payout.amount_minor,
        "currency": payout.currency,
        "status": payout.status,
        "transfer_id": payout.transfer_id,
        "attempts": payout.attempts,
        "created_at": payout.created_at,
        "updated_at": payout.updated_at,
    }


class TopUpListCreateApi(APIView):
    def get(self, request: Request) -> Response:
        return Response(
            [_topup_json(t) for t in selectors.topup_list_for_user(user=request_user(request))[:100]]
        )

    def post(self, request: Request) -> Response:
        data: Any = request.data
        if not isinstance(data, dict) or "amount_minor" not in data:
            raise exceptions.ValidationError(
                {"amount_minor": ["amount_minor is required (an integer of cents)"]}
            )
        amount = check_topup_amount(data["amount_minor"])
        topup = topup_create(user=request_user(request), amount_minor=amount)
        return Response(_topup_json(topup), status=status.HTTP_201_CREATED)


class StripeWebhookApi(APIView):
    """Stripe calls this; the signature is the authentication."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def post(self, request: Request) -> Response:
        try:
            event = stripe_webhook_receive(
                payload=request.body, signature=request.META.get("HTTP_STRIPE_SIGNATURE")
            )
        except WebhookRejected as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_400_BAD_REQUEST)
        return Response({"received": event.event_id, "processed": event.processed_at is not None})


class ConnectOnboardingApi(APIView):
    def post(self, request: Request) -> Response:
        user = request_user(request)
        if user.role != User.Role.HOST:
            raise exceptions.PermissionDenied("only GPU owners (role host) receive payouts")
        account, url = connect_onboarding_start(owner=user)
        return Response(
            {
                "account_id": account.stripe_account_id,
                "onboarding_url": url,
                "payouts_enabled": account.payouts_enabled,
            }
        )


class BalanceApi(APIView):
    def get(self, request: Request) -> Response:
        return Response(selectors.balances_for_user(user=request_user(request)))


class PayoutListApi(APIView):
    def get(self, request: Request) -> Response:
        return Response(
            [_payout_json(p) for p in selectors.payout_list_for_owner(owner=request_user(request))[:200]]
        )


class PayoutDetailApi(APIView):
    def get(self, request: Request, payout_id: int) -> Response:
        payout = selectors.payout_list_for_owner(owner=request_user(request)).filter(pk=payout_id).first()
        if payout is None:
            raise Http404("no such payout")
        return Response(_payout_json(payout))


class _StatementApi(APIView):
    renderer_classes = [renderers.JSONRenderer, CSVRenderer]
    filename = "statement"

    def rows(self, user: User) -> list[dict[str, Any]]:
        raise NotImplementedError

    def get(self, request: Request) -> Response:
        response = Response(self.rows(request_user(request)))
        if request.accepted_renderer.format == "csv":
            response["Content-Disposition"] = f'attachment; filename="{self.filename}.csv"'
        return response


class UsageByJobApi(_StatementApi):
    filename = "usage-by-job"

    def rows(self, user: User) -> list[dict[str, Any]]:
        return selectors.usage_by_job(buyer=user)


class UsageByMonthApi(_StatementApi):
    filename = "usage-by-month"

    def rows(self, user: User) -> list[dict[str, Any]]:
        return selectors.usage_by_month(buyer=user)


class EarningsByDayApi(_StatementApi):
    filename = "earnings-by-day"

    def rows(self, user: User) -> list[dict[str, Any]]:
        return selectors.earnings_by_day(owner=user)


class EarningsByMachineApi(_StatementApi):
    filename = "earnings-by-machine"

    def rows(self, user: User) -> list[dict[str, Any]]:
        names = {str(host.pk): host.name for host in host_list_for_owner(owner=user)}
        return selectors.earnings_by_machine(owner=user, host_names=names)
