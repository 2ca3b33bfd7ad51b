"""Draining a live session against a stand-in server over a real websocket: queued leases go back at
once, the running batch finishes within the bound (or is killed and handed back), the frames come in
order, and resume makes the host take work again. The worker is a stand-in whose batches finish
when the test says so; the real worker is exercised in test_agent_process.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from hearth_agent.energy import EnergyMonitor
from hearth_agent.protocol import (
    Drain,
    Heartbeat,
    HelloPayload,
    Ready,
    TaskAssign,
    TaskAssignPayload,
    TaskRelease,
    TaskResult,
    Welcome,
    WelcomePayload,
    dump_frame,
    parse_frame,
)
from hearth_agent.session import AgentSession
from hearth_agent.supervisor import EmbedResult, WorkerCrashed

SHA = "a" * 64


class FakeCache:
    async def ensure(self, sha: str) -> Path:
        return Path("/nonexistent") / sha


class FakeWorker:
    """One batch at a time, like the real one; a batch ends when `finish` is set or on abort()."""

    def __init__(self) -> None:
        self.info = None
        self.warm_models: list[str] = []
        self.on_ready: Any = None
        self.started: list[int] = []
        self.aborts: list[str] = []
        self.finish = asyncio.Event()
        self._lock = asyncio.Lock()
        self._killed: asyncio.Future[None] | None = None

    async def embed(self, *, inputs: list[str], on_start: Callable[[], None], **_: Any) -> EmbedResult:
        async with self._lock:
            on_start()
            self.started.append(len(inputs))
            self._killed = asyncio.get_running_loop().create_future()
            finished = asyncio.ensure_future(self.finish.wait())
            waiters: list[asyncio.Future[Any]] = [finished, self._killed]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            if self._killed.done():
                raise WorkerCrashed("worker killed")
            n = len(inputs)
            return EmbedResult(bytes(4 * 4 * n), n, 4, 1.0, 0.0, 0, "cpu")

    async def abort(self, why: str) -> None:
        self.aborts.append(why)
        if self._killed is not None and not self._killed.done():
            self._killed.set_result(None)


def _hello() -> HelloPayload:
    return HelloPayload(
        agent_version="test",
        protocol_version=1,
        hostname="h",
        os="linux",
        cpu_model="cpu",
        cpu_count=2,
        memory_mb=1024,
        device="cpu",
        slots=2,
    )


def _assign(n: int) -> TaskAssign:
    return TaskAssign(
        payload=TaskAssignPayload(
            task_id=f"t{n}",
            lease_id=f"lease-{n}",
            model_sha256=SHA,
            model_name="all-MiniLM-L6-v2",
            inputs=[f"sentence {n}"] * n,
            lease_expires_at=datetime.now(UTC) + timedelta(minutes=5),
        )
    )


class Harness:
    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.ws: ServerConnection | None = None
        self.connected = asyncio.Event()
        self.worker = FakeWorker()
        self.session: AgentSession | None = None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)

    def of(self, kind: type) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]

    def sequence(self) -> list[str]:
        """The frames that matter to the server's bookkeeping, in the order they arrived."""
        out = []
        for f in self.frames:
            if isinstance(f, Drain):
                out.append(f"drain:{f.payload.draining}")
            elif isinstance(f, TaskRelease | TaskResult):
                out.append(f"{f.type.split('.')[1]}:{f.payload.lease_id}")
            elif isinstance(f, Ready):
                out.append(f"ready:{f.payload.free_slots}")
        return out

    async def send(self, frame: Any) -> None:
        assert self.ws is not None
        await self.ws.send(dump_frame(frame))


async def _run(scenario: Callable[[Harness], Awaitable[None]], *, draining: bool = False) -> Harness:
    h = Harness()

    async def handler(ws: ServerConnection) -> None:
        h.ws = ws
        h.frames.append(parse_frame(await ws.recv()))
        await ws.send(
            dump_frame(
                Welcome(payload=WelcomePayload(host_id="h1", heartbeat_interval_s=0.05, server_version="t"))
            )
        )
        h.connected.set()
        async for raw in ws:
            h.frames.append(parse_frame(raw))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/ws/agent/") as ws:
            h.session = AgentSession(
                ws,
                hello=_hello(),
                cache=cast(Any, FakeCache()),
                supervisor=cast(Any, h.worker),
                slots=2,
                heartbeat_fallback_s=0.05,
                energy=EnergyMonitor(interval_s=60.0),
                draining=draining,
                drain_reason="owner gaming" if draining else "",
            )
            running = asyncio.create_task(h.session.run())
            await h.connected.wait()
            await h.wait_for(lambda: bool(h.of(Ready)))
            try:
                await scenario(h)
            finally:
                await ws.close()
                await asyncio.wait_for(running, 5)
    return h


async def _three_tasks_one_running(h: Harness) -> None:
    for n in (1, 2, 3):
        await h.send(_assign(n))
    await h.wait_for(lambda: h.worker.started == [1] and h.session is not None and len(h.session.tasks) == 3)


