"""A process-local cache with a ceiling, for lookups whose keys are few in practice (parsed policies,
job shapes) but must not grow without bound when they are not."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(dict[K, V]):
    """A dict that empties itself rather than pass `limit` entries: no eviction bookkeeping on the
    hot path, and a full cache only costs recomputing what is still in use."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: K, value: V) -> V:
        if key not in self and len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value
