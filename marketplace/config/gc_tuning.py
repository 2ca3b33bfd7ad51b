"""How a long-lived process that makes many objects collects garbage, so that it does not stop for
seconds: the server (`asgi.py`) and the Celery worker (`celery.py`), both with HEARTH_GC_GEN0, and
the benchmarks' processes that play them (bench.fanin's clients, bench.dispatch). And how often the
server's threads hand over the GIL (`asgi.py`, with HEARTH_GIL_SWITCH_MS)."""

from __future__ import annotations

import gc
import sys

# Young objects are collected after this many new ones (CPython: 700): see HEARTH_GC_GEN0.
GEN0 = 50_000


def collect_young_after(gen0: int = GEN0) -> None:
    """gen1 is collected after 20 young collections (CPython: 10), gen2 after 10 of those (as
    CPython) and only when a quarter of the long-lived objects are new since the last one."""
    gc.set_threshold(gen0, 20, 10)


# A thread that wants the GIL asks a running thread to drop it after this long (CPython: 5 ms).
GIL_SWITCH_MS = 0.5


def hand_over_gil_after(ms: float = GIL_SWITCH_MS) -> None:
    """The event loop drops the GIL at every socket send and receive. While a worker thread runs
    Python (the sweep's flush, the presence write), the loop then waited up to 5 ms to get it back,
    once per system call: the convoy effect, and the heartbeat p99 at 10,000 sockets (bench.fanin:
    59 and 104 ms at 5 ms, 46 and 42 ms at 0.5 ms)."""
    sys.setswitchinterval(ms / 1000)
