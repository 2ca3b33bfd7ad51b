"""Wire frames a test client sends as an agent would, and the ASGI scope of its socket."""

from __future__ import annotations

from typing import Any

from hearth_agent import protocol


def hello_payload(slots: int = 1) -> protocol.HelloPayload:
    """The `hello` of a small CPU machine speaking this protocol version."""
    return protocol.HelloPayload(
        agent_version="test-client",
        protocol_version=protocol.PROTOCOL_VERSION,
        hostname="probe",
        os="linux",
        cpu_model="test",
        cpu_count=1,
        memory_mb=8192,
        device="cpu",
        slots=slots,
    )


def hello_frame(slots: int = 1) -> str:
    return protocol.dump_frame(protocol.Hello(payload=hello_payload(slots)))


def agent_scope(token: str) -> dict[str, Any]:
    """The ASGI scope of an agent's websocket to /ws/agent/ carrying `token`."""
    return {
        "type": "websocket",
        "path": "/ws/agent/",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {token}".encode())],
        "subprotocols": [],
    }