def test_it_hands_back_queued_leases_at_once_and_finishes_the_running_one() -> None:
    async def scenario(h: Harness) -> None:
        assert h.session is not None
        await _three_tasks_one_running(h)
        drain = asyncio.create_task(h.session.drain(reason="owner gaming", timeout_s=5.0))
        # Queued leases are back before the running batch ends.
        await h.wait_for(lambda: len(h.of(TaskRelease)) == 2)
        assert not drain.done() and not h.of(TaskResult)
        h.worker.finish.set()
        assert await asyncio.wait_for(drain, 5) == ["lease-2", "lease-3"]
        await h.wait_for(lambda: bool(h.of(TaskResult)))
        beats = len(h.of(Heartbeat))
        await h.wait_for(lambda: len(h.of(Heartbeat)) > beats + 1)

    h = asyncio.run(_run(scenario))
    assert h.sequence()[1:] == ["drain:True", "release:lease-2", "release:lease-3", "result:lease-1"]
    assert h.worker.started == [1], "a released task reached the worker"
    assert h.worker.aborts == []
    released = h.of(TaskRelease)
    assert all(r.payload.reason.startswith("draining: owner gaming") for r in released)
    last = h.of(Heartbeat)[-1].payload
    assert (last.status, last.free_slots, last.running) == ("draining", 0, [])


def test_it_kills_a_batch_that_outlives_the_bound_and_hands_it_back() -> None:
    async def scenario(h: Harness) -> None:
        assert h.session is not None
        await _three_tasks_one_running(h)
        loop = asyncio.get_running_loop()
        started = loop.time()
        released = await h.session.drain(reason="owner gaming", timeout_s=0.3)
        assert 0.3 <= loop.time() - started < 2.0
        assert released == ["lease-2", "lease-3", "lease-1"]
        await asyncio.sleep(0.1)  # the killed batch's failure must not reach the server

    h = asyncio.run(_run(scenario))
    assert h.sequence()[1:] == ["drain:True", "release:lease-2", "release:lease-3", "release:lease-1"]
    assert len(h.worker.aborts) == 1
    assert not [f for f in h.frames if f.type == "task.failed.v1"]


def test_it_releases_work_assigned_while_draining_and_resumes() -> None:
    async def scenario(h: Harness) -> None:
        assert h.session is not None
        assert await h.session.drain(reason="owner gaming", timeout_s=1.0) == []
        await h.send(_assign(4))  # crossed the drain frame on the wire
        await h.wait_for(lambda: bool(h.of(TaskRelease)))
        await h.session.resume(reason="owner done")
        await h.send(_assign(5))
        await h.wait_for(lambda: h.worker.started == [5])
        h.worker.finish.set()
        await h.wait_for(lambda: bool(h.of(TaskResult)))
        await h.wait_for(lambda: [b.payload.status for b in h.of(Heartbeat)][-1:] == ["idle"])

    h = asyncio.run(_run(scenario))
    assert h.sequence() == [
        "ready:2",
        "drain:True",
        "release:lease-4",
        "drain:False",
        "ready:2",
        "result:lease-5",
    ]
    assert h.worker.started == [5]
    resumed = next(f for f in h.of(Drain) if not f.payload.draining)
    assert resumed.payload.reason == "owner done"


def test_a_session_that_starts_while_draining_says_so_before_ready() -> None:
    async def scenario(h: Harness) -> None:
        await h.send(_assign(1))
        await h.wait_for(lambda: bool(h.of(TaskRelease)))

    h = asyncio.run(_run(scenario, draining=True))
    assert h.sequence() == ["drain:True", "ready:0", "release:lease-1"]
    assert h.worker.started == []


@pytest.mark.parametrize(
    ("foreign", "draining", "source", "free_for_s", "action"),
    [
        (None, False, None, None, "none"),  # no NVML: never guess
        ([], False, None, 0.0, "none"),
        ([(42, "game")], False, None, None, "drain"),
        ([(42, "game")], True, "owner", None, "none"),  # already draining
        ([], True, "gpu", 10.0, "none"),  # free, but not for long enough
        ([], True, "gpu", 60.0, "resume"),
        ([], True, "owner", 600.0, "none"),  # the owner's drain waits for `drain --resume`
    ],
)
def test_the_gpu_watch_drains_when_another_process_takes_the_gpu(
    foreign: list[tuple[int, str]] | None, draining: bool, source: Any, free_for_s: float | None, action: str
) -> None:
    from hearth_agent.drain import GpuProcess, gpu_drain_decide

    decision = gpu_drain_decide(
        foreign=None if foreign is None else [GpuProcess(pid, name) for pid, name in foreign],
        draining=draining,
        source=source,
        free_for_s=free_for_s,
        resume_after_s=60.0,
    )
    assert decision.action == action
    if action == "drain":
        assert "game (pid 42)" in decision.reason
