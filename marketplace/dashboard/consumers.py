"""The job page's live feed: a websocket that pushes the job's progress until it finishes.

It reads the job on a short interval and sends only what changed, so it needs no hook in the
jobs services; a browser that loses the socket reconnects and gets the current state first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from marketplace.accounts.models import User
from marketplace.dashboard.selectors import job_live
from marketplace.jobs.selectors import job_get_for_buyer

POLL_INTERVAL_S = 0.5
# Close codes in the application range: the page's script does not reconnect after these.
CLOSE_NOT_FOUND = 4404


def _snapshot(user: User, job_id: str) -> dict[str, Any] | None:
    job = job_get_for_buyer(buyer=user, job_id=job_id)
    if job is None:
        return None
    live = job_live(job=job)
    live.pop("verification", None)
    return live


class JobProgressConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        self.job_id = str(self.scope["url_route"]["kwargs"]["job_id"])
        first = None
        if isinstance(user, User) and user.is_authenticated:
            self.user = user
            first = await database_sync_to_async(_snapshot)(user, self.job_id)
        # Accepted before closing, so the page's script sees our code (a refused handshake is
        # 1006 to a browser) and stops reconnecting. Another buyer's job looks like no job.
        await self.accept()
        if first is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.send_json(first)
        self.feed = asyncio.create_task(self._follow(first))

    async def _follow(self, last: dict[str, Any]) -> None:
        while not last["finished"]:
            await asyncio.sleep(POLL_INTERVAL_S)
            now = await database_sync_to_async(_snapshot)(self.user, self.job_id)
            if now is None:
                break
            if now != last:
                await self.send_json(now)
                last = now

    async def disconnect(self, code: int) -> None:
        feed = getattr(self, "feed", None)
        if feed is not None:
            feed.cancel()
