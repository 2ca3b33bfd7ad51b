"""Host tokens and leases over a real websocket: revoked tokens and non-leaseholders are refused."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest
import websockets

from hearth_agent import protocol
from marketplace.devstack import LocalStack
from tests.frames import hello_frame

pytestmark = pytest.mark.integration


def _ws_url(stack: LocalStack) -> str:
    return stack.url.replace("http://", "ws://") + protocol.WS_PATH


async def _next_of_type(ws: Any, frame_type: str) -> dict[str, Any]:
    """The next frame of a type, skipping others (welcome, config) the server sends meanwhile."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        if frame["type"] == frame_type:
            return dict(frame)


def _enroll_token(stack: LocalStack, owner: tuple[str, str], name: str) -> str:
    with stack.client() as http:
        response = http.post(
            "/api/v1/agents/enroll", json={"token": stack.enrollment_token(owner=owner), "name": name}
        )
        response.raise_for_status()
        return str(response.json()["host_token"])


async def _close_code_for(stack: LocalStack, token: str) -> int | None:
    async with websockets.connect(
        _ws_url(stack), additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        try:
            # The server may close before the hello is even sent.
            await ws.send(hello_frame())
            while True:
                await asyncio.wait_for(ws.recv(), timeout=10)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None


def test_a_revoked_host_token_is_refused_at_connect(stack: LocalStack) -> None:
    owner = stack.signup(email="revoker@example.com", role="host")
    token = _enroll_token(stack, owner, "soon-revoked")
    with stack.client(auth=owner) as http:
        host = next(h for h in http.get("/api/v1/hosts").json() if h["name"] == "soon-revoked")
        assert http.post(f"/api/v1/hosts/{host['id']}/revoke").json()["revoked"] is True
    assert asyncio.run(_close_code_for(stack, token)) == protocol.CloseCode.AUTH_FAILED


def test_a_made_up_token_is_refused_at_connect(stack: LocalStack) -> None:
    assert asyncio.run(_close_code_for(stack, "ht_stolen-or-guessed")) == protocol.CloseCode.AUTH_FAILED


def test_the_agent_stops_instead_of_retrying_when_its_token_is_revoked(stack: LocalStack) -> None:
    owner = stack.signup(email="agent-revoked@example.com", role="host")
    home = stack.enroll_agent(name="revoked-agent", token=stack.enrollment_token(owner=owner))
    with stack.client(auth=owner) as http:
        host = http.get("/api/v1/hosts").json()[0]
        http.post(f"/api/v1/hosts/{host['id']}/revoke").raise_for_status()
    run = subprocess.run(
        stack.agent_command("run", "--home", str(home)),
        env=stack._agent_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "revoked" in (run.stdout + run.stderr).lower() or "auth" in (run.stdout + run.stderr).lower()


def test_revoking_a_connected_host_closes_its_socket(stack: LocalStack) -> None:
    owner = stack.signup(email="live-revoke@example.com", role="host")
    token = _enroll_token(stack, owner, "live")

    async def scenario() -> int | None:
        async with websockets.connect(
            _ws_url(stack), additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            await ws.send(hello_frame())
            assert json.loads(await ws.recv())["type"] == "welcome.v1"
            with stack.client(auth=owner) as http:
                host_id = http.get("/api/v1/hosts").json()[0]["id"]
                await asyncio.to_thread(http.post, f"/api/v1/hosts/{host_id}/revoke")
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), timeout=10)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    assert asyncio.run(scenario()) == protocol.CloseCode.TOKEN_REVOKED


def test_a_result_sent_by_a_host_that_does_not_hold_the_lease_is_rejected(stack: LocalStack) -> None:
    owner = stack.signup(email="lease-test@example.com", role="host")
    holder_token = _enroll_token(stack, owner, "holder")
    intruder_token = _enroll_token(stack, owner, "intruder")
    api_key = stack.buyer()

    async def scenario() -> tuple[dict[str, Any], protocol.TaskAssignPayload]:
        headers = {"Authorization": f"Bearer {holder_token}"}
        async with websockets.connect(_ws_url(stack), additional_headers=headers) as holder:
            await holder.send(hello_frame())
            await holder.recv()
            with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
                await asyncio.to_thread(
                    http.post,
                    "/api/v1/jobs",
                    json={"model": "all-MiniLM-L6-v2", "inputs": ["x"], "task_size": 1},
                )
            # Only the holder says ready, so what it is assigned is its alone.
            await holder.send(
                protocol.dump_frame(protocol.Ready(payload=protocol.ReadyPayload(models=[], free_slots=1)))
            )
            while True:
                frame = protocol.parse_frame(await asyncio.wait_for(holder.recv(), timeout=20))
                # A new host's first task is a known-answer one; any lease serves this test.
                if isinstance(frame, protocol.TaskAssign):
                    break
            assignment = frame.payload
            count = len(assignment.inputs)
            raw = b"\x00" * (384 * 4 * count)
            b64, digest = protocol.encode_embeddings(raw)
            forged = protocol.TaskResult(
                payload=protocol.TaskResultPayload(
                    task_id=assignment.task_id,
                    lease_id=assignment.lease_id,
                    dimension=384,
                    count=count,
                    embeddings_b64=b64,
                    output_sha256=digest,
                    compute_ms=0.0,
                    device="cpu",
                )
            )
            intruder_headers = {"Authorization": f"Bearer {intruder_token}"}
            async with websockets.connect(_ws_url(stack), additional_headers=intruder_headers) as intruder:
                await intruder.send(hello_frame())
                await intruder.recv()
                await intruder.send(protocol.dump_frame(forged))
                reply = await _next_of_type(intruder, "task.rejected.v1")
            return reply, assignment

    reply, assignment = asyncio.run(scenario())
    assert reply["type"] == "task.rejected.v1"
    assert reply["payload"]["task_id"] == assignment.task_id
    assert "leaseholder" in reply["payload"]["reason"]


def test_a_malformed_frame_closes_the_socket_with_a_named_code(stack: LocalStack) -> None:
    owner = stack.signup(email="malformed@example.com", role="host")
    token = _enroll_token(stack, owner, "sloppy")

    async def scenario() -> list[int | None]:
        codes = []
        for garbage in [
            "not json",
            json.dumps({"type": "hello.v1", "payload": {"extra": 1}}),
            json.dumps({"type": "hello.v9"}),
        ]:
            async with websockets.connect(
                _ws_url(stack), additional_headers={"Authorization": f"Bearer {token}"}
            ) as ws:
                await ws.send(garbage)
                try:
                    await asyncio.wait_for(ws.recv(), timeout=10)
                except websockets.ConnectionClosed as closed:
                    codes.append(closed.rcvd.code if closed.rcvd else None)
        return codes

    assert asyncio.run(scenario()) == [
        protocol.CloseCode.MALFORMED_FRAME,
        protocol.CloseCode.MALFORMED_FRAME,
        protocol.CloseCode.UNSUPPORTED_VERSION,
    ]
