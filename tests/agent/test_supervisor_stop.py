"""Stopping the worker supervisor leaves no worker behind and lets the agent's loop close: when it is
stopped at any moment of a start (SIGTERM cancels the agent's main task), and when it is stopped
while a crashed worker's replacement is pending."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import asyncio, json, os, signal, sys
from pathlib import Path
from hearth_agent.supervisor import WorkerSupervisor

def workers():
    mine = f"HEARTH_PROBE_AGENT_PID={os.getpid()}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mine in (proc / "environ").read_bytes().split(b"\\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found

async def cancelled_while_starting(delay):
    supervisor = WorkerSupervisor(cache_dir=Path(sys.argv[1]))
    asyncio.get_running_loop().call_later(delay, asyncio.current_task().cancel)  # as SIGTERM does
    try:
        await supervisor.start()
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        pass
    finally:
        await supervisor.stop()
    return workers()

async def stopped_while_replacing():
    supervisor = WorkerSupervisor(cache_dir=Path(sys.argv[1]))
    await supervisor.start()
    os.kill(supervisor._current.proc.pid, signal.SIGKILL)
    while not supervisor._restarts:  # the crash is seen and a replacement scheduled
        await asyncio.sleep(0.01)
    starts = supervisor.starts
    await supervisor.stop()
    await asyncio.sleep(3.0)  # a replacement left pending would have started by now
    return {"starts_after_stop": supervisor.starts - starts, "running": supervisor.running,
            "workers": workers()}

report = {"cancelled": {}}
for delay in (0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5):
    report["cancelled"][str(delay)] = asyncio.run(cancelled_while_starting(delay))
report["replacing"] = asyncio.run(stopped_while_replacing())
print(json.dumps(report))
"""


def test_a_supervisor_stopped_mid_start_or_mid_replacement_leaves_no_worker_and_lets_the_loop_close(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "cache")], timeout=180, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["cancelled"] == {delay: [] for delay in report["cancelled"]}
    assert report["replacing"] == {"starts_after_stop": 0, "running": False, "workers": []}
