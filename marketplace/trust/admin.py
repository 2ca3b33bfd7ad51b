from django.contrib import admin

from marketplace.trust.models import ReliabilityEvent, Strike


@admin.register(Strike)
class StrikeAdmin(admin.ModelAdmin):
    list_display = ("host", "kind", "created_at", "evidence")
    list_filter = ("kind",)
    readonly_fields = ("host", "kind", "task", "evidence", "created_at")


@admin.register(ReliabilityEvent)
class ReliabilityEventAdmin(admin.ModelAdmin):
    list_display = ("host", "created_at", "score_before", "score_after", "reason")
    readonly_fields = ("host", "created_at", "score_before", "score_after", "reason")
