"""The agent's connection loop: connect, run a session, reconnect with capped exponential backoff and
full jitter, and stop for good when the server says retrying cannot help (auth, revocation, version)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

from hearth_agent import __version__, sysinfo
from hearth_agent.config import AgentConfig
from hearth_agent.drain import DrainSource
from hearth_agent.energy import EnergyMonitor
from hearth_agent.model_cache import ModelCache
from hearth_agent.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    WS_PATH,
    CloseCode,
    GpuInfo,
    HelloPayload,
    close_code_is_retryable,
)
from hearth_agent.session import AgentSession, SessionEnd
from hearth_agent.supervisor import WorkerSupervisor

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
# A connection that lived this long was healthy: the next failure starts the backoff afresh.
STABLE_CONNECTION_S = 60.0
# Handshake statuses that mean "this token is not welcome", not "try later".
FATAL_HTTP_STATUSES = frozenset({401, 403})


class AgentStopped(Exception):
    """The server refused this agent in a way retrying cannot fix; the message tells the owner why."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class Backoff:
    """Exponential backoff with full jitter: delay ~ U(0, min(cap, base·2^attempt)), so a fleet of
    agents cut off by one server restart does not reconnect in lockstep."""

    def __init__(
        self,
        *,
        base_s: float = BACKOFF_BASE_S,
        cap_s: float = BACKOFF_CAP_S,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.rng = rng
        self.attempt = 0

    def ceiling(self) -> float:
        # min() before the power would overflow float after ~1000 attempts.
        return min(self.cap_s, self.base_s * 2.0 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        delay = float(self.rng()) * self.ceiling()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def ws_url(server_url: str) -> str:
    base = server_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    elif not base.startswith(("ws://", "wss://")):
        raise ValueError(f"server URL must be http(s)://, got {server_url!r}")
    return base + WS_PATH


def _close_name(code: int | None) -> str:
    if code is None:
        return "no close code"
    try:
        return f"{CloseCode(code).name} ({code})"
    except ValueError:
        return str(code)


class Agent:
    """Owns what outlives connections: the config, the model cache and the warm worker."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        cache_root: Path,
        slots: int | None = None,
        sandbox: str = "auto",
        hidden_paths: Sequence[Path] = (),
        threads: int | None = None,
        energy: EnergyMonitor | None = None,
    ) -> None:
        self.config = config
        # Outlives connections like the worker: the policy and the site's state carry over.
        self.energy = energy or EnergyMonitor()
        self.slots = slots or config.slots
        self.url = ws_url(config.server_url)
        self.cache = ModelCache(cache_root, server_url=config.server_url, host_token=config.host_token)
        self.supervisor = WorkerSupervisor(
            cache_dir=cache_root, sandbox=sandbox, threads=threads, hidden_paths=hidden_paths
        )
        self.backoff = Backoff()
        self.connections = 0
        # The live session (for `hearth-agent status` and drain), and the drain state, which
        # outlives connections: a session started while draining starts drained.
        self.session: AgentSession | None = None
        self.draining = False
        self.drain_reason = ""
        self.drain_source: DrainSource | None = None

    def hello(self) -> HelloPayload:
        info = self.supervisor.info
        return HelloPayload(
            agent_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            hostname=sysinfo.hostname(),
            os=sysinfo.os_description(),
            cpu_model=sysinfo.cpu_model(),
            cpu_count=sysinfo.cpu_count(),
            memory_mb=sysinfo.memory_mb(),
            gpus=[
                GpuInfo(name=str(g["name"]), memory_mb=int(g["memory_mb"]))
                for g in (info.gpus if info else [])
            ],
            torch_version=info.torch_version if info else None,
            device=info.device if info else "cpu",
            cached_models=self.cache.cached_models(),
            slots=self.slots,
            isolation=list(info.isolation) if info else [],
        )

    async def run(self) -> None:
        """Run until cancelled or until the server refuses us for good (AgentStopped)."""
        try:
            await self.supervisor.start()
            while True:
                started = time.monotonic()
                end = await self._connect_once()
                if end is not None and end.code is not None and not close_code_is_retryable(end.code):
                    raise AgentStopped(_stop_message(end), code=end.code)
                if time.monotonic() - started > STABLE_CONNECTION_S:
                    self.backoff.reset()
                delay = self.backoff.next_delay()
                log.info("reconnecting in %.1f s (attempt %d)", delay, self.backoff.attempt)
                await asyncio.sleep(delay)
        finally:
            await self.supervisor.stop()
            await self.cache.aclose()

    async def _connect_once(self) -> SessionEnd | None:
        headers = {"Authorization": f"Bearer {self.config.host_token}"}
        try:
            async with connect(
                self.url,
                additional_headers=headers,
                max_size=MAX_FRAME_BYTES,
                open_timeout=15,
                user_agent_header=f"hearth-agent/{__version__}",
            ) as ws:
                self.connections += 1
                log.info("connected to %s", self.url)
                # Refresh what the worker got: a restart may have changed it since the last session.
                await self.supervisor.start()
                session = AgentSession(
                    ws,
                    hello=self.hello(),
                    cache=self.cache,
                    supervisor=self.supervisor,
                    slots=self.slots,
                    heartbeat_fallback_s=self.config.heartbeat_interval_s,
                    energy=self.energy,
                    draining=self.draining,
                    drain_reason=self.drain_reason,
                )
                self.session = session
                try:
                    end = await session.run()
                finally:
                    self.session = None
            log.info(
                "disconnected: %s%s%s",
                _close_name(end.code),
                f" {end.reason!r}" if end.reason else "",
                " (closed by agent)" if end.by_agent else "",
            )
            return end
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in FATAL_HTTP_STATUSES:
                body = exc.response.body.decode(errors="replace")[:200] if exc.response.body else ""
                raise AgentStopped(
                    f"the server refused this agent's token at the websocket handshake (HTTP {status}) {body}".strip()
                    + "; re-enroll with: hearth-agent enroll --server URL --token TOKEN"
                ) from None
            log.warning("websocket handshake refused with HTTP %d", status)
        except InvalidURI as exc:
            raise AgentStopped(f"bad server URL {self.url}: {exc}") from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            log.warning("cannot connect to %s: %s", self.url, exc or exc.__class__.__name__)
        return None


def _stop_message(end: SessionEnd) -> str:
    hint = {
        CloseCode.AUTH_REQUIRED: "the server did not get a host token",
        CloseCode.AUTH_FAILED: "the host token was not accepted; re-enroll this machine",
        CloseCode.TOKEN_REVOKED: "this machine's host token was revoked; re-enroll this machine",
        CloseCode.UNSUPPORTED_VERSION: "this agent's protocol version is not supported; upgrade hearth-agent",
    }
    try:
        why = hint.get(CloseCode(end.code or 0), "the server closed the connection for good")
    except ValueError:
        why = "the server closed the connection for good"
    reason = f": {end.reason}" if end.reason else ""
    return f"stopping: {why} (close code {_close_name(end.code)}{reason})"
