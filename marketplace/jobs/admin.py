from django.contrib import admin

from marketplace.jobs.models import Job, Task


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "buyer", "model", "status", "items_done", "items_total", "created_at")
    list_filter = ("status",)


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ("id", "job", "index", "status", "attempt", "leased_to", "lease_expires_at")
    list_filter = ("status",)
    exclude = ("output",)
