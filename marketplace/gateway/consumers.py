"""The agent websocket: authenticate, parse frames, call services, send frames.

A thin interface: every decision lives in hosts/jobs/matching services. The
consumer claims work for its own host after `ready`, after each result and
when poked, and sends `task.assign` only after the claim has committed; it
also forwards the `task.assign` messages a batch round sends to its channel.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from hearth_agent import protocol
from hearth_agent.policy import EnergyPolicy
from marketplace.hosts import services as host_services
from marketplace.hosts.models import Host
from marketplace.hosts.power import power_record
from marketplace.jobs import services as job_services
from marketplace.matching.selectors import tasks_queued_cached, tasks_queued_recently
from marketplace.matching.services import tasks_claim_for_host
from marketplace.trust.services import host_benchmark_record

logger = logging.getLogger(__name__)
SERVER_VERSION = "0.1.0"


def _current_policy(host_id: Any) -> EnergyPolicy:
    return host_services.host_policy(host=Host.objects.get(pk=host_id))


def _bearer_token(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            parts = value.decode(errors="replace").split()
            if len(parts) == 2 and parts[0].lower() == "bearer":
                return parts[1]
    return None


async def _record_heartbeat(*, host_id: Any, channel_name: str, payload: protocol.HeartbeatPayload) -> None:
    if settings.HEARTH_PRESENCE == "db":
        await database_sync_to_async(host_services.host_heartbeat)(
            host_id=host_id, channel_name=channel_name, payload=payload
        )
    else:
        # A presence-store write, not a query: off the one thread that serializes database work.
        await sync_to_async(host_services.host_heartbeat, thread_sensitive=False)(
            host_id=host_id, channel_name=channel_name, payload=payload
        )


async def _tasks_queued() -> bool:
    cached = tasks_queued_cached()
    if cached is not None:
        return cached
    return await database_sync_to_async(tasks_queued_recently)()


class AgentConsumer(AsyncWebsocketConsumer):
    host_id: Any = None
    hello_received = False

    async def connect(self) -> None:
        # Accept first so the agent can read the close code; a refused
        # handshake would only tell it "403".
        await self.accept()
        token = _bearer_token(self.scope)
        if token is None:
            await self.close(code=protocol.CloseCode.AUTH_REQUIRED)
            return
        host: Host | None = await database_sync_to_async(host_services.host_authenticate)(host_token=token)
        if host is None:
            await self.close(code=protocol.CloseCode.AUTH_FAILED)
            return
        self.host_id = host.pk

    async def disconnect(self, code: int) -> None:
        if self.host_id is not None and self.hello_received:
            await database_sync_to_async(host_services.host_disconnect)(
                host_id=self.host_id,
                channel_name=self.channel_name,
                reason=f"agent disconnected (code {code})",
            )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.host_id is None:
            return
        try:
            frame = protocol.parse_frame(text_data if text_data is not None else bytes_data or b"")
        except protocol.ProtocolError as exc:
            logger.warning("host %s sent a malformed frame: %s", self.host_id, exc)
            await self.close(code=exc.code)
            return
        if not self.hello_received and not isinstance(frame, protocol.Hello):
            logger.warning("host %s sent %s before hello", self.host_id, frame.type)
            await self.close(code=protocol.CloseCode.MALFORMED_FRAME)
            return
        match frame:
            case protocol.Hello():
                await self._on_hello(frame.payload)
            case protocol.Ready():
                await database_sync_to_async(host_services.host_ready)(
                    host_id=self.host_id, channel_name=self.channel_name, payload=frame.payload
                )
                await self._claim_and_assign()
            case protocol.Heartbeat():
                await _record_heartbeat(
                    host_id=self.host_id, channel_name=self.channel_name, payload=frame.payload
                )
                if frame.payload.ack:
                    await self._send_frame(
                        protocol.HeartbeatAck(payload=protocol.HeartbeatAckPayload(heartbeat_id=frame.id))
                    )
                # A safety net for a lost poke, not the way work arrives (pokes, results and power
                # frames claim): only when something is queued, which one query a second answers.
                if frame.payload.free_slots and await _tasks_queued():
                    await self._claim_and_assign()
            case protocol.TaskResult():
                outcome = await database_sync_to_async(job_services.task_result_accept)(
                    host_id=self.host_id, payload=frame.payload
                )
                await self._after_outcome(frame.payload.task_id, frame.payload.lease_id, outcome)
            case protocol.TaskFailed():
                outcome = await database_sync_to_async(job_services.task_fail)(
                    host_id=self.host_id, payload=frame.payload
                )
                await self._after_outcome(frame.payload.task_id, frame.payload.lease_id, outcome)
            case protocol.TaskRelease():
                outcome = await database_sync_to_async(job_services.task_release)(
                    host_id=self.host_id, payload=frame.payload
                )
                if not outcome.accepted:
                    await self._reject(frame.payload.task_id, frame.payload.lease_id, outcome.reason)
            case protocol.Power():
                await database_sync_to_async(power_record)(
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
                await database_sync_to_async(host_services.host_set_draining)(
                    host_id=self.host_id, channel_name=self.channel_name, payload=frame.payload
                )
                if not frame.payload.draining:
                    await self._claim_and_assign()
            case protocol.Benchmark():
                await database_sync_to_async(host_benchmark_record)(
                    host_id=self.host_id, report=frame.payload
                )
                await self._claim_and_assign()
            case _:
                logger.warning("host %s sent a server-only frame %s", self.host_id, frame.type)
                await self.close(code=protocol.CloseCode.MALFORMED_FRAME)

    async def _on_hello(self, hello: protocol.HelloPayload) -> None:
        if hello.protocol_version != protocol.PROTOCOL_VERSION:
            await self.close(code=protocol.CloseCode.UNSUPPORTED_VERSION)
            return
        await database_sync_to_async(host_services.host_connect)(
            host_id=self.host_id, channel_name=self.channel_name, hello=hello
        )
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
        await self._send_config()

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

    async def _send_config(self) -> None:
        policy = await database_sync_to_async(_current_policy)(self.host_id)
        await self._send_frame(
            protocol.Config(
                payload=protocol.ConfigPayload(
                    policy=policy, power_interval_s=settings.HEARTH_POWER_INTERVAL_S
                )
            )
        )

    async def _claim_and_assign(self) -> None:
        assignments = await database_sync_to_async(tasks_claim_for_host)(
            host_id=self.host_id, channel_name=self.channel_name
        )
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
        await self.send(text_data=protocol.dump_frame(frame))

    # ---- messages from the channel layer ----

    async def dispatch_poke(self, message: dict[str, Any]) -> None:
        if self.hello_received:
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
            await self._send_config()

    async def agent_benchmark(self, message: dict[str, Any]) -> None:
        if self.hello_received:
            await self._send_frame(
                protocol.BenchmarkRequest(payload=protocol.BenchmarkRequestPayload(reason=message["reason"]))
            )

    async def agent_close(self, message: dict[str, Any]) -> None:
        # The server already released this connection's state; do not requeue twice.
        self.hello_received = False
        await self.close(code=message["code"])
