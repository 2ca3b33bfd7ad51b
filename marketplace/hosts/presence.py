"""Where heartbeats land between sweeps: the latest beat of each live connection, not a row write.

The sweep drains the store and writes `last_seen_at`/`offline_after` (and lease renewals) for all
hosts seen since the last flush in a few batched queries (`hosts.services.hosts_presence_flush`).
`HEARTH_PRESENCE` picks the store: this process's memory (the embedded default) or Redis (every
server process and the Celery worker share it).
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Protocol

from django.conf import settings


@dataclass(frozen=True)
class Beat:
    """The latest heartbeat of one connection (a host with a stale and a new socket has two)."""

    host_id: uuid.UUID
    channel_name: str
    at: datetime
    running: tuple[str, ...] = ()


class PresenceStore(Protocol):
    def record(self, beat: Beat) -> None:
        """Keep `beat`, replacing an earlier beat of the same connection."""

    def record_many(self, beats: list[Beat]) -> None:
        """`record` each of `beats`, in order, in one write."""

    def drain(self) -> list[Beat]:
        """Return every beat recorded since the last drain and forget them, atomically."""

    def restore(self, beats: list[Beat]) -> None:
        """Put back drained beats a flush could not write, unless their connection beat again since."""

    def sweeping(self) -> contextlib.AbstractContextManager[bool]:
        """Held by one sweep at a time: True inside when this sweep holds it, False when another does.

        A sweep that judged hosts while another held beats it had drained but not yet written would
        sweep live hosts, so the second one skips its turn.
        """


# A sweep that died holding the Redis sweep lock blocks the others this long at most.
SWEEP_LOCK_S = 60


class MemoryPresence:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sweep = threading.Lock()
        self._beats: dict[tuple[uuid.UUID, str], Beat] = {}

    @contextlib.contextmanager
    def sweeping(self) -> Iterator[bool]:
        mine = self._sweep.acquire(blocking=False)
        try:
            yield mine
        finally:
            if mine:
                self._sweep.release()

    def record(self, beat: Beat) -> None:
        self.record_many([beat])

    def record_many(self, beats: list[Beat]) -> None:
        with self._lock:
            for beat in beats:
                self._beats[(beat.host_id, beat.channel_name)] = beat

    def drain(self) -> list[Beat]:
        with self._lock:
            beats, self._beats = self._beats, {}
        return list(beats.values())

    def restore(self, beats: list[Beat]) -> None:
        with self._lock:
            for beat in beats:
                self._beats.setdefault((beat.host_id, beat.channel_name), beat)


class RedisPresence:
    KEY = "hearth:presence:beats"

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url)

    @contextlib.contextmanager
    def sweeping(self) -> Iterator[bool]:
        from redis.exceptions import LockError

        lock = self._redis.lock(f"{self.KEY}:sweep", timeout=SWEEP_LOCK_S)
        mine = bool(lock.acquire(blocking=False))
        try:
            yield mine
        finally:
            if mine:
                with contextlib.suppress(LockError):  # it outlived SWEEP_LOCK_S and expired
                    lock.release()

    def record(self, beat: Beat) -> None:
        self.record_many([beat])

    def record_many(self, beats: list[Beat]) -> None:
        # One HSET of many fields: one round trip however many connections beat (a later beat of the
        # same connection wins, as the mapping keeps the last value of a key).
        if beats:
            self._redis.hset(self.KEY, mapping=dict(self._entry(beat) for beat in beats))

    def restore(self, beats: list[Beat]) -> None:
        # HSETNX: a field present now was recorded after the drain, so it is the newer beat.
        pipe = self._redis.pipeline(transaction=False)
        for beat in beats:
            pipe.hsetnx(self.KEY, *self._entry(beat))
        pipe.execute()

    @staticmethod
    def _entry(beat: Beat) -> tuple[str, str]:
        value = json.dumps({"at": beat.at.isoformat(), "running": list(beat.running)})
        return f"{beat.host_id} {beat.channel_name}", value

    def drain(self) -> list[Beat]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(self.KEY)
        pipe.delete(self.KEY)
        raw, _ = pipe.execute()
        beats = []
        for field, value in raw.items():
            host_id, _, channel_name = field.decode().partition(" ")
            data = json.loads(value)
            beats.append(
                Beat(
                    host_id=uuid.UUID(host_id),
                    channel_name=channel_name,
                    at=datetime.fromisoformat(data["at"]),
                    running=tuple(data["running"]),
                )
            )
        return beats


@cache
def _store(kind: str, redis_url: str | None) -> PresenceStore:
    if kind == "redis":
        assert redis_url, "settings refuse HEARTH_PRESENCE=redis without REDIS_URL"
        return RedisPresence(redis_url)
    return MemoryPresence()


def presence_store() -> PresenceStore:
    """The store `HEARTH_PRESENCE` names (one per process and setting)."""
    return _store(settings.HEARTH_PRESENCE, settings.REDIS_URL)
