"""How often a long-lived process with many sockets collects garbage: the server (`asgi.py`, with
HEARTH_GC_GEN0) and bench.fanin's client processes, so neither stops its event loop for seconds."""

from __future__ import annotations

import gc

# Young objects are collected after this many new ones (CPython: 700): see HEARTH_GC_GEN0.
GEN0 = 50_000


def collect_young_after(gen0: int = GEN0) -> None:
    """gen1 is collected after 20 young collections (CPython: 10), gen2 after 10 of those (as
    CPython) and only when a quarter of the long-lived objects are new since the last one."""
    gc.set_threshold(gen0, 20, 10)
