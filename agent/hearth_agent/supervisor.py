"""The agent's side of the worker: start it in the sandbox, verify the isolation it got, feed it one
batch at a time, and replace it when it crashes or hangs. The worker outlives websocket reconnects."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth_agent.sandbox import IsolationProbe, SandboxPlan, python_paths, sandbox_choose

log = logging.getLogger(__name__)

# One line carries a whole batch of vectors in base64; the default 64 KiB asyncio limit is far too small.
_LINE_LIMIT = 256 * 1024 * 1024
_STDERR_TAIL = 30


class WorkerError(Exception):
    """A batch failed in (or because of) the worker."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class WorkerCrashed(WorkerError):
    """The worker process died or had to be killed; a fresh one is started."""


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    sandbox: str
    isolation: list[str]
    torch_version: str
    device: str
    gpus: list[dict[str, Any]]
    threads: int
    start_ms: float


@dataclass(frozen=True)
class EmbedResult:
    embeddings: bytes  # little-endian float32, count × dimension
    count: int
    dimension: int
    compute_ms: float
    load_ms: float
    model_loads: int
    device: str


@dataclass
class _Process:
    proc: asyncio.subprocess.Process
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_STDERR_TAIL)
    )
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    ready: asyncio.Future[dict[str, Any]] | None = None
    was_ready: bool = False
    dead: bool = False


