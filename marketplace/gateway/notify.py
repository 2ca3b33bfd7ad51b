"""Messages from sync code (services, tasks) to live agent sockets.

Each host has its own channel; we never fan out through big groups. Sends that
follow a database change go out on commit, so an agent never hears of a row
that a rollback removed.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)


def send(channel_name: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None or not channel_name:
        return
    try:
        async_to_sync(layer.send)(channel_name, message)
    except Exception:
        logger.warning("could not send %s to %s", message.get("type"), channel_name)


def on_commit_send(channel_name: str, message: dict[str, Any]) -> None:
    transaction.on_commit(lambda: send(channel_name, message))


def send_many(messages: list[tuple[str, dict[str, Any]]]) -> None:
    """`send` to many channels (each host's own) in one trip into the event loop: a dispatch round
    may address thousands of hosts, and entering the loop once per send would cost more than the sends."""
    layer = get_channel_layer()
    if layer is None or not messages:
        return

    async def _send_all() -> None:
        for channel_name, message in messages:
            if not channel_name:
                continue
            try:
                await layer.send(channel_name, message)
            except Exception:
                logger.warning("could not send %s to %s", message.get("type"), channel_name)

    async_to_sync(_send_all)()


def on_commit_send_many(messages: list[tuple[str, dict[str, Any]]]) -> None:
    transaction.on_commit(lambda: send_many(messages))


def close(channel_name: str, code: int) -> None:
    send(channel_name, {"type": "agent.close", "code": int(code)})


def on_commit_close(channel_name: str, code: int) -> None:
    on_commit_send(channel_name, {"type": "agent.close", "code": int(code)})


def on_commit_dispatch() -> None:
    """Once the transaction commits, a dispatch round (`dispatch_round`, on the background worker)
    leases the queued work to the best free hosts and tells each host on its own channel. Not a poke
    to every live host to claim for itself: with 10,000 hosts, each submit cost 10,000 claims, nearly
    all of them empty, and the first to ask won, not the best suited."""

    def _enqueue() -> None:
        from marketplace.matching.tasks import dispatch_round

        dispatch_round.delay()

    transaction.on_commit(_enqueue)
