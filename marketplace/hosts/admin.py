from django.contrib import admin

from marketplace.hosts.models import Host


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "status", "ready", "device", "slots", "last_seen_at", "revoked_at")
    list_filter = ("status",)
    readonly_fields = ("token_digest", "token_prefix", "channel_name")