class WorkerSupervisor:
    """Owns at most one worker process at a time and runs batches on it sequentially."""

    def __init__(
        self,
        *,
        cache_dir: Path,
        sandbox: str = "auto",
        threads: int | None = None,
        hidden_paths: Sequence[Path] = (),
        start_timeout_s: float = 180.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.sandbox_mode = sandbox
        self.threads = threads
        self.hidden_paths = list(hidden_paths)
        self.start_timeout_s = start_timeout_s
        self.extra_env = extra_env or {}
        self.info: WorkerInfo | None = None
        self.warm_models: list[str] = []
        self.starts = 0
        self.on_ready: Callable[[WorkerInfo], None] | None = None
        self._plan: SandboxPlan | None = None
        self._current: _Process | None = None
        self._start_lock = asyncio.Lock()
        self._batch_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        # Strong references: the event loop only keeps weak ones to tasks.
        self._background: set[asyncio.Task[None]] = set()

    # ---- lifecycle --------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
        env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        if self.threads is not None:
            env["HEARTH_WORKER_THREADS"] = str(self.threads)
        env.update(self.extra_env)
        return env

    @property
    def running(self) -> bool:
        return self._current is not None and not self._current.dead

    async def start(self) -> WorkerInfo:
        """Start a worker unless one is alive; idempotent and safe to call concurrently."""
        async with self._start_lock:
            if self.running and self.info is not None:
                return self.info
            env = self._env()
            if self._plan is None:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                readable = [*python_paths(), self.cache_dir.resolve()]
                self._plan = await asyncio.to_thread(
                    sandbox_choose, self.sandbox_mode, env=env, readable=readable, hidden=self.hidden_paths
                )
                log.info("worker sandbox: %s", self._plan.kind)
            self.warm_models = []
            self.info = await self._spawn(self._plan, env)
            self.starts += 1
            log.info(
                "worker pid %d ready in %.0f ms: device=%s torch=%s threads=%d isolation=%s",
                self.info.pid,
                self.info.start_ms,
                self.info.device,
                self.info.torch_version,
                self.info.threads,
                self.info.isolation or "NONE",
            )
        if self.on_ready is not None:
            self.on_ready(self.info)
        return self.info

    async def _spawn(self, plan: SandboxPlan, env: dict[str, str]) -> WorkerInfo:
        probe = IsolationProbe(ro_probe_dir=self.cache_dir)
        started = time.perf_counter()
        try:
            env = {**env, **probe.env()}
            proc = await asyncio.create_subprocess_exec(
                *plan.prefix,
                sys.executable,
                "-m",
                "hearth_agent.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd="/",
                limit=_LINE_LIMIT,
            )
            current = _Process(proc=proc, ready=asyncio.get_running_loop().create_future())
            current.readers = [
                asyncio.create_task(self._read_stdout(current)),
                asyncio.create_task(self._read_stderr(current)),
            ]
            self._current = current
            assert current.ready is not None
            try:
                hello = await asyncio.wait_for(asyncio.shield(current.ready), self.start_timeout_s)
            except (TimeoutError, WorkerCrashed) as exc:
                await self._kill(current, "did not start")
                tail = "\n".join(current.stderr_tail)
                raise WorkerError(f"worker failed to start ({exc or 'timeout'}): {tail[-1500:]}") from None
            isolation = probe.verdict(plan, hello.get("probe", {}))
        finally:
            probe.close()
        return WorkerInfo(
            pid=int(hello.get("pid", proc.pid)),
            sandbox=plan.kind,
            isolation=isolation,
            torch_version=str(hello.get("torch_version", "")),
            device=str(hello.get("device", "cpu")),
            gpus=list(hello.get("gpus", [])),
            threads=int(hello.get("threads", 0)),
            start_ms=(time.perf_counter() - started) * 1000,
        )

    async def _read_stdout(self, current: _Process) -> None:
        assert current.proc.stdout is not None
        try:
            while line := await current.proc.stdout.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning("worker wrote a non-JSON line on its channel: %.200r", line)
                    continue
                if message.get("type") == "ready" and current.ready is not None and not current.ready.done():
                    current.ready.set_result(message)
                    current.was_ready = True
                    continue
                future = current.pending.pop(message.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (ValueError, asyncio.LimitOverrunError) as exc:
            log.error("worker channel broke: %s", exc)
        finally:
            await self._mark_dead(current)

    async def _read_stderr(self, current: _Process) -> None:
        assert current.proc.stderr is not None
        while line := await current.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            current.stderr_tail.append(text)
            log.debug("worker: %s", text)

    async def _mark_dead(self, current: _Process) -> None:
        if current.dead:
            return
        current.dead = True
        with contextlib.suppress(ProcessLookupError):
            current.proc.kill()
        code = await current.proc.wait()
        # Let stderr drain so the crash reason includes the traceback.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(current.readers[1]), 2.0)
        tail = " | ".join(list(current.stderr_tail)[-5:])
        reason = f"worker exited with code {code}" + (f": {tail[-800:]}" if tail else "")
        if current.ready is not None and not current.ready.done():
            current.ready.set_exception(WorkerCrashed(reason))
        for future in current.pending.values():
            if not future.done():
                future.set_exception(WorkerCrashed(reason))
        current.pending.clear()
        if self._current is current:
            log.warning("%s", reason)
            # Only a worker that once came up is replaced on its own; one that cannot start
            # would otherwise be restarted in a tight loop.
            if current.was_ready:
                self._restart_soon()

    async def _kill(self, current: _Process, why: str) -> None:
        log.warning("killing worker pid %d: %s", current.proc.pid, why)
        with contextlib.suppress(ProcessLookupError):
            current.proc.kill()
        await self._mark_dead(current)

    async def stop(self) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        if current.proc.stdin is not None:
            current.proc.stdin.close()
        # Closing stdin ends the worker's read loop; give it a moment to exit on its own.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(current.proc.wait(), 5.0)
        await self._mark_dead(current)
        for reader in current.readers:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    # ---- requests ---------------------------------------------------------

    async def _request(self, request: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        """Send one request to the live worker and wait for its reply. Caller holds the batch lock."""
        await self.start()
        current = self._current
        assert current is not None and current.proc.stdin is not None
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        current.pending[request_id] = future
        try:
            current.proc.stdin.write(json.dumps({**request, "id": request_id}).encode() + b"\n")
            await current.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            await self._mark_dead(current)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            await self._kill(current, f"request took longer than {timeout_s:.0f} s")
            raise WorkerCrashed(f"worker did not answer within {timeout_s:.0f} s; it was restarted") from None
        except asyncio.CancelledError:
            # Keep the lock until the worker is idle again, so the next batch starts on a free worker.
            with contextlib.suppress(Exception):
                await future
            raise

    async def probe_network(self, host: str, port: int) -> bool:
        """Ask the worker to connect to host:port; True means it is NOT network-isolated."""
        async with self._batch_lock:
            reply = await self._request({"type": "probe", "addr": f"{host}:{port}"}, 30.0)
        return bool(reply.get("net_reachable", True))

    # ---- batches ----------------------------------------------------------

    async def embed(
        self,
        *,
        model_dir: Path,
        model_sha256: str,
        inputs: list[str],
        timeout_s: float | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> EmbedResult:
        """Run one batch. Batches queue on a FIFO lock: the worker sees one at a time, so a queued
        batch can still be cancelled and the compute time is the batch's own."""
        async with self._batch_lock:
            if on_start is not None:
                on_start()
            request = {
                "type": "embed",
                "model_dir": str(model_dir),
                "model_sha256": model_sha256,
                "inputs": inputs,
            }
            reply = await self._request(request, timeout_s)
        if reply.get("type") == "error":
            raise WorkerError(
                str(reply.get("reason", "worker error")), retryable=bool(reply.get("retryable", True))
            )
        self.warm_models = [str(m) for m in reply.get("warm", [])]
        raw = base64.b64decode(reply["embeddings_b64"])
        return EmbedResult(
            embeddings=raw,
            count=int(reply["count"]),
            dimension=int(reply["dimension"]),
            compute_ms=float(reply["compute_ms"]),
            load_ms=float(reply.get("load_ms", 0.0)),
            model_loads=int(reply.get("model_loads", 0)),
            device=str(reply.get("device", "cpu")),
        )

    def _restart_soon(self) -> None:
        """Bring a fresh worker up now rather than on the next batch, so it is warm (imports done) again."""

        async def restart() -> None:
            await asyncio.sleep(0.5)  # a worker that dies at once must not spin the CPU
            try:
                await self.start()
            except Exception as exc:  # a background task has no caller to raise to
                log.error("could not restart the worker: %s", exc)

        task = asyncio.create_task(restart())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
