"""The owner's handle on a running agent: a unix socket `<home>/agent.sock` (0600) that answers
`status`, `drain` and `resume`, and `<home>/state.json`, rewritten while the agent runs, so
`hearth-agent status` can still say something when the agent is down.

Wire format: one JSON object per line each way; the socket's file mode is the only auth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hearth_agent import __version__
from hearth_agent.config import ensure_private_dir, write_private_file

if TYPE_CHECKING:
    from hearth_agent.connection import Agent
    from hearth_agent.drain import DrainController

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
STATE_NAME = "state.json"
STATE_EVERY_S = 2.0
EARNINGS_NOTE = "n/a until billing lands"


class ControlError(Exception):
    """The running agent could not be reached or refused the request; the message says why."""


class AgentAlreadyRunning(Exception):
    """Another agent answers on this config's control socket."""


def agent_state(agent: Agent, drainer: DrainController | None = None) -> dict[str, Any]:
    """What `status` shows, from the live agent. No secrets: the host token stays out."""
    session = agent.session
    info = agent.supervisor.info
    now = time.monotonic()
    tasks = []
    if session is not None:
        for task in session.tasks.values():
            tasks.append(
                {
                    "task_id": task.assign.task_id,
                    "lease_id": task.assign.lease_id,
                    "state": task.state,
                    "items": len(task.assign.inputs),
                    "model": task.assign.model_name,
                    "age_s": round(now - task.received_at, 1),
                }
            )
    return {
        "running": True,
        "pid": os.getpid(),
        "agent_version": __version__,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "server": agent.config.server_url,
        "host_id": agent.config.host_id,
        "name": agent.config.name,
        "connected": bool(session is not None and session.welcomed),
        "connections": agent.connections,
        "draining": agent.draining,
        "drain_reason": agent.drain_reason,
        "drain_source": agent.drain_source,
        "gpu_watch": bool(drainer is not None and drainer.probe is not None),
        "slots": agent.slots,
        "free_slots": session.free_slots if session is not None else None,
        "tasks": tasks,
        "worker": None
        if info is None
        else {"pid": info.pid, "sandbox": info.sandbox, "device": info.device, "torch": info.torch_version},
        "isolation": list(info.isolation) if info else [],
        "policy": agent.energy.policy.model_dump(mode="json"),
        "earnings_today": None,
    }


