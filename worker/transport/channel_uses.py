"""Which channel objects this process uses, on which connection, and by how many users.

ably-python keeps every channel a client ever got (`client.channels.get`), attached or not,
until it is released: about 11 KB each, for the life of the connection, so a worker that
serves a new conversation every few seconds grows without end. And a channel left attached
is sent every message published on it. A session and each answer on a channel take a use
of its channel object on their connection; the last one to give it back detaches it and
releases it from the client.

A use taken while that detach is under way waits for it (`ready`) before it subscribes:
ably-python attaching a channel that is detaching leaves it SUSPENDED when the DETACHED
arrives, the attach raising a TypeError (a `raise None`), and publishing refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

DETACH_TIMEOUT_S = 2.0


class ChannelUses:
    def __init__(self) -> None:
        self._count: dict[tuple[int, str], int] = {}
        self._detaching: dict[tuple[int, str], asyncio.Event] = {}

    def take(self, client: Any, name: str) -> Any:
        """The channel object, held until `give_back`."""
        key = (id(client), name)
        self._count[key] = self._count.get(key, 0) + 1
        return client.channels.get(name)

    async def ready(self, client: Any, name: str) -> None:
        """Until the channel's detach under way, if any, has ended: then it can attach."""
        detached = self._detaching.get((id(client), name))
        if detached is not None:
            await detached.wait()

    async def give_back(self, client: Any, name: str) -> None:
        """One use less; the last one detaches the channel and releases it."""
        key = (id(client), name)
        left = self._count.get(key, 0) - 1
        if left > 0:
            self._count[key] = left
            return
        self._count.pop(key, None)
        channel = client.channels.get(name)
        detached = self._detaching[key] = asyncio.Event()
        try:
            with contextlib.suppress(Exception):  # a closed connection detaches everything
                await asyncio.wait_for(channel.detach(), DETACH_TIMEOUT_S)
        finally:
            detached.set()
            if self._detaching.get(key) is detached:
                del self._detaching[key]
        if key not in self._count:  # nobody took it again while it detached
            with contextlib.suppress(Exception):
                client.channels.release(name)
