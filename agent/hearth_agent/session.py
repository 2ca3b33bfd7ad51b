"""One websocket session with the server: hello → welcome → ready, heartbeats, the tasks the
server assigns over it, and the hardware benchmark it checks the claimed device against. Leases die
with the session (the server requeues them), so nothing here outlives the connection except the
worker, which the supervisor owns, and the benchmark cache."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from hearth_agent import benchmark, cheat
from hearth_agent.cheat import Cheats
from hearth_agent.energy import EnergyMonitor, PowerReading, TaskMeter
from hearth_agent.model_cache import ModelCache, ModelCacheError
from hearth_agent.policy import Verdict
from hearth_agent.protocol import (
    Benchmark,
    BenchmarkReport,
    BenchmarkRequest,
    CloseCode,
    Config,
    Drain,
    DrainPayload,
    Heartbeat,
    HeartbeatAck,
    HeartbeatPayload,
    Hello,
    HelloPayload,
    Power,
    ProtocolError,
    Ready,
    ReadyPayload,
    TaskAssign,
    TaskAssignPayload,
    TaskCancel,
    TaskFailed,
    TaskFailedPayload,
    TaskRejected,
    TaskRelease,
    TaskReleasePayload,
    TaskResult,
    TaskResultPayload,
    Welcome,
    dump_frame,
    encode_embeddings,
    parse_frame,
)
from hearth_agent.supervisor import EmbedResult, WorkerError, WorkerInfo, WorkerSupervisor

log = logging.getLogger(__name__)

# A batch may overrun its lease a little (the server may still accept it); beyond that it is hung.
_LEASE_GRACE_S = 30.0
_MIN_BATCH_TIMEOUT_S = 60.0
# A benchmark waits this long at most for the worker to be idle: measured while a batch shares
# the machine, every number would come out low.
_BENCHMARK_IDLE_WAIT_S = 60.0
# The first one also lets the session settle: a server assigns queued work (and the agent fetches
# models) right after `ready`, and importing torch here would slow both.
_FIRST_BENCHMARK_DELAY_S = 2.0


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
        energy: EnergyMonitor | None = None,
        draining: bool = False,
        drain_reason: str = "",
        cheats: Cheats | None = None,
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
        # The owner's energy policy, judged on every power reading; None until the first one.
        self.energy = energy or EnergyMonitor()
        self.verdict: Verdict | None = None
        self._power_wake = asyncio.Event()
        # The owner has the machine: no new work, free_slots 0, every assignment handed back.
        self.draining = draining
        self.drain_reason = drain_reason
        self.welcomed = False
        # Honest unless a test set $HEARTH_AGENT_CHEAT (see cheat.py).
        self.cheats = cheats if cheats is not None else cheat.cheats_from_env(os.environ)
        self._cheat_rng = np.random.default_rng()
        self._last_computed: EmbedResult | None = None
        self._tasks_begun = 0
        self._benchmarking: asyncio.Task[None] | None = None

    # ---- public -----------------------------------------------------------

    @property
    def work_allowed(self) -> bool:
        return self.verdict is None or self.verdict.allowed

    @property
    def free_slots(self) -> int:
        if not self.work_allowed:
            return 0
        if self.draining:
            return 0
        return max(0, self.slots - len(self.tasks))

    async def run(self) -> SessionEnd:
        try:
            hello = self._hello_payload()
            await self._send(Hello(payload=hello))
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
            self.welcomed = True
            self.supervisor.on_ready = self._worker_restarted
            if self.draining:
                # Still draining from before this connection: say so before anything else.
                await self._send(Drain(payload=DrainPayload(draining=True, reason=self.drain_reason)))
            # Judge the site before advertising slots: a flat battery must not attract work.
            first_reading = await self._read_power()
            await self._send_ready()
            heartbeats = self._spawn(self._heartbeat_loop())
            power = self._spawn(self._power_loop(first_reading))
            if hello.benchmark is None and self.supervisor.info is not None:
                self._benchmark_start(force=False, why="none cached for this hardware")
            try:
                await self._receive_loop()
            finally:
                heartbeats.cancel()
                power.cancel()
        except ConnectionClosed:
            pass
        finally:
            self._shutdown()
        return self._ended()

    # ---- frames out -------------------------------------------------------

    async def _send(self, frame: Any) -> None:
        async with self._send_lock:
            await self.ws.send(dump_frame(frame))

    def _hello_payload(self) -> HelloPayload:
        """The hello, with the benchmark cached for the worker's hardware if there is one."""
        report = self.hello.benchmark or self._cached_benchmark()
        hello = self.hello.model_copy(update={"benchmark": report}) if report else self.hello
        return cheat.hello_apply(self.cheats, hello)

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
                            status="draining" if self.draining else "busy" if live else "idle",
                            free_slots=self.free_slots,
                            running=[t.assign.lease_id for t in live],
                        )
                    )
                )

    # ---- energy -----------------------------------------------------------

    async def _read_power(self) -> PowerReading | None:
        """One reading (site probes may block: off the loop), judged under the owner's policy."""
        try:
            reading = await asyncio.to_thread(self.energy.read)
        except Exception:
            log.exception("power reading failed; keeping the previous verdict")
            return None
        if self.verdict is not None and reading.verdict.allowed != self.verdict.allowed:
            log.info(
                "energy policy now %s new work: %s",
                "allows" if reading.verdict.allowed else "stops",
                reading.verdict.reason,
            )
        self.verdict = reading.verdict
        return reading

    async def _power_loop(self, reading: PowerReading | None) -> None:
        """A power frame every interval, or at once after a config frame. The frame carries the
        verdict (the server stops assigning on it); when work is allowed again, `ready` brings the
        free slots back at once instead of at the next heartbeat."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                if reading is not None:
                    await self._send(Power(payload=reading.payload()))
                self._power_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._power_wake.wait(), self.energy.interval_s)
                was_allowed = self.work_allowed
                reading = await self._read_power()
                if self.work_allowed and not was_allowed:
                    await self._send_ready()

    def _on_config(self, config: Config) -> None:
        self.energy.apply_config(config.payload)
        # Judge the new policy now rather than at the end of the old interval.
        self._power_wake.set()

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
            elif isinstance(frame, Config):
                self._on_config(frame)
            elif isinstance(frame, TaskCancel):
                self._on_cancel(frame.payload.lease_id, frame.payload.task_id, frame.payload.reason)
            elif isinstance(frame, BenchmarkRequest):
                self._on_benchmark_request(frame.payload.reason)
            elif isinstance(frame, TaskRejected):
                p = frame.payload
                log.warning(
                    "server rejected the result of task %s (lease %s): %s", p.task_id, p.lease_id, p.reason
                )
            elif isinstance(frame, HeartbeatAck):
                pass  # this agent never asks for one; a server that answers anyway is harmless
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
        if self.draining:
            # Crossed our drain frame on the wire: hand it straight back, unrun.
            log.info("task %s assigned while draining; releasing it", assign.task_id)
            self._spawn(self._send_quietly(self._send_release(assign, f"draining: {self.drain_reason}")))
            return
        if not self.work_allowed and self.verdict is not None:
            # Crossed our power frame on the wire: the owner's policy says no, hand it back unrun.
            log.info("task %s assigned while the energy policy says no; releasing it", assign.task_id)
            self._spawn(self._send_quietly(self._send_release(assign, self.verdict.reason)))
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

    # ---- benchmark --------------------------------------------------------

    def _cached_benchmark(self) -> BenchmarkReport | None:
        """Found by what the worker reported, so the agent need not import torch to look."""
        info = self.supervisor.info
        if info is None:
            return None
        key = benchmark.worker_hardware_key(
            torch_version=info.torch_version, device=info.device, gpus=info.gpus
        )
        return benchmark.cached_report(self.cache.root, key)

    def _on_benchmark_request(self, reason: str) -> None:
        if not self._benchmark_start(force=True, why=f"the server asked: {reason}"):
            log.info("benchmark request (%s) ignored: one is already running", reason)

    def _benchmark_start(self, *, force: bool, why: str) -> bool:
        """Measure in the background; False when a measurement is already under way."""
        if self._benchmarking is not None and not self._benchmarking.done():
            return False
        log.info("benchmarking this machine's hardware (%s)", why)
        self._benchmarking = self._spawn(self._benchmark(force=force))
        return True

    async def _benchmark(self, *, force: bool) -> None:
        """Hardware only, in a child process: heartbeats, power frames and batches go on.
        `force` measures again (the server asked) rather than reporting the cached result."""
        if not force:
            await asyncio.sleep(_FIRST_BENCHMARK_DELAY_S)
        deadline = time.monotonic() + _BENCHMARK_IDLE_WAIT_S
        while self.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        try:
            result = await benchmark.benchmark_in_child(self.cache.root, force=force)
            report = cheat.report_apply(self.cheats, benchmark.benchmark_report(result))
        except benchmark.BenchmarkError as exc:
            log.warning("the benchmark could not run: %s", exc)
            return
        except Exception:
            log.exception("the benchmark failed")
            return
        log.info(
            "benchmark%s: %s %s, fp32 %.0f GFLOP/s, %s %s GFLOP/s, %.1f GB/s, largest allocation %d MiB",
            " (cached)" if result.get("cached") else "",
            report.device,
            report.device_name,
            report.matmul_fp32_gflops,
            report.half_dtype,
            report.matmul_half_gflops,
            report.memory_bandwidth_gbs,
            report.max_alloc_mb,
        )
        if not self._closed:
            await self._send_quietly(self._send(Benchmark(payload=report)))

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
        # A sleeper cheat ($HEARTH_AGENT_CHEAT_AFTER) answers its first tasks honestly.
        cheats = dataclasses.replace(self.cheats, vectors=self.cheats.vectors_for(self._tasks_begun))
        self._tasks_begun += 1
        if cheats.vectors == "silent":
            await self._hold_silently(task)
            return

        meter: TaskMeter | None = None

        def mark_running() -> None:
            nonlocal meter
            task.state = "running"
            meter = self.energy.start_task(busy_cores=self._busy_cores())

        try:
            model_dir = await self.cache.ensure(assign.model_sha256)
            task.state = "queued"
            if cheats.vectors == "copy" and self._last_computed is not None:
                result = cheat.copied_result(self._last_computed, count=len(assign.inputs))
            else:
                try:
                    result = await self.supervisor.embed(
                        model_dir=model_dir,
                        model_sha256=assign.model_sha256,
                        inputs=list(assign.inputs),
                        timeout_s=self._batch_timeout(assign),
                        on_start=mark_running,
                    )
                finally:
                    if meter is not None:
                        meter.stop()
                self._last_computed = result
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
            result = cheat.result_apply(cheats, result, self._cheat_rng)
            embeddings_b64, digest = encode_embeddings(result.embeddings)
            meter = meter or self.energy.start_task(busy_cores=self._busy_cores())
            energy_wh, energy_source = meter.energy(result.compute_ms)
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
                        energy_wh=energy_wh,
                        energy_source=energy_source,
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

    async def _hold_silently(self, task: LocalTask) -> None:
        """Cheat `silent`: hold the lease (heartbeats list it) and never answer, until the server
        cancels it or the session ends."""
        task.state = "queued"
        log.warning("task %s held without an answer ($HEARTH_AGENT_CHEAT=silent)", task.assign.task_id)
        await asyncio.Event().wait()

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

    # ---- drain ------------------------------------------------------------

    async def drain(self, *, reason: str, timeout_s: float) -> list[str]:
        """The owner wants the machine. Frames, in order: `drain(true)`; a `task.release` for every
        lease not yet started, at once; then the running batch's `task.result` if it finishes within
        `timeout_s`, else its `task.release` (the worker is killed; a fresh one starts warm).
        Returns the lease ids handed back."""
        self.draining, self.drain_reason = True, reason
        await self._send(Drain(payload=DrainPayload(draining=True, reason=reason)))
        # Drop every waiting task before the first await below, so none of them can reach the
        # worker in between and start running after its lease was handed back.
        waiting = [self._drop(t) for t in list(self.tasks.values()) if t.state != "running"]
        for task in waiting:
            await self._send_release(task.assign, f"draining: {reason}")
        released = [t.assign.lease_id for t in waiting]
        running = {t.handle: t for t in self.tasks.values() if t.handle is not None}
        if running:
            log.info("draining: waiting up to %.0f s for %d running batch(es)", timeout_s, len(running))
            await asyncio.wait(running, timeout=timeout_s)
            late = [
                self._drop(t)
                for h, t in running.items()
                if not h.done() and self.tasks.get(t.assign.lease_id) is t
            ]
            if late:
                await self.supervisor.abort(f"draining: the batch did not finish within {timeout_s:.0f} s")
                for task in late:
                    await self._send_release(task.assign, f"draining: not finished within {timeout_s:.0f} s")
                released += [t.assign.lease_id for t in late]
        log.info("drained (%s): %d lease(s) handed back", reason, len(released))
        return released

    async def resume(self, *, reason: str) -> None:
        """Take work again: `drain(false)`, then `ready` with the free slots."""
        self.draining, self.drain_reason = False, ""
        await self._send(Drain(payload=DrainPayload(draining=False, reason=reason)))
        await self._send_ready()
        log.info("resumed (%s)", reason)

    def _drop(self, task: LocalTask) -> LocalTask:
        """Forget a task without a result: nothing about it is sent unless the caller releases it."""
        task.cancelled = True
        self.tasks.pop(task.assign.lease_id, None)
        if task.state != "running" and task.handle is not None:
            task.handle.cancel()
        return task

    async def _send_release(self, assign: TaskAssignPayload, reason: str) -> None:
        log.info("releasing task %s (lease %s): %s", assign.task_id, assign.lease_id, reason)
        await self._send(
            TaskRelease(
                payload=TaskReleasePayload(
                    task_id=assign.task_id, lease_id=assign.lease_id, reason=reason[:500]
                )
            )
        )

    # ---- bookkeeping ------------------------------------------------------

    def _busy_cores(self) -> int:
        info = self.supervisor.info
        return info.threads if info and info.threads > 0 else os.cpu_count() or 1

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
