"""The worker's presence on the agents channel: online, with its capacity and load.

Updates are coalesced: the load can change many times a second, presence need not
(Ably and Sockudo both rate-limit presence updates per member).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from worker import __version__

MIN_UPDATE_INTERVAL_S = 1.0


class AgentPresence:
    def __init__(self, channel: Any, agent_id: str, capacity: int) -> None:
        self.channel = channel
        self.agent_id = agent_id
        self.capacity = capacity
        self.in_flight = 0
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def data(self) -> dict[str, Any]:
        return {
            "id": self.agent_id,
            "version": __version__,
            "capacity": self.capacity,
            "inFlight": self.in_flight,
        }

    async def enter(self) -> None:
        await self.channel.presence.enter(self.data())
        self._task = asyncio.create_task(self._publish_updates())

    def set_in_flight(self, count: int) -> None:
        if count != self.in_flight:
            self.in_flight = count
            self._dirty.set()

    async def _publish_updates(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            with contextlib.suppress(Exception):  # presence is best effort; the next change retries
                await self.channel.presence.update(self.data())
            await asyncio.sleep(MIN_UPDATE_INTERVAL_S)

    def stop_updates(self) -> None:
        """Stop publishing load updates (this presence's connection is being replaced)."""
        if self._task is not None:
            self._task.cancel()

    async def leave(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.presence.leave(self.data())
