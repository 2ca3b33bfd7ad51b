"""Enrollment: trade a one-time enrollment token for this machine's long-lived host token."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from hearth_agent.config import AgentConfig, config_save

ENROLL_PATH = "/api/v1/agents/enroll"


class EnrollError(Exception):
    """Enrollment failed; the message is meant for the machine's owner."""


def _server_messages(response: httpx.Response) -> str:
    """Flatten DRF-style errors ({"token": ["used"]}, {"detail": "..."}) into one line."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        parts = []
        for field, value in body.items():
            messages = value if isinstance(value, list) else [value]
            text = "; ".join(str(m) for m in messages)
            parts.append(text if field in {"detail", "non_field_errors"} else f"{field}: {text}")
        return " | ".join(parts)
    return str(body)[:300]


def agent_enroll(
    *,
    server_url: str,
    token: str,
    name: str | None = None,
    home: Path | None = None,
    timeout_s: float = 30.0,
) -> tuple[AgentConfig, Path]:
    """POST the token, save the returned identity with mode 0600, return (config, path)."""
    server_url = server_url.rstrip("/")
    if not server_url.startswith(("http://", "https://")):
        raise EnrollError(f"server URL must start with http:// or https://, got {server_url!r}")
    name = name or socket.gethostname()
    url = server_url + ENROLL_PATH
    try:
        response = httpx.post(url, json={"token": token, "name": name}, timeout=timeout_s)
    except httpx.TimeoutException:
        raise EnrollError(f"the server at {server_url} did not answer within {timeout_s:.0f} s") from None
    except httpx.HTTPError as exc:
        raise EnrollError(f"cannot reach the server at {server_url}: {exc}") from None

    if response.status_code in (400, 401, 403, 404) and "token" in response.text:
        raise EnrollError(f"the server refused the enrollment token: {_server_messages(response)}")
    if response.status_code != 201:
        raise EnrollError(
            f"enrollment failed: {url} answered HTTP {response.status_code}: {_server_messages(response)}"
        )
    try:
        body = response.json()
        config = AgentConfig(
            server_url=server_url,
            host_id=str(body["host_id"]),
            host_token=str(body["host_token"]),
            name=name,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise EnrollError(f"the server's enrollment answer is not understood: {exc}") from None
    path = config_save(config, home=home)
    return config, path
