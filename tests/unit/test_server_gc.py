"""The ASGI server process collects young objects far less often than CPython's default, so the
objects of heartbeats in flight are not promoted into full collections that stop the event loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _thresholds_after_importing_the_asgi_app(gen0: str | None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "HEARTH_GC_GEN0"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "agent")])
    if gen0 is not None:
        env["HEARTH_GC_GEN0"] = gen0
    done = subprocess.run(
        [sys.executable, "-c", "import gc, marketplace.config.asgi; print(gc.get_threshold())"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_asgi_app_sets_the_young_generation_threshold_from_the_environment() -> None:
    assert _thresholds_after_importing_the_asgi_app("12345") == "(12345, 20, 10)"


def test_the_asgi_app_collects_young_objects_after_50_000_new_ones_by_default() -> None:
    assert _thresholds_after_importing_the_asgi_app(None) == "(50000, 20, 10)"
