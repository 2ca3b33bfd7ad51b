"""The ASGI server process collects young objects far less often than CPython's default, so the
objects of heartbeats in flight are not promoted into full collections that stop the event loop;
and its threads hand over the GIL ten times as often, so the loop does not wait 5 ms for it after
each system call while a worker thread runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_TUNING = ("HEARTH_GC_GEN0", "HEARTH_GIL_SWITCH_MS")


def _import_the_asgi_app(expression: str, **environment: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in _TUNING}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "agent")])
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-c", f"import gc, sys, marketplace.config.asgi; print({expression})"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _after_importing_the_asgi_app(expression: str, **environment: str) -> str:
    done = _import_the_asgi_app(expression, **environment)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_asgi_app_sets_the_young_generation_threshold_from_the_environment() -> None:
    assert _after_importing_the_asgi_app("gc.get_threshold()", HEARTH_GC_GEN0="12345") == "(12345, 20, 10)"


def test_the_asgi_app_collects_young_objects_after_50_000_new_ones_by_default() -> None:
    assert _after_importing_the_asgi_app("gc.get_threshold()") == "(50000, 20, 10)"


def test_the_asgi_app_hands_over_the_gil_after_half_a_millisecond_by_default() -> None:
    assert _after_importing_the_asgi_app("sys.getswitchinterval()") == "0.0005"


def test_the_asgi_app_sets_the_gil_switch_interval_from_the_environment() -> None:
    assert _after_importing_the_asgi_app("sys.getswitchinterval()", HEARTH_GIL_SWITCH_MS="2") == "0.002"


def test_the_settings_refuse_a_gil_switch_interval_below_fifty_microseconds() -> None:
    done = _import_the_asgi_app("sys.getswitchinterval()", HEARTH_GIL_SWITCH_MS="0.01")
    assert done.returncode != 0
    assert "HEARTH_GIL_SWITCH_MS" in done.stderr
