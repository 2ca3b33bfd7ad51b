from django.contrib import admin

from marketplace.billing.models import Account, ConnectAccount, LedgerTransaction, Payout, StripeEvent, TopUp


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    list_display = ("kind", "owner", "currency", "balance")
    list_filter = ("kind", "currency")
    readonly_fields = ("kind", "owner", "currency", "balance")


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "idempotency_key", "job_id", "created_at")
    list_filter = ("kind",)
    search_fields = ("idempotency_key", "job_id", "stripe_id")

    # The ledger is append-only, even for operators: corrections are new transactions.
    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: object, obj: object = None) -> bool:
        return False


admin.site.register(TopUp)
admin.site.register(StripeEvent)
admin.site.register(ConnectAccount)
admin.site.register(Payout)
