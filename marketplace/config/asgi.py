"""ASGI entry point: HTTP through Django, /ws/agent/ and the pages' /ws/pages/ through Channels.

Handles the lifespan protocol so the embedded default can run its periodic
sweeps inside the server process.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.config.settings")

from channels.routing import ProtocolTypeRouter, URLRouter
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished
from django.db import connections

from marketplace.config.gc_tuning import collect_young_after, hand_over_gil_after

django_asgi = get_asgi_application()


def _close_request_connections(sender: Any, **kwargs: Any) -> None:
    """Under ASGI, Django runs each HTTP request on a thread of its own that ends with the request,
    so a connection kept open for reuse (CONN_MAX_AGE) is never reused: it stayed open until the
    garbage collector found it (150 requests: 76 connections left open on PostgreSQL). Closed here,
    on the request's thread, as the request ends. The test clients' handlers are not ASGIHandlers."""
    if isinstance(sender, type) and issubclass(sender, ASGIHandler):
        connections.close_all()


request_finished.connect(_close_request_connections, dispatch_uid="hearth-close-request-connections")
collect_young_after(settings.HEARTH_GC_GEN0)
hand_over_gil_after(settings.HEARTH_GIL_SWITCH_MS)

from marketplace.config import background  # noqa: E402
from marketplace.dashboard.routing import websocket_urlpatterns as page_websockets  # noqa: E402
from marketplace.gateway.routing import websocket_urlpatterns  # noqa: E402

router = ProtocolTypeRouter(
    {"http": django_asgi, "websocket": URLRouter([*websocket_urlpatterns, *page_websockets])}
)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "lifespan":
        await router(scope, receive, send)
        return
    sweeper: asyncio.Task[None] | None = None
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if settings.HEARTH_BACKGROUND == "inprocess":
                sweeper = asyncio.create_task(background.run_forever())
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if sweeper is not None:
                sweeper.cancel()
            await send({"type": "lifespan.shutdown.complete"})
            return
