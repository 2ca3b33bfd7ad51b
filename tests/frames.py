"""Wire frames a test client sends as an agent would."""

from __future__ import annotations

from hearth_agent import protocol


def hello_frame(slots: int = 1) -> str:
    """A `hello` of a small CPU machine speaking this protocol version."""
    return protocol.dump_frame(
        protocol.Hello(
            payload=protocol.HelloPayload(
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
        )
    )
