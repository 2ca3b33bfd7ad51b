from django.contrib import admin
from django.http import HttpRequest

from marketplace.billing.models import (
    Account,
    ConnectAccount,
    JobEscrow,
    LedgerTransaction,
    Payout,
    StripeEvent,
    TopUp,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Money records are written by the billing services only, never by hand, operators included:
    the ledger is append-only (corrections are new transactions) and Stripe state is re-fetched."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ("kind", "owner", "currency", "balance")
    list_filter = ("kind", "currency")


@admin.register(JobEscrow)
class JobEscrowAdmin(ReadOnlyAdmin):
    list_display = ("job_id", "account", "left")
    search_fields = ("job_id",)


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "idempotency_key", "job_id", "created_at")
    list_filter = ("kind",)
    search_fields = ("idempotency_key", "job_id", "stripe_id")


for model in (TopUp, StripeEvent, ConnectAccount, Payout):
    admin.site.register(model, ReadOnlyAdmin)
