"""A connected host's heartbeats are recorded and acked while the one database thread is busy."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.db import database_sync_to_async
from django.test import override_settings

from hearth_agent import protocol
from marketplace.gateway.consumers import AgentConsumer
from marketplace.hosts.models import Host
from marketplace.hosts.presence import presence_store
from tests.factories import host_with_token
from tests.frames import agent_scope, hello_payload

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def memory_presence() -> Iterator[None]:
    with override_settings(HEARTH_PRESENCE="memory"):
        presence_store().drain()
        yield
        presence_store().drain()


class Socket:
    """The agent's end of one websocket, spoken as ASGI messages (channels.testing needs daphne)."""

    def __init__(self, token: str) -> None:
        self.app = ApplicationCommunicator(AgentConsumer.as_asgi(), agent_scope(token))

    async def connect(self) -> None:
        await self.app.send_input({"type": "websocket.connect"})
        assert (await self.app.receive_output(5))["type"] == "websocket.accept"

    async def send(self, frame: Any) -> None:
        await self.app.send_input({"type": "websocket.receive", "text": protocol.dump_frame(frame)})

    async def frame_of(self, kind: type[Any], timeout: float = 5.0) -> Any:
        while True:
            message = await self.app.receive_output(timeout)
            assert message["type"] == "websocket.send", message
            frame = protocol.parse_frame(message["text"])
            if isinstance(frame, kind):
                return frame

    async def disconnect(self) -> None:
        await self.app.send_input({"type": "websocket.disconnect", "code": 1000})
        await self.app.wait(5)


async def _busy_database(entered: threading.Event, release: threading.Event) -> None:
    def hold() -> None:
        entered.set()
        release.wait(timeout=30)

    await database_sync_to_async(hold)()


def test_a_heartbeat_is_acked_and_recorded_while_the_hosts_ready_waits_for_the_database() -> None:
    host, token = host_with_token(status=Host.Status.OFFLINE, ready=False, channel_name="")

    async def scenario() -> tuple[float, bool, bool]:
        socket = Socket(token)
        await socket.connect()
        await socket.send(protocol.Hello(payload=hello_payload()))
        await socket.frame_of(protocol.Config)
        # Another consumer's work holds the one database thread, as thousands of connects do.
        entered, release = threading.Event(), threading.Event()
        busy = asyncio.ensure_future(_busy_database(entered, release))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        ready = protocol.Ready(payload=protocol.ReadyPayload(models=[], free_slots=1))
        await socket.send(ready)
        beat = protocol.Heartbeat(payload=protocol.HeartbeatPayload(status="idle", free_slots=1, ack=True))
        await socket.send(beat)
        started = asyncio.get_running_loop().time()
        ack = await socket.frame_of(protocol.HeartbeatAck)
        waited = asyncio.get_running_loop().time() - started
        recorded = any(b.host_id == host.pk for b in presence_store().drain())
        assert ack.payload.heartbeat_id == beat.id
        release.set()
        await busy
        # On SQLite the sockets share the one database thread, and this read queues behind the ready
        # frame's trip; on PostgreSQL that trip runs on the sockets' own pool (and the ready frames
        # are gathered first), so the read may come first: it waits a while for the frame's write.
        is_ready = False
        deadline = asyncio.get_running_loop().time() + 10
        while not is_ready and asyncio.get_running_loop().time() < deadline:
            is_ready = await database_sync_to_async(_is_ready)(host.pk)
            if not is_ready:
                await asyncio.sleep(0.05)
        await socket.disconnect()
        return waited, recorded, is_ready

    waited, recorded, ready = asyncio.run(scenario())
    assert waited < 2.0  # the database thread was held for up to 30 s
    assert recorded
    assert ready  # the ready frame was not dropped: it ran once the database thread was free


def _is_ready(host_id: Any) -> bool:
    return bool(Host.objects.get(pk=host_id).ready)


def test_many_connections_asking_whether_work_is_queued_share_one_trip_to_the_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from marketplace.gateway import consumers

    trips: list[int] = []

    def slow_answer() -> bool:
        trips.append(1)
        time.sleep(0.2)  # the database thread is behind
        return False

    monkeypatch.setattr(consumers, "tasks_queued_recently", slow_answer)
    monkeypatch.setattr(consumers, "tasks_queued_cached", lambda: None)  # the cached answer is stale

    async def fifty_heartbeats() -> list[bool]:
        return await asyncio.gather(*(consumers._tasks_queued() for _ in range(50)))

    assert asyncio.run(fifty_heartbeats()) == [False] * 50
    assert len(trips) == 1
