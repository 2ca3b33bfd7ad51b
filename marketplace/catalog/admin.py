from django.contrib import admin

from marketplace.catalog.models import CatalogModel


@admin.register(CatalogModel)
class CatalogModelAdmin(admin.ModelAdmin):
    list_display = ("name", "task_type", "dimension", "min_memory_mb", "weights_sha256", "is_active")
