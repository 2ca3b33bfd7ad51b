"""bench.fanin end to end at a small scale: real uvicorn, PostgreSQL, Redis and websocket clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_fanin_bench_holds_fifty_agents_without_a_drop_and_reports_every_key() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "agent")])}
    argv = [sys.executable, "-m", "bench.fanin", "--agents", "50", "--clients", "2"]
    argv += ["--hold", "4", "--settle", "1", "--storm", "10", "--no-baseline"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {
        "agents_connected",
        "drops",
        "heartbeat_p99_ms",
        "server_rss_mb",
        "reconnect_storm_s",
        "db_row_writes_per_s",
        "db_xacts_per_s",
    } <= figures.keys()
    assert (figures["agents_connected"], figures["drops"]) == (50, 0)
    assert figures["server_rss_mb"] > 0