class ControlServer:
    """`async with ControlServer(...)`: serves the socket and keeps state.json fresh meanwhile."""

    def __init__(self, agent: Agent, drainer: DrainController, *, directory: Path) -> None:
        self.agent = agent
        self.drainer = drainer
        self.directory = directory
        self.socket_path = directory / SOCKET_NAME
        self.state_path = directory / STATE_NAME
        self._server: asyncio.Server | None = None
        self._writer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ControlServer:
        ensure_private_dir(self.directory)
        if self.socket_path.exists():
            if _answers(self.socket_path):
                raise AgentAlreadyRunning(
                    f"another hearth-agent is already running with {self.directory} "
                    f"(it answers on {self.socket_path}); stop it first"
                )
            self.socket_path.unlink()  # left behind by an agent that was killed
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._writer = asyncio.create_task(self._write_state_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._server is not None:
            self._server.close()
        self.socket_path.unlink(missing_ok=True)
        state = agent_state(self.agent, self.drainer)
        state.update(running=False, connected=False, tasks=[], free_slots=None)
        self._write_state(state)

    def _write_state(self, state: dict[str, Any]) -> None:
        try:
            write_private_file(self.state_path, json.dumps(state, indent=2))
        except OSError as exc:  # a full disk must not take the agent down
            log.warning("cannot write %s: %s", self.state_path, exc)

    async def _write_state_loop(self) -> None:
        while True:
            self._write_state(agent_state(self.agent, self.drainer))
            await asyncio.sleep(STATE_EVERY_S)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                command = request["command"]
            except (ValueError, KeyError, TypeError):
                reply: dict[str, Any] = {"ok": False, "error": "bad request"}
            else:
                reply = await self._dispatch(command, request)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, command: str, request: dict[str, Any]) -> dict[str, Any]:
        if command == "status":
            return {"ok": True, "state": agent_state(self.agent, self.drainer)}
        if command == "drain":
            timeout = request.get("timeout_s")
            result = await self.drainer.drain(
                reason=str(request.get("reason") or "the owner is using the machine"),
                timeout_s=float(timeout) if timeout is not None else None,
            )
            self._write_state(agent_state(self.agent, self.drainer))
            return {"ok": True, **result}
        if command == "resume":
            result = await self.drainer.resume(reason=str(request.get("reason") or "the owner resumed"))
            self._write_state(agent_state(self.agent, self.drainer))
            return {"ok": True, **result}
        return {"ok": False, "error": f"unknown command {command!r}"}


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def control_request(directory: Path, request: dict[str, Any], *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Ask the running agent; ControlError when it is not running or does not answer."""
    path = directory / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"the agent is not running (no {path})") from None
        except ConnectionRefusedError:
            raise ControlError(
                f"the agent is not running ({path} is left over from an earlier run)"
            ) from None
        except PermissionError:
            raise ControlError(f"no permission to talk to the agent at {path}; run as its user") from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ControlError(f"the agent did not answer within {timeout_s:.0f} s") from None
        except OSError as exc:
            raise ControlError(f"talking to the agent failed: {exc}") from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError("the agent's answer is not understood") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the agent refused the request")))
    return reply


def state_read(directory: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


def status_render(*, state: dict[str, Any] | None, live: bool, config: Any, policy: Any) -> str:
    """The human-readable `hearth-agent status`."""
    lines: list[str] = []
    if live and state is not None:
        lines.append(f"agent:       running (pid {state['pid']}, hearth-agent {state['agent_version']})")
    else:
        seen = f", last seen {state['updated_at']}" if state and state.get("updated_at") else ""
        lines.append(f"agent:       not running{seen}")
    lines.append(f"host:        {config.host_id} ({config.name or 'unnamed'})")
    lines.append(f"server:      {config.server_url}")
    if live and state is not None:
        connected = "connected" if state["connected"] else "not connected (reconnecting)"
        lines.append(f"connection:  {connected}")
        if state["draining"]:
            lines.append(f"work:        draining ({state['drain_source']}): {state['drain_reason']}")
        else:
            lines.append(f"work:        taking tasks ({state['free_slots']} of {state['slots']} slots free)")
        tasks = state["tasks"]
        lines.append(f"tasks:       {len(tasks) or 'none'}")
        for task in tasks:
            lines.append(
                f"  - {task['task_id']} {task['state']}: {task['items']} items of {task['model']}, "
                f"{task['age_s']:.0f} s"
            )
        worker = state.get("worker")
        if worker:
            lines.append(
                f"worker:      pid {worker['pid']}, {worker['device']}, torch {worker['torch']}, "
                f"sandbox {worker['sandbox']}"
            )
    else:
        lines.append("connection:  none (start it: hearth-agent run, or systemctl --user start hearth-agent)")
    isolation = (state or {}).get("isolation") or []
    lines.append(f"isolation:   {', '.join(isolation) if isolation else 'unknown until the worker starts'}")
    lines.append(f"policy:      {policy}")
    lines.append(f"earnings:    today {EARNINGS_NOTE}")
    return "\n".join(lines)


async def control_serve(agent: Agent, *, directory: Path) -> None:
    """Run the agent with its control socket, state file and GPU watch (NVML, where present)."""
    from hearth_agent.drain import DrainController, NvmlProcessProbe

    drainer = DrainController(agent, probe=NvmlProcessProbe.open())
    async with ControlServer(agent, drainer, directory=directory):
        watcher = asyncio.create_task(drainer.watch_gpu())
        try:
            await agent.run()
        finally:
            watcher.cancel()
