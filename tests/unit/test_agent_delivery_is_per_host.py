"""Messages to agents go to each host's own channel, never through a channel-layer group."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_no_server_or_agent_code_sends_through_a_channel_layer_group() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("marketplace", "agent/hearth_agent")
        for path in (ROOT / folder).rglob("*.py")
        if "group_send" in path.read_text() or "group_add" in path.read_text()
    ]
    assert offenders == []
