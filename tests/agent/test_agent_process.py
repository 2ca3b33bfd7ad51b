"""A real `hearth-agent run` process against a scripted stand-in server on loopback (websocket +
model downloads on one port): hello → ready → two tasks → a malformed frame → reconnect → revocation."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from hearth_agent.protocol import (
    CloseCode,
    Heartbeat,
    Hello,
    Ready,
    TaskAssign,
    TaskAssignPayload,
    TaskResult,
    Welcome,
    WelcomePayload,
    decode_embeddings,
    dump_frame,
    parse_frame,
)

from .conftest import agent_home_point_at, agent_process_env, model_routes, stand_in_start

pytestmark = pytest.mark.integration

AGENT_DIR = Path(__file__).resolve().parents[2] / "agent"
TOKEN = "host-token-1"
TASKS = {
    "t1": ["The cat sits on the mat.", "A dog barks.", "Solar panels on the roof."],
    "t2": ["Batteries store energy.", "Embeddings are vectors."],
}


@dataclass
class Run:
    hellos: list[Hello] = field(default_factory=list)
    readies: list[Ready] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    results: dict[str, TaskResult] = field(default_factory=dict)
    close_codes: list[int | None] = field(default_factory=list)
    http_paths: list[str] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    model_sha: str = ""


async def _scripted_server(
    run: Run, routes: dict[str, bytes], port_box: list[int], done: asyncio.Event
) -> None:
    connections = 0

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith("/ws/agent/"):
            return None
        run.http_paths.append(request.path)
        # websockets closes the connection after a plain HTTP response; say so, or the agent's
        # HTTP client may reuse it for the next file, find it closed and fail the task.
        close = ("Connection", "close")
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return Response(401, "Unauthorized", Headers([("Content-Length", "0"), close]), b"")
        body = routes.get(request.path)
        if body is None:
            return Response(404, "Not Found", Headers([("Content-Length", "0"), close]), b"")
        return Response(200, "OK", Headers([("Content-Length", str(len(body))), close]), body)

    async def frames(ws: ServerConnection) -> Any:
        frame = parse_frame(await ws.recv())
        if isinstance(frame, Heartbeat):
            run.heartbeats.append(frame)
        return frame

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        run.auth_headers.append(ws.request.headers.get("Authorization") if ws.request else None)
        hello = parse_frame(await ws.recv())
        run.hellos.append(hello)
        await ws.send(
            dump_frame(
                Welcome(payload=WelcomePayload(host_id="h1", heartbeat_interval_s=0.3, server_version="fake"))
            )
        )
        ready = await frames(ws)
        run.readies.append(ready)
        if connections == 1:
            expires = datetime.now(UTC) + timedelta(minutes=5)
            for task_id, inputs in TASKS.items():
                payload = TaskAssignPayload(
                    task_id=task_id,
                    lease_id=f"lease-{task_id}",
                    model_sha256=run.model_sha,
                    model_name="all-MiniLM-L6-v2",
                    inputs=inputs,
                    lease_expires_at=expires,
                )
                await ws.send(dump_frame(TaskAssign(payload=payload)))
            while len(run.results) < len(TASKS):
                frame = await frames(ws)
                if isinstance(frame, TaskResult):
                    run.results[frame.payload.task_id] = frame
            count = len(run.heartbeats)
            while len(run.heartbeats) == count:
                await frames(ws)
            await ws.send("{this is not a frame")
            await ws.wait_closed()
            run.close_codes.append(ws.close_code)
        else:
            await ws.close(int(CloseCode.TOKEN_REVOKED), "token revoked by the owner")
            run.close_codes.append(ws.close_code)
            done.set()

    async with serve(handler, "127.0.0.1", 0, process_request=process_request, max_size=None) as server:
        port_box.append(server.sockets[0].getsockname()[1])
        await done.wait()
        await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def agent_run(
    tmp_path_factory: pytest.TempPathFactory, minilm_source: Path, minilm_sha: str
) -> Iterator[Run]:
    run = Run(model_sha=minilm_sha)
    routes = model_routes(minilm_source, minilm_sha)
    stand_in = stand_in_start(lambda port_box, done: _scripted_server(run, routes, port_box, done))
    home = tmp_path_factory.mktemp("agent-home")
    agent_home_point_at(home, port=stand_in.port, token=TOKEN)
    completed = subprocess.run(
        [sys.executable, "-m", "hearth_agent", "run", "--home", str(home)],
        env=agent_process_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    run.returncode, run.stdout, run.stderr = completed.returncode, completed.stdout, completed.stderr
    (home / "agent.log").write_text(run.stdout + run.stderr)
    stand_in.stop()
    yield run


def test_it_says_hello_with_the_sandbox_it_verified(agent_run: Run) -> None:
    hello = agent_run.hellos[0].payload
    assert hello.protocol_version == 1 and hello.slots == 2 and hello.device == "cpu"
    assert hello.torch_version and hello.cpu_count >= 1 and hello.memory_mb > 0
    assert hello.cached_models == []
    assert any(layer.startswith("netns:") for layer in hello.isolation), agent_run.stdout
    assert agent_run.readies[0].payload.isolation == hello.isolation
    assert set(agent_run.auth_headers) == {f"Bearer {TOKEN}"}


def test_it_returns_embeddings_that_match_sentence_transformers(agent_run: Run, minilm_source: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_source), device="cpu")
    for task_id, inputs in TASKS.items():
        payload = agent_run.results[task_id].payload
        assert (payload.count, payload.dimension, payload.lease_id) == (len(inputs), 384, f"lease-{task_id}")
        got = np.frombuffer(decode_embeddings(payload), dtype="<f4").reshape(payload.count, payload.dimension)
        want = model.encode(inputs, convert_to_numpy=True)
        cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert cosine.min() >= 0.9999
        assert base64.b64decode(payload.embeddings_b64) == got.tobytes()


def test_it_heartbeats_the_leases_it_holds_and_goes_idle_after(agent_run: Run) -> None:
    assert any(
        "lease-t1" in hb.payload.running and hb.payload.status == "busy" for hb in agent_run.heartbeats
    )
    last = agent_run.heartbeats[-1].payload
    assert (last.status, last.free_slots, last.running) == ("idle", 2, [])


def test_it_downloads_the_model_once_and_reports_it_cached_after_reconnecting(agent_run: Run) -> None:
    blob_requests = [p for p in agent_run.http_paths if p.startswith("/models/")]
    assert len(blob_requests) == len(set(blob_requests)) > 0
    assert agent_run.hellos[1].payload.cached_models == [agent_run.model_sha]


def test_it_closes_on_a_malformed_frame_and_reconnects_with_the_same_warm_worker(agent_run: Run) -> None:
    assert agent_run.close_codes[0] == CloseCode.MALFORMED_FRAME
    assert len(agent_run.hellos) == 2
    assert agent_run.stdout.count("ready in") == 1, "the worker was restarted on reconnect"


def test_it_stops_with_a_clear_message_when_the_token_is_revoked(agent_run: Run) -> None:
    assert agent_run.returncode == 3, agent_run.stdout[-3000:] + agent_run.stderr[-3000:]
    assert "revoked" in agent_run.stderr and "re-enroll" in agent_run.stderr
