"""A power frame claims work for its host only when something is queued: every host sends one every
power interval, and at fleet scale a claim per frame would be the read load heartbeats shed.

Drives the real consumer with ASGI websocket events (asgiref's ApplicationCommunicator: Channels'
own WebsocketCommunicator needs daphne); the claim service is wrapped only to count its calls (it
still runs)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator

from hearth_agent import protocol
from marketplace.gateway import consumers
from marketplace.matching import selectors
from tests import fake_runs
from tests.factories import host_with_token
from tests.frames import agent_scope, hello_frame

pytestmark = pytest.mark.django_db(transaction=True)

POWER = protocol.Power(payload=protocol.PowerPayload(source="simulator", grid_w=100.0, work_allowed=True))
# Frames that touch the database are handled in order, after the power frame; releasing a lease the
# host never held is answered `task.rejected` and claims nothing, so its answer marks the power frame done.
BARRIER = protocol.TaskRelease(
    payload=protocol.TaskReleasePayload(
        task_id=str(uuid.uuid4()), lease_id=str(uuid.uuid4()), reason="barrier"
    )
)


def _claims_during_a_power_frame(monkeypatch: pytest.MonkeyPatch) -> int:
    _, token = host_with_token()
    calls: list[Any] = []
    real_claim = consumers.tasks_claim_for_host

    def counted_claim(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_claim(**kwargs)

    monkeypatch.setattr(consumers, "tasks_claim_for_host", counted_claim)

    async def session() -> int:
        socket = ApplicationCommunicator(consumers.AgentConsumer.as_asgi(), agent_scope(token))

        async def send(text: str) -> None:
            await socket.send_input({"type": "websocket.receive", "text": text})

        async def received() -> str:
            event = await socket.receive_output(timeout=10)
            assert event["type"] == "websocket.send", event
            return str(json.loads(event["text"])["type"])

        await socket.send_input({"type": "websocket.connect"})
        assert (await socket.receive_output(timeout=10))["type"] == "websocket.accept"
        await send(hello_frame(slots=2))
        assert [await received(), await received()] == ["welcome.v1", "config.v1"]
        before = len(calls)
        monkeypatch.setattr(selectors, "_QUEUED_SEEN", (float("-inf"), True))  # ask the database afresh
        await send(protocol.dump_frame(POWER))
        await send(protocol.dump_frame(BARRIER))
        while await received() != "task.rejected.v1":
            pass  # task.assign frames of the claim, if any
        claims = len(calls) - before
        await socket.send_input({"type": "websocket.disconnect", "code": 1000})
        await socket.wait(timeout=10)
        return claims

    return async_to_sync(session)()


def test_a_power_frame_claims_nothing_when_no_task_is_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _claims_during_a_power_frame(monkeypatch) == 0


def test_a_power_frame_claims_for_its_host_when_tasks_are_queued(
    monkeypatch: pytest.MonkeyPatch, catalog: Any, buyer: Any
) -> None:
    fake_runs.job(buyer, n=4, task_size=2)
    assert _claims_during_a_power_frame(monkeypatch) == 1
