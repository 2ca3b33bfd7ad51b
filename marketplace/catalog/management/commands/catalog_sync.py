from typing import Any

from django.core.management.base import BaseCommand

from marketplace.catalog.services import catalog_builtin_sync
from marketplace.trust.canaries import canary_bank_build


class Command(BaseCommand):
    help = "Register the built-in models (all-MiniLM-L6-v2) and build their banks of known-answer tasks."

    def handle(self, *args: Any, **options: Any) -> None:
        for model in catalog_builtin_sync():
            self.stdout.write(
                f"{model.name} weights sha256={model.weights_sha256} files={model.files.count()} "
                f"canaries={canary_bank_build(model=model)}"
            )
