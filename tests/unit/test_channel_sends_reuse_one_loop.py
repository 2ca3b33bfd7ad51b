"""Sends from sync code reach the channel layer on a loop that lives on: the server's, or the process's own.

A dispatch round in the Celery worker sends each host its assignments from sync code with no event
loop above it. `async_to_sync` there starts a thread and an event loop per call (and channels_redis a
Redis connection per loop): ~7 ms of a dispatch round. These tests hold the sends to one loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.test import override_settings

from marketplace.gateway import notify


class LoopRecordingLayer(InMemoryChannelLayer):
    """The in-memory layer, noting the event loop (and its thread) each send ran on."""

    sends: list[tuple[asyncio.AbstractEventLoop, str]] = []

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        type(self).sends.append((asyncio.get_running_loop(), threading.current_thread().name))
        await super().send(channel, message)


RECORDING = {"default": {"BACKEND": f"{__name__}.LoopRecordingLayer"}}


@pytest.fixture
def recorded() -> Iterator[list[tuple[asyncio.AbstractEventLoop, str]]]:
    LoopRecordingLayer.sends = []
    with override_settings(CHANNEL_LAYERS=RECORDING):
        yield LoopRecordingLayer.sends


def test_sends_from_a_thread_with_no_event_loop_all_run_on_one_loop_that_outlives_them(
    recorded: list[tuple[asyncio.AbstractEventLoop, str]],
) -> None:
    def sync_caller() -> None:
        for n in range(10):
            notify.send(f"host.{n}", {"type": "task.cancel", "n": n})
        notify.send_many([(f"host.{n}", {"type": "task.cancel", "n": n}) for n in range(10, 20)])

    caller = threading.Thread(target=sync_caller)  # no event loop anywhere above it, as in a worker
    caller.start()
    caller.join()

    assert len(recorded) == 20
    loops = {id(loop) for loop, _ in recorded}  # the loops are held in `recorded`: no id is reused
    assert len(loops) == 1
    loop, thread_name = recorded[0]
    assert thread_name == "channel-layer-sends"
    assert loop.is_running()  # still there for the next round's sends


def test_sends_from_a_thread_the_server_loop_handed_sync_work_to_run_on_that_loop_where_consumers_read(
    recorded: list[tuple[asyncio.AbstractEventLoop, str]],
) -> None:
    async def server() -> dict[str, Any]:
        await sync_to_async(notify.send)("host.a", {"type": "task.cancel", "task_id": "t1"})
        assert [loop for loop, _ in recorded] == [asyncio.get_running_loop()]
        layer = get_channel_layer()
        assert layer is not None
        return await asyncio.wait_for(layer.receive("host.a"), timeout=5)

    assert asyncio.run(server()) == {"type": "task.cancel", "task_id": "t1"}


def test_a_send_that_fails_is_logged_and_the_caller_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    with override_settings(CHANNEL_LAYERS=RECORDING):
        # The in-memory layer refuses a channel name with spaces.
        notify.send("not a channel name", {"type": "task.cancel"})
    assert "could not send task.cancel to not a channel name" in caplog.text
