"""The faults the proxy injects (latency, black hole) and the delayed pipe that applies them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Faults:
    """Knobs shared by every connection, changed at any time from tests or the control API."""

    latency_ms: float = 0.0  # round trip: half on the way up, half on the way down
    blackhole_until: float = 0.0  # time.monotonic() at which traffic flows again

    @property
    def one_way_s(self) -> float:
        return self.latency_ms / 2000

    def blackholed(self) -> bool:
        return time.monotonic() < self.blackhole_until

    def blackhole(self, seconds: float) -> None:
        self.blackhole_until = max(self.blackhole_until, time.monotonic() + seconds)

    async def wait_open(self) -> None:
        """Hang while the black hole lasts, as a new connection would."""
        left = self.blackhole_until - time.monotonic()
        while left > 0:  # a later blackhole() may extend it while we sleep
            await asyncio.sleep(left)
            left = self.blackhole_until - time.monotonic()

    async def one_way(self) -> None:
        if self.latency_ms > 0:
            await asyncio.sleep(self.one_way_s)


class DelayedPipe(Generic[T]):
    """One direction of one connection: each item is delivered one-way latency after it
    arrived, in arrival order.

    Due times are absolute, so a burst is not delayed once per item: one task sleeps until
    the head is due. Droppable items (frames) vanish in a black hole, both when they arrive
    and when they fall due; the rest (closes, for the bridge's bookkeeping) never do.
    """

    def __init__(self, faults: Faults, deliver: Callable[[T], Awaitable[bool]]) -> None:
        self._faults = faults
        self._deliver = deliver  # returns False when the pipe is finished
        self._queue: asyncio.Queue[tuple[float, T, bool]] = asyncio.Queue()

    def put(self, item: T, droppable: bool = True) -> None:
        if droppable and self._faults.blackholed():
            return
        self._queue.put_nowait((time.monotonic() + self._faults.one_way_s, item, droppable))

    async def run(self) -> None:
        while True:
            due, item, droppable = await self._queue.get()
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            if droppable and self._faults.blackholed():
                continue
            if not await self._deliver(item):
                return
