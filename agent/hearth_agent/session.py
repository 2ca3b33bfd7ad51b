"""One websocket session with the server: hello → welcome → ready, heartbeats, and the tasks the
server assigns over it. Leases die with the session (the server requeues them), so nothing here
outlives the connection except the worker, which the supervisor owns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from hearth_agent.model_cache import ModelCache, ModelCacheError
from hearth_agent.protocol import (
    CloseCode,
    Heartbeat,
    HeartbeatPayload,
    Hello,
    HelloPayload,
    ProtocolError,
    Ready,
    ReadyPayload,
    TaskAssign,
    TaskAssignPayload,
    TaskCancel,
    TaskFailed,
    TaskFailedPayload,
    TaskRejected,
    TaskResult,
    TaskResultPayload,
    Welcome,
    dump_frame,
    encode_embeddings,
    parse_frame,
)
from hearth_agent.supervisor import WorkerError, WorkerInfo, WorkerSupervisor

log = logging.getLogger(__name__)

# A batch may overrun its lease a little (the server may still accept it); beyond that it is hung.
_LEASE_GRACE_S = 30.0
_MIN_BATCH_TIMEOUT_S = 60.0


@dataclass
class LocalTask:
    assign: TaskAssignPayload
    state: Literal["fetching", "queued", "running"] = "fetching"
    cancelled: bool = False
    handle: asyncio.Task[None] | None = None
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SessionEnd:
    code: int | None
    reason: str
    by_agent: bool


def _close_reason(text: str) -> str:
    # A close frame's reason is limited to 123 bytes of UTF-8.
    return text.encode()[:120].decode(errors="ignore")


class AgentSession:
    """Drives one connection; `run()` returns how it ended."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        hello: HelloPayload,
        cache: ModelCache,
        supervisor: WorkerSupervisor,
        slots: int,
        heartbeat_fallback_s: float,
        welcome_timeout_s: float = 20.0,
    ) -> None:
        self.ws = ws
        self.hello = hello
        self.cache = cache
        self.supervisor = supervisor
        self.slots = slots
        self.heartbeat_interval_s = heartbeat_fallback_s
        self.welcome_timeout_s = welcome_timeout_s
        self.tasks: dict[str, LocalTask] = {}  # by lease id
        self._handles: set[asyncio.Task[Any]] = set()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._end: SessionEnd | None = None

    # ---- public -----------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - len(self.tasks))

    async def run(self) -> SessionEnd:
        try:
            await self._send(Hello(payload=self.hello))
            welcome = await self._wait_welcome()
            if welcome is None:
                return self._ended()
            self.heartbeat_interval_s = welcome.payload.heartbeat_interval_s
            log.info(
                "welcomed as host %s by server %s (heartbeat every %.1f s)",
                welcome.payload.host_id,
                welcome.payload.server_version,
                self.heartbeat_interval_s,
            )
            self.supervisor.on_ready = self._worker_restarted
            await self._send_ready()
            heartbeats = self._spawn(self._heartbeat_loop())
            try:
                await self._receive_loop()
            finally:
                heartbeats.cancel()
        except ConnectionClosed:
            pass
        finally:
            self._shutdown()
        return self._ended()

    # ---- frames out -------------------------------------------------------

    async def _send(self, frame: Any) -> None:
        async with self._send_lock:
            await self.ws.send(dump_frame(frame))

    async def _send_ready(self) -> None:
        info = self.supervisor.info
        await self._send(
            Ready(
                payload=ReadyPayload(
                    models=list(self.supervisor.warm_models),
                    free_slots=self.free_slots,
                    isolation=list(info.isolation) if info else [],
                )
            )
        )

    def _worker_restarted(self, info: WorkerInfo) -> None:
        if not self._closed:
            log.info("worker %d is up again; telling the server we are ready", info.pid)
            self._spawn(self._send_quietly(self._send_ready()))

    async def _send_quietly(self, sending: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            await sending

    async def _heartbeat_loop(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self.heartbeat_interval_s)
                live = [t for t in self.tasks.values() if not t.cancelled]
                await self._send(
                    Heartbeat(
                        payload=HeartbeatPayload(
                            status="busy" if live else "idle",
                            free_slots=self.free_slots,
                            running=[t.assign.lease_id for t in live],
                        )
                    )
                )

    async def _close(self, code: CloseCode, reason: str) -> None:
        self._end = SessionEnd(code=int(code), reason=reason, by_agent=True)
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(code=int(code), reason=_close_reason(reason))

    # ---- frames in --------------------------------------------------------

    async def _wait_welcome(self) -> Welcome | None:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), self.welcome_timeout_s)
        except TimeoutError:
            await self._close(CloseCode.GOING_AWAY, "no welcome within the timeout")
            return None
        try:
            frame = parse_frame(raw)
        except ProtocolError as exc:
            log.error("server sent a malformed frame instead of welcome: %s", exc)
            await self._close(exc.code, str(exc))
            return None
        if not isinstance(frame, Welcome):
            await self._close(CloseCode.MALFORMED_FRAME, f"expected welcome.v1, got {frame.type}")
            return None
        return frame

    async def _receive_loop(self) -> None:
        async for raw in self.ws:
            try:
                frame = parse_frame(raw)
            except ProtocolError as exc:
                log.error("server sent a malformed frame (%s); closing with %d", exc, int(exc.code))
                await self._close(exc.code, str(exc))
                return
            if isinstance(frame, TaskAssign):
                self._on_assign(frame.payload)
            elif isinstance(frame, TaskCancel):
                self._on_cancel(frame.payload.lease_id, frame.payload.task_id, frame.payload.reason)
            elif isinstance(frame, TaskRejected):
                p = frame.payload
                log.warning(
                    "server rejected the result of task %s (lease %s): %s", p.task_id, p.lease_id, p.reason
                )
            elif isinstance(frame, Welcome):
                log.info("server re-sent welcome; heartbeat every %.1f s", frame.payload.heartbeat_interval_s)
                self.heartbeat_interval_s = frame.payload.heartbeat_interval_s
            else:
                # Agent-bound frames only; an agent frame echoed back means the peer is confused.
                await self._close(CloseCode.MALFORMED_FRAME, f"unexpected frame {frame.type} from server")
                return

    def _on_assign(self, assign: TaskAssignPayload) -> None:
        if assign.lease_id in self.tasks:
            log.warning("duplicate assignment of lease %s ignored", assign.lease_id)
            return
        task = LocalTask(assign=assign)
        self.tasks[assign.lease_id] = task
        if len(self.tasks) > self.slots:
            log.warning(
                "server assigned %d tasks for %d slots; queueing locally", len(self.tasks), self.slots
            )
        log.info(
            "task %s assigned (lease %s, %d inputs, model %s %s)",
            assign.task_id,
            assign.lease_id,
            len(assign.inputs),
            assign.model_name,
            assign.model_sha256[:12],
        )
        task.handle = self._spawn(self._execute(task))

    def _on_cancel(self, lease_id: str, task_id: str, reason: str) -> None:
        task = self.tasks.pop(lease_id, None) or next(
            (t for t in list(self.tasks.values()) if t.assign.task_id == task_id), None
        )
        if task is None:
            log.info("cancel for unknown lease %s (task %s) ignored", lease_id, task_id)
            return
        self.tasks.pop(task.assign.lease_id, None)
        task.cancelled = True
        # A batch already in the worker cannot be interrupted without losing the warm model;
        # its result is simply dropped.
        if task.state != "running" and task.handle is not None:
            task.handle.cancel()
        log.info("task %s cancelled by the server (%s) while %s", task_id, reason, task.state)

    # ---- work -------------------------------------------------------------

    def _batch_timeout(self, assign: TaskAssignPayload) -> float:
        expires = assign.lease_expires_at
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        remaining = (expires - datetime.now(UTC)).total_seconds()
        return max(_MIN_BATCH_TIMEOUT_S, remaining + _LEASE_GRACE_S)

    async def _execute(self, task: LocalTask) -> None:
        try:
            await self._run_task(task)
        finally:
            # The lease is held (and heartbeated) until its result or failure has been sent.
            if self.tasks.get(task.assign.lease_id) is task:
                self.tasks.pop(task.assign.lease_id, None)

    async def _run_task(self, task: LocalTask) -> None:
        assign = task.assign

        def mark_running() -> None:
            task.state = "running"

        try:
            model_dir = await self.cache.ensure(assign.model_sha256)
            task.state = "queued"
            result = await self.supervisor.embed(
                model_dir=model_dir,
                model_sha256=assign.model_sha256,
                inputs=list(assign.inputs),
                timeout_s=self._batch_timeout(assign),
                on_start=mark_running,
            )
        except asyncio.CancelledError:
            return
        except ModelCacheError as exc:
            await self._fail(task, f"model {assign.model_sha256[:12]}: {exc}", retryable=exc.retryable)
            return
        except WorkerError as exc:
            await self._fail(task, exc.reason, retryable=exc.retryable)
            return
        except Exception as exc:
            log.exception("task %s failed in the agent", assign.task_id)
            await self._fail(task, f"agent error: {exc.__class__.__name__}: {exc}", retryable=True)
            return

        try:
            if task.cancelled or self._closed:
                log.info("result of task %s dropped (cancelled or disconnected)", assign.task_id)
                return
            embeddings_b64, digest = encode_embeddings(result.embeddings)
            await self._send(
                TaskResult(
                    payload=TaskResultPayload(
                        task_id=assign.task_id,
                        lease_id=assign.lease_id,
                        dimension=max(1, result.dimension),
                        count=result.count,
                        embeddings_b64=embeddings_b64,
                        output_sha256=digest,
                        compute_ms=result.compute_ms,
                        device=result.device,
                    )
                )
            )
            log.info(
                "task %s done: %d × %d in %.0f ms compute (%.0f ms model load, %.0f ms since assigned)",
                assign.task_id,
                result.count,
                result.dimension,
                result.compute_ms,
                result.load_ms,
                (time.monotonic() - task.received_at) * 1000,
            )
        except ConnectionClosed:
            log.info("result of task %s not sent: the connection closed", assign.task_id)

    async def _fail(self, task: LocalTask, reason: str, *, retryable: bool) -> None:
        assign = task.assign
        log.warning("task %s failed (%s): %s", assign.task_id, "retryable" if retryable else "final", reason)
        if task.cancelled or self._closed:
            return
        with contextlib.suppress(ConnectionClosed):
            await self._send(
                TaskFailed(
                    payload=TaskFailedPayload(
                        task_id=assign.task_id,
                        lease_id=assign.lease_id,
                        reason=reason[:2000],
                        retryable=retryable,
                    )
                )
            )

    # ---- bookkeeping ------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        handle = asyncio.create_task(coro)
        self._handles.add(handle)
        handle.add_done_callback(self._handles.discard)
        return handle

    def _shutdown(self) -> None:
        """Leases do not survive the connection: drop queued tasks, let a running batch finish unheard."""
        self._closed = True
        if self.supervisor.on_ready == self._worker_restarted:
            self.supervisor.on_ready = None
        for task in list(self.tasks.values()):
            task.cancelled = True
            if task.state != "running" and task.handle is not None:
                task.handle.cancel()
        if self.tasks:
            log.info("dropped %d task(s) held by the closed session", len(self.tasks))
        self.tasks.clear()

    def _ended(self) -> SessionEnd:
        if self._end is not None:
            return self._end
        return SessionEnd(code=self.ws.close_code, reason=self.ws.close_reason or "", by_agent=False)
