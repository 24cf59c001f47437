"""Responses the server remembers: their state for `retrieve`, and a background run's events.

A background run generates in its own task, keeps every event it emits, and wakes
the streams that follow it; a client that disconnects and comes back replays the
events after its last sequence number, then follows live ones. The store is
bounded: the oldest responses are forgotten first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, Coroutine
from typing import Any

from worker.devstack.openai_local.response_events import ResponseBuilder


class StoredResponse:
    def __init__(self, builder: ResponseBuilder) -> None:
        self.builder = builder
        self.events: list[bytes] = []  # kept for background responses only
        self.task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._changed = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def append(self, batch: list[bytes]) -> None:
        self.events.extend(batch)
        self._wake()

    def close(self) -> None:
        self._done.set()
        self._wake()

    def cancel(self) -> None:
        """Stop generating: the status becomes cancelled and followers' streams end."""
        self.builder.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.close()

    async def follow(self, after: int) -> AsyncGenerator[list[bytes], None]:
        """Stored events with a sequence number above `after`, then live ones until done."""
        index = max(0, after + 1)
        while True:
            if index < len(self.events):
                batch = self.events[index:]
                index += len(batch)
                yield batch
            elif self.done:
                return
            else:
                await self._changed

    async def wait_done(self) -> None:
        await self._done.wait()

    def _wake(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()


class ResponseStore:
    def __init__(self, size: int) -> None:
        self._size = max(1, size)
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()  # background runs, even forgotten ones

    def add(self, builder: ResponseBuilder) -> StoredResponse:
        stored = StoredResponse(builder)
        self._items[builder.id] = stored
        while len(self._items) > self._size:
            self._items.popitem(last=False)  # a running task carries on unreachable
        return stored

    def run(self, stored: StoredResponse, work: Coroutine[Any, Any, None]) -> None:
        """Generate a background response in its own task, which outlives the request."""
        task = asyncio.create_task(work)
        stored.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def forget(self, response_id: str) -> None:
        self._items.pop(response_id, None)

    async def close(self) -> None:
        """Cancel every background run still going (server shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
