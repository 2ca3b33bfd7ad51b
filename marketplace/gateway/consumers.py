"""The agent websocket: authenticate, parse frames, call services, send frames.

A thin interface: every decision lives in hosts/jobs/matching services. The
consumer claims work for its own host after `ready` (when the host is unverified
or something is queued), after each result and when poked, and sends `task.assign` only after the claim has committed; it
also forwards the `task.assign` messages a batch round sends to its channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from hearth_agent import protocol
from hearth_agent.policy import EnergyPolicy
from marketplace.config.deadlocks import retrying_deadlocks
from marketplace.gateway.coalesce import coalescer
from marketplace.hosts import services as host_services
from marketplace.hosts.models import Host
from marketplace.hosts.power import power_record
from marketplace.jobs import services as job_services
from marketplace.matching.selectors import tasks_queued_cached, tasks_queued_recently
from marketplace.matching.services import Assignment, tasks_claim_for_host
from marketplace.trust.services import host_benchmark_record

logger = logging.getLogger(__name__)
R = TypeVar("R")
SERVER_VERSION = "0.1.0"
# The websocket code for "the server met an unexpected condition" (retryable for the agent), which
# the ASGI server sends anyway when a handler raises.
INTERNAL_ERROR = 1011


def _current_policy(host_id: Any) -> EnergyPolicy:
    return host_services.host_policy(host=Host.objects.get(pk=host_id))


@cache
def _db_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gateway-db")


def _db(fn: Callable[..., R]) -> Callable[..., Awaitable[R]]:
    """`database_sync_to_async` on the sockets' database threads: Channels' one shared thread when
    HEARTH_GATEWAY_DB_THREADS is 1 (SQLite), else a pool of that many, each thread with its own
    connection. A socket's frames still run in order (`AgentConsumer._later`); two sockets' work
    may overlap, which the services allow for (row locks, updates conditional on the channel). A
    call whose transaction PostgreSQL aborts to break a deadlock runs again (`retrying_deadlocks`):
    each of these services is one transaction, or idempotent."""
    threads = settings.HEARTH_GATEWAY_DB_THREADS
    work = retrying_deadlocks(fn)
    if threads == 1:
        return database_sync_to_async(work)
    return database_sync_to_async(work, thread_sensitive=False, executor=_db_pool(threads))


# Each trip to a database thread (`_db`) also pays a connection health check, and waits behind the
# other sockets' trips for a free thread: a frame's database work goes in one trip.


def _hellos_accept(openings: list[host_services.SessionOpening]) -> list[tuple[Any, EnergyPolicy] | None]:
    """Check the tokens and record the sessions: for each opening, (host id, policy for the `config`
    frame), or None when the token is unknown or revoked. The policy comes from the row the session
    locked."""
    return [
        None if host is None else (host.pk, host_services.host_policy(host=host))
        for host in host_services.hosts_connect_with_tokens(openings=openings)
    ]


async def _hellos_write(
    openings: list[host_services.SessionOpening],
) -> list[tuple[Any, EnergyPolicy] | Exception | None]:
    """Many sockets' hellos in one transaction."""
    return await _together_or_each(_hellos_accept, openings, "hellos")


def _readies_accept(readies: list[host_services.Readying]) -> list[bool]:
    """Record the `ready` frames; for each, whether its host has anything to claim now: a current
    connection whose host is unverified (its known-answer tasks come from the bank), or any whose
    host is verified while a task is queued, as read now (a fresh read, which also refreshes the
    answer heartbeats use). With nothing queued, a storm of reconnects claims nothing."""
    answers = host_services.hosts_ready(readies)
    queued = any(answer.current and answer.verified for answer in answers) and tasks_queued_recently(
        max_age_s=0.0
    )
    return [answer.current and (queued or not answer.verified) for answer in answers]


async def _readies_write(readies: list[host_services.Readying]) -> list[bool | Exception]:
    """Many sockets' `ready` frames in one transaction."""
    return await _together_or_each(_readies_accept, readies, "ready frames")


T = TypeVar("T")


async def _together_or_each(
    accept: Callable[[list[T]], list[R]], items: list[T], what: str
) -> list[R | Exception]:
    """`accept(items)` on a database thread, one answer per item. Should that fail, each item is
    tried again on its own, so only the one that cannot be recorded fails (its answer is the error)."""
    try:
        return list(await _db(accept)(items))
    except Exception:
        if len(items) == 1:
            raise
        logger.warning("%d %s failed together; recording each on its own", len(items), what, exc_info=True)
    answers: list[R | Exception] = []
    for item in items:
        try:
            answers += await _db(accept)([item])
        except Exception as exc:
            answers.append(exc)
    return answers


