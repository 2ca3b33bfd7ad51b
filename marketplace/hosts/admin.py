from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from marketplace.hosts.models import Host
from marketplace.trust.services import quarantine, quarantine_lift


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "owner",
        "status",
        "ready",
        "device",
        "region",
        "verified_at",
        "reliability",
        "quarantined_at",
        "last_seen_at",
        "revoked_at",
    )
    list_filter = ("status", "quarantined_at", "verified_at")
    readonly_fields = ("token_digest", "token_prefix", "channel_name", "benchmark", "hardware_reason")
    actions = ("quarantine_hosts", "lift_quarantine")

    @admin.action(description="Quarantine: no new work, earnings withheld")
    def quarantine_hosts(self, request: HttpRequest, queryset: QuerySet[Host]) -> None:
        done = sum(quarantine(host_id=h.pk, reason=f"by operator {request.user}") for h in queryset)
        self.message_user(request, f"{done} host(s) quarantined", messages.SUCCESS)

    @admin.action(description="Lift quarantine after review")
    def lift_quarantine(self, request: HttpRequest, queryset: QuerySet[Host]) -> None:
        done = sum(
            quarantine_lift(host_id=h.pk, reviewer_note=f"reviewed by {request.user}") for h in queryset
        )
        self.message_user(request, f"{done} host(s) released", messages.SUCCESS)
