"""Build the `hearth-agent` wheel from agent/ into var/dist/, beside the systemd unit, so the server
can hand both to `install.sh` without importing build tooling at request time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

UNIT_NAME = "hearth-agent.service"


def agent_dist_dir() -> Path:
    return Path(settings.VAR_DIR) / "dist"


class Command(BaseCommand):
    help = "Build the hearth-agent wheel into var/dist/ (served at /agent/<filename>)."

    def handle(self, *args: Any, **options: Any) -> None:
        source = Path(settings.BASE_DIR) / "agent"
        out = agent_dist_dir()
        out.mkdir(parents=True, exist_ok=True)
        # Build from a copy: an in-tree build writes agent/build/, and two stacks starting at once
        # would race on it.
        with tempfile.TemporaryDirectory(prefix="hearth-agent-build-") as tmp:
            tree = Path(tmp) / "agent"
            shutil.copytree(
                source,
                tree,
                ignore=shutil.ignore_patterns(
                    "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache"
                ),
            )
            wheels = Path(tmp) / "wheels"
            # A path, never a bare name: pip would look a name up on a package index.
            pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
            completed = subprocess.run(
                [*pip_wheel, "-w", str(wheels), str(tree)],
                capture_output=True,
                text=True,
                check=False,
            )
            if completed.returncode != 0:
                raise CommandError(f"building the agent wheel failed:\n{completed.stdout}{completed.stderr}")
            built = sorted(wheels.glob("hearth_agent-*.whl"))
            if not built:
                raise CommandError(f"pip built no hearth_agent wheel in {wheels}")
            for old in out.glob("hearth_agent-*.whl"):
                old.unlink()
            wheel = Path(shutil.copy2(built[0], out / built[0].name))
        shutil.copy2(Path(settings.BASE_DIR) / "infra" / UNIT_NAME, out / UNIT_NAME)
        self.stdout.write(f"built {wheel}")