def _bearer_token(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            parts = value.decode(errors="replace").split()
            if len(parts) == 2 and parts[0].lower() == "bearer":
                return parts[1]
    return None


async def _record_heartbeat(*, host_id: Any, channel_name: str, payload: protocol.HeartbeatPayload) -> None:
    if settings.HEARTH_PRESENCE == "db":
        # The old path, kept to compare with: one UPDATE per beat on the one database thread.
        await _db(host_services.host_heartbeat)(host_id=host_id, channel_name=channel_name, payload=payload)
        return
    beat = host_services.heartbeat_beat(host_id=host_id, channel_name=channel_name, payload=payload)
    # A presence-store write, not a query: off the sockets' database threads, and gathered with the
    # other sockets' beats into one write.
    await coalescer(_record_heartbeat, _heartbeats_write).add(beat)


_heartbeats_write = sync_to_async(host_services.hosts_heartbeats, thread_sensitive=False)


async def _sessions_end(gone: list[host_services.SessionGone]) -> None:
    await _db(host_services.hosts_disconnect)(sessions=gone)


_queued_refresh: asyncio.Future[bool] | None = None


async def _tasks_queued() -> bool:
    """Whether anything is queued, as of about a second ago: one trip to the database thread in
    flight per process, however many heartbeats ask. While that thread is minutes behind, the
    cached answer goes stale for everyone at once, and one trip each would only lengthen the wait.
    """
    global _queued_refresh
    cached = tasks_queued_cached()
    if cached is not None:
        return cached
    refresh = _queued_refresh
    if refresh is None or refresh.done() or refresh.get_loop() is not asyncio.get_running_loop():
        refresh = _queued_refresh = asyncio.ensure_future(_db(tasks_queued_recently)())
    return await asyncio.shield(refresh)


class AgentConsumer(AsyncWebsocketConsumer):
    host_token: str | None = None
    refused = False
    closed = False
    host_id: Any = None
    hello_received = False
    _worker: asyncio.Future[None] | None = None
    _jobs: deque[Callable[[], Awaitable[None]]] | None = None
    _claim_check_queued = False
    _claim_queued = False
    _hello_timer: asyncio.TimerHandle | None = None
    _hello_overdue_close: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        # Accept first so the agent can read the close code; a refused
        # handshake would only tell it "403".
        await self.accept()
        self.host_token = _bearer_token(self.scope)
        if self.host_token is None:
            await self.close(code=protocol.CloseCode.AUTH_REQUIRED)
            return
        # The token is checked with the hello, the agent's first frame, in the same trip to the
        # database as the session it opens; a socket that sends none is not held open with an
        # unchecked token.
        self._hello_timer = asyncio.get_running_loop().call_later(
            settings.HEARTH_HELLO_TIMEOUT_S, self._hello_overdue
        )

    def _hello_overdue(self) -> None:
        self._hello_timer = None
        if not self.closed:
            logger.info("closing a socket that sent no hello within %.0f s", settings.HEARTH_HELLO_TIMEOUT_S)
            self._hello_overdue_close = asyncio.ensure_future(
                self.close(code=protocol.CloseCode.MALFORMED_FRAME)
            )

    def _hello_arrived(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch without its `aclose_old_connections()` before every message.

        That call is a trip to the one database thread, so every frame, heartbeats included, waited
        behind all the database work queued there (thousands of connects: minutes). It is redundant
        here: all database work goes through `database_sync_to_async`, which closes stale
        connections around each call itself.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def disconnect(self, code: int) -> None:
        self.closed = True
        self._hello_arrived()  # nothing left to wait for
        if self._worker is not None:
            # Frames that arrived before the socket went are still handled (a result is still
            # accepted) before the host is marked gone.
            await self._worker
        if self.host_id is not None and self.hello_received:
            gone = host_services.SessionGone(
                self.host_id, self.channel_name, f"agent disconnected (code {code})"
            )
            # Gathered with the other sockets' ends into one transaction: a reconnect storm ends
            # hundreds of sessions a second, and one each cost ten statements.
            await coalescer(_sessions_end, _sessions_end).add(gone)

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        if not self.closed:
            self.closed = True
            await super().close(code=code, reason=reason)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.host_token is None or self.refused:
            return
        try:
            frame = protocol.parse_frame(text_data if text_data is not None else bytes_data or b"")
        except protocol.ProtocolError as exc:
            logger.warning("host %s sent a malformed frame: %s", self.host_id, exc)
            await self.close(code=exc.code)
            return
        if isinstance(frame, protocol.Hello):
            self._hello_arrived()  # in time, however long the database thread takes to answer it
        elif isinstance(frame, protocol.Heartbeat) and self.hello_received:
            # Never behind database work: a live host must not be swept as silent because the
            # server is busy connecting others.
            await self._on_heartbeat(frame)
            return
        self._later(lambda: self._on_frame(frame))

    def _later(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` after this connection's earlier database work, in order, without holding up
        the frames (heartbeats) that arrive meanwhile: the one database thread may be minutes
        behind while thousands of agents connect."""
        if self._jobs is None:
            self._jobs = deque()
        self._jobs.append(job)
        # The worker lives only while there is work: ten thousand idle sockets hold no task for it.
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._work(self._jobs))

    async def _work(self, jobs: deque[Callable[[], Awaitable[None]]]) -> None:
        while jobs:
            try:
                await jobs.popleft()()
            except Exception:
                logger.exception("host %s: handling a frame failed; closing its socket", self.host_id)
                await self.close(code=INTERNAL_ERROR)

    async def _on_heartbeat(self, frame: protocol.Heartbeat) -> None:
        await _record_heartbeat(host_id=self.host_id, channel_name=self.channel_name, payload=frame.payload)
        if frame.payload.ack:
            await self._send_frame(
                protocol.HeartbeatAck(payload=protocol.HeartbeatAckPayload(heartbeat_id=frame.id))
            )
        # A safety net for a lost poke, not the way work arrives (pokes, results and power frames
        # claim): only when something is queued, which one query a second answers. A fresh "nothing"
        # skips even that: at 7,700 sockets, a job per beat took 18% of the server's GIL time (py-spy).
        if frame.payload.free_slots and not self._claim_check_queued and tasks_queued_cached() is not False:
            self._claim_check_queued = True
            self._later(self._claim_if_queued)

    async def _claim_if_queued(self) -> None:
        self._claim_check_queued = False
        if await _tasks_queued():
            await self._claim_and_assign()

    async def _on_frame(self, frame: Any) -> None:
        if self.refused:
            return
        if not self.hello_received and not isinstance(frame, protocol.Hello):
            if not self.closed:
                logger.warning("host %s sent %s before hello", self.host_id, frame.type)
                await self.close(code=protocol.CloseCode.MALFORMED_FRAME)
            return
        if self.closed and not isinstance(
            frame, protocol.TaskResult | protocol.TaskFailed | protocol.TaskRelease
        ):
            return  # the socket is gone; only the work it finished is still worth recording
        match frame:
            case protocol.Hello():
                await self._on_hello(frame.payload)
            case protocol.Ready():
                # Gathered with the other sockets' ready frames, as hellos are.
                claim = await coalescer(_readies_write, _readies_write).add(
                    host_services.Readying(self.host_id, self.channel_name, frame.payload)
                )
                if isinstance(claim, Exception):
                    raise claim
                if claim:
                    await self._claim_and_assign()
            case protocol.Heartbeat():
                await self._on_heartbeat(frame)
            case protocol.TaskResult():
                outcome = await _db(job_services.task_result_accept)(
                    host_id=self.host_id, payload=frame.payload
                )
                await self._after_outcome(frame.payload.task_id, frame.payload.lease_id, outcome)
            case protocol.TaskFailed():
                outcome = await _db(job_services.task_fail)(host_id=self.host_id, payload=frame.payload)
                await self._after_outcome(frame.payload.task_id, frame.payload.lease_id, outcome)
            case protocol.TaskRelease():
                outcome = await _db(job_services.task_release)(host_id=self.host_id, payload=frame.payload)
                if not outcome.accepted:
                    await self._reject(frame.payload.task_id, frame.payload.lease_id, outcome.reason)
            case protocol.Power():
                await _db(power_record)(
                    host_id=self.host_id,
                    channel_name=self.channel_name,
                    payload=frame.payload,
                    at=timezone.now(),
                )
                # A new reading can make the host eligible (on surplus, policy window open), but the
                # claim is only worth its queries when something is queued: every host sends one of
                # these every HEARTH_POWER_INTERVAL_S.
                if await _tasks_queued():
                    await self._claim_and_assign()
            case protocol.Drain():
                await _db(host_services.host_set_draining)(
                    host_id=self.host_id, channel_name=self.channel_name, payload=frame.payload
                )
                if not frame.payload.draining:
                    await self._claim_and_assign()
            case protocol.Benchmark():
                await _db(host_benchmark_record)(host_id=self.host_id, report=frame.payload)
                await self._claim_and_assign()
            case _:
                logger.warning("host %s sent a server-only frame %s", self.host_id, frame.type)
                await self.close(code=protocol.CloseCode.MALFORMED_FRAME)

    async def _on_hello(self, hello: protocol.HelloPayload) -> None:
        if hello.protocol_version != protocol.PROTOCOL_VERSION:
            await self.close(code=protocol.CloseCode.UNSUPPORTED_VERSION)
            return
        assert self.host_token is not None
        # Gathered with the other sockets' hellos into one transaction: a reconnect storm opens
        # hundreds of sessions a second.
        accepted = await coalescer(_hellos_write, _hellos_write).add(
            host_services.SessionOpening(self.host_token, self.channel_name, hello)
        )
        if isinstance(accepted, Exception):
            raise accepted
        if accepted is None:
            self.refused = True
            await self.close(code=protocol.CloseCode.AUTH_FAILED)
            return
        self.host_id, policy = accepted
        self.hello_received = True
        await self._send_frame(
            protocol.Welcome(
                payload=protocol.WelcomePayload(
                    host_id=str(self.host_id),
                    heartbeat_interval_s=settings.HEARTH_HEARTBEAT_INTERVAL_S,
                    server_version=SERVER_VERSION,
                )
            )
        )
        await self._send_config(policy)

    async def _after_outcome(self, task_id: str, lease_id: str, outcome: job_services.ResultOutcome) -> None:
        if not outcome.accepted:
            await self._reject(task_id, lease_id, outcome.reason)
        await self._claim_and_assign()

    async def _reject(self, task_id: str, lease_id: str, reason: str) -> None:
        logger.info("rejected a frame about task %s from host %s: %s", task_id, self.host_id, reason)
        await self._send_frame(
            protocol.TaskRejected(
                payload=protocol.TaskRejectedPayload(task_id=task_id, lease_id=lease_id, reason=reason)
            )
        )

    async def _send_config(self, policy: EnergyPolicy | None = None) -> None:
        if policy is None:
            policy = await _db(_current_policy)(self.host_id)
        await self._send_frame(
            protocol.Config(
                payload=protocol.ConfigPayload(
                    policy=policy, power_interval_s=settings.HEARTH_POWER_INTERVAL_S
                )
            )
        )

    async def _claim_and_assign(self) -> None:
        if self.closed:
            return  # a lease now would only be requeued at once, and cost the task an attempt
        await self._assign(
            await _db(tasks_claim_for_host)(host_id=self.host_id, channel_name=self.channel_name)
        )

    async def _assign(self, assignments: list[Assignment]) -> None:
        for assignment in assignments:
            await self._send_frame(
                protocol.TaskAssign(
                    payload=protocol.TaskAssignPayload(
                        task_id=str(assignment.task_id),
                        lease_id=str(assignment.lease_id),
                        model_sha256=assignment.model_sha256,
                        model_name=assignment.model_name,
                        inputs=assignment.inputs,
                        lease_expires_at=assignment.lease_expires_at,
                    )
                )
            )

    async def _send_frame(self, frame: Any) -> None:
        if self.closed:
            return
        await self.send(text_data=protocol.dump_frame(frame))

    # ---- messages from the channel layer ----

    async def dispatch_poke(self, message: dict[str, Any]) -> None:
        if self.hello_received and not self._claim_queued:
            # One waiting claim answers every poke that arrives before it runs.
            self._claim_queued = True
            self._later(self._claim_poked)

    async def _claim_poked(self) -> None:
        self._claim_queued = False
        await self._claim_and_assign()

    async def task_assign(self, message: dict[str, Any]) -> None:
        """Tasks a batch round (`tasks_claim_batch`) leased to this host; the round has committed."""
        for assignment in message["assignments"]:
            await self._send_frame(protocol.TaskAssign(payload=protocol.TaskAssignPayload(**assignment)))

    async def task_cancel(self, message: dict[str, Any]) -> None:
        await self._send_frame(
            protocol.TaskCancel(
                payload=protocol.TaskCancelPayload(
                    task_id=message["task_id"], lease_id=message["lease_id"], reason=message["reason"]
                )
            )
        )

    async def agent_config(self, message: dict[str, Any]) -> None:
        if self.hello_received:
            self._later(self._send_config)

    async def agent_benchmark(self, message: dict[str, Any]) -> None:
        if self.hello_received:
            await self._send_frame(
                protocol.BenchmarkRequest(payload=protocol.BenchmarkRequestPayload(reason=message["reason"]))
            )

    async def agent_close(self, message: dict[str, Any]) -> None:
        # The server already released this connection's state; do not requeue twice.
        self.hello_received = False
        await self.close(code=message["code"])
