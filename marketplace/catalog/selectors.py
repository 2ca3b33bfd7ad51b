"""Reads for the catalog."""

from __future__ import annotations

from django.db.models import QuerySet

from marketplace.catalog.models import CatalogModel, ModelFile


def catalog_model_list() -> QuerySet[CatalogModel]:
    return CatalogModel.objects.filter(is_active=True).order_by("name")


def catalog_model_get_by_name(*, name: str) -> CatalogModel | None:
    return CatalogModel.objects.filter(name=name, is_active=True).first()


def catalog_model_get_by_weights(*, sha256: str) -> CatalogModel | None:
    return (
        CatalogModel.objects.prefetch_related("files").filter(weights_sha256=sha256, is_active=True).first()
    )


def model_file_get(*, sha256: str) -> ModelFile | None:
    return ModelFile.objects.filter(sha256=sha256, model__is_active=True).first()
