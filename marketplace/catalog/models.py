"""The model catalog: what buyers can run, and the content-addressed files of each model."""

from __future__ import annotations

from django.db import models


class CatalogModel(models.Model):
    class TaskType(models.TextChoices):
        EMBEDDING = "embedding", "Embedding"

    name = models.CharField(max_length=100, unique=True)
    task_type = models.CharField(max_length=16, choices=TaskType.choices)
    dimension = models.PositiveIntegerField()
    min_memory_mb = models.PositiveIntegerField()
    weights_sha256 = models.CharField(max_length=64, unique=True)
    source = models.CharField(max_length=200, help_text="where the server found the files")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class ModelFile(models.Model):
    """One file of a model, served at /models/<sha256>."""

    model = models.ForeignKey(CatalogModel, on_delete=models.CASCADE, related_name="files")
    path = models.CharField(max_length=300)
    sha256 = models.CharField(max_length=64, db_index=True)
    size = models.PositiveBigIntegerField()
    storage_path = models.CharField(max_length=1000)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "path"], name="unique_model_file_path")]
        ordering = ["path"]

    def __str__(self) -> str:
        return f"{self.path} ({self.sha256[:12]})"
