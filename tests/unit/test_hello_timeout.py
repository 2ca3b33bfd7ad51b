"""The token is checked with the hello, so a socket that never sends one is closed after
HEARTH_HELLO_TIMEOUT_S instead of being held open with an unchecked bearer string; a hello that
arrives in time keeps the socket open past that time, however long its answer takes.

Drives the real consumer with ASGI websocket events (asgiref's ApplicationCommunicator)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.test import override_settings

from hearth_agent import protocol
from marketplace.gateway import consumers
from tests.factories import host_with_token
from tests.frames import agent_scope, hello_frame

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT_S = 0.5


def _socket(token: str) -> ApplicationCommunicator:
    return ApplicationCommunicator(consumers.AgentConsumer.as_asgi(), agent_scope(token))


@override_settings(HEARTH_HELLO_TIMEOUT_S=TIMEOUT_S)
def test_a_socket_that_sends_no_hello_is_closed_after_the_hello_timeout() -> None:
    async def session() -> tuple[dict[str, Any], float]:
        socket = _socket("ht_not_a_real_token")
        await socket.send_input({"type": "websocket.connect"})
        assert (await socket.receive_output(timeout=5))["type"] == "websocket.accept"
        opened = time.monotonic()
        event = await socket.receive_output(timeout=10)
        waited = time.monotonic() - opened
        await socket.send_input({"type": "websocket.disconnect", "code": event.get("code", 1000)})
        await socket.wait(timeout=5)
        return event, waited

    event, waited = async_to_sync(session)()

    assert (event["type"], event["code"]) == ("websocket.close", protocol.CloseCode.MALFORMED_FRAME)
    assert TIMEOUT_S * 0.9 <= waited < TIMEOUT_S + 5


@override_settings(HEARTH_HELLO_TIMEOUT_S=TIMEOUT_S)
def test_a_socket_whose_hello_arrived_in_time_stays_open_after_the_hello_timeout() -> None:
    _, token = host_with_token()

    async def session() -> list[str]:
        socket = _socket(token)
        await socket.send_input({"type": "websocket.connect"})
        assert (await socket.receive_output(timeout=5))["type"] == "websocket.accept"
        await socket.send_input({"type": "websocket.receive", "text": hello_frame(slots=2)})
        frames = [json.loads((await socket.receive_output(timeout=10))["text"])["type"] for _ in range(2)]
        await asyncio.sleep(TIMEOUT_S * 3)
        # Nothing more was sent: no close, no frame.
        assert await socket.receive_nothing(timeout=0.2)
        await socket.send_input({"type": "websocket.disconnect", "code": 1000})
        await socket.wait(timeout=10)
        return frames

    assert async_to_sync(session)() == ["welcome.v1", "config.v1"]
