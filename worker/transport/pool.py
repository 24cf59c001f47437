"""Several Ably connections, and a message budget for each (and for each channel).

Ably accepts 50 inbound messages a second on one connection. An answer streaming at full
speed costs up to 25 (one append per 40 ms rollup window), so one connection carries two
such answers, not sixteen. The pool opens `ceil(concurrency / streams_per_connection)`
connections and gives each new answer the least busy one. Every message sent on a
connection (create, append, close) first takes a token from that connection's budget, a
token bucket filling at `messages_per_second` with a small burst, so no one-second
window holds more than Ably accepts; and each answer's appends are spaced at least its
fair share (`answers_on_connection / messages_per_second`) apart, so answers sharing a
connection share it evenly. What waits for a token is coalesced, not dropped.

A connection that stops acknowledging (an ack that never came; ably-python after a
connection it could not recover, 80008, leaves some publishes unacknowledged for good),
or whose queued sends must never go out (this process's lease on its jobs lapsed), is
recycled: a fresh client takes its slot, and the old one is closed once its answers are
done (or soon), its queue discarded with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.logs import get_logger
from worker.transport.channel_uses import ChannelUses

log = get_logger("worker.ably")


class Budget:
    """A token bucket: `reserve()` takes one message's token and says how long to wait
    before sending it (0: now). Reservations queue, so waits grow in order."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.capacity = burst
        self.tokens = burst
        self.updated = time.monotonic()

    def idle(self) -> bool:
        """Full again: nothing recent left to account for."""
        elapsed = time.monotonic() - self.updated
        return self.tokens + elapsed * self.rate >= self.capacity

    def reserve(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


BURST = 5.0
RECOVERY_FAILED = 80008  # Ably: "unable to recover connection"
RETIRE_AFTER_S = 20.0  # a replaced client's answers have moved on (or timed out) by then
CONNECT_WAVE = 16  # connections dialled together when the pool starts


@dataclass
class Lease:
    """One answer's share of one connection and of its channel; give it back with
    `Pool.release`."""

    client: Any
    slot: int
    channel: str
    _pool: ConnectionPool = field(repr=False)

    def min_interval_s(self) -> float:
        """How far apart this answer's appends must be right now."""
        return self._pool.interval_for(self)

    def reserve(self) -> float:
        """Take a token for one message from the connection's and the channel's budgets;
        returns the wait before it may go (the later of the two)."""
        on_connection = self._pool.budgets[self.slot].reserve()
        return max(on_connection, self._pool.channel_budgets[self.channel].reserve())

    def stalled(self) -> None:
        """An acknowledgement on this connection never came: recycle it."""
        self._pool.recycle(self.slot, self.client, "no acknowledgement")


class ConnectionPool:
    def __init__(
        self,
        make_client: Callable[[], Any],
        *,
        concurrency: int,
        streams_per_connection: int,
        messages_per_second: float,
        rollup_window_s: float,
    ) -> None:
        size = max(1, math.ceil(concurrency / max(1, streams_per_connection)))
        self.streams_per_connection = max(1, streams_per_connection)
        self.make_client = make_client
        self._started = False  # wait_connected has run: replacements connect at once
        self.clients = [self._new_client(slot) for slot in range(size)]
        self.on_recycle: list[Callable[[int], None]] = []  # told the slot of a new client
        self._retiring: dict[asyncio.Task[None], Any] = {}  # replaced clients, to close
        self.active = [0] * size
        # A burst of 5 over a rate of 44 (+ presence, at most 1/s) keeps a one-second window at 50.
        self.budgets = [Budget(messages_per_second, BURST) for _ in range(size)]
        self.messages_per_second = messages_per_second
        self.rollup_window_s = rollup_window_s
        # Ably's 50/s also holds per channel, over every connection publishing to it
        # (several answers in one conversation): a budget per channel with answers on it.
        self.channel_budgets: dict[str, Budget] = {}
        self.channel_active: dict[str, int] = {}
        self.channel_slot: dict[str, int] = {}  # the latest answer's connection, by channel
        self.uses = ChannelUses()  # the channel objects sessions and answers hold, per client

    @property
    def primary(self) -> Any:
        """The connection for everything that is not an answer (presence)."""
        return self.clients[0]

    def acquire(self, channel: str, prefer: Any = None) -> Lease:
        """The least busy connection, or `prefer` (the connection the channel's session
        listens on) while it has room: a connection never receives its own messages
        back (`echo: false`), so the session then does not hear every append."""
        slot = self._slot_with_room(prefer)
        if slot is None:
            slot = min(range(len(self.clients)), key=lambda i: self.active[i])
        self.active[slot] += 1
        if channel not in self.channel_budgets:
            self.channel_budgets[channel] = Budget(self.messages_per_second, BURST)
        self.channel_active[channel] = self.channel_active.get(channel, 0) + 1
        self.channel_slot[channel] = slot
        return Lease(self.clients[slot], slot, channel, self)

    def _slot_with_room(self, client: Any) -> int | None:
        for slot, candidate in enumerate(self.clients):
            if candidate is client and self.active[slot] < self.streams_per_connection:
                return slot
        return None

    def client_streaming(self, channel: str) -> Any:
        """The connection an answer on `channel` streams on now, or None."""
        slot = self.channel_slot.get(channel)
        return self.clients[slot] if slot is not None else None

    def release(self, lease: Lease) -> None:
        self.active[lease.slot] -= 1
        self.channel_active[lease.channel] -= 1
        if not self.channel_active[lease.channel]:
            del self.channel_active[lease.channel]
            self.channel_slot.pop(lease.channel, None)
        self._forget_idle_channels()

    def _forget_idle_channels(self) -> None:
        """Drop budgets of channels with no answer whose bucket has refilled anyway (a
        fresh one would be the same), so the dict does not grow with every channel."""
        for channel in [c for c in self.channel_budgets if c not in self.channel_active]:
            if self.channel_budgets[channel].idle():
                del self.channel_budgets[channel]

    def interval_for(self, lease: Lease) -> float:
        sharing = max(self.active[lease.slot], self.channel_active.get(lease.channel, 1), 1)
        return max(self.rollup_window_s, sharing / self.messages_per_second)

    def _new_client(self, slot: int) -> Any:
        client = self.make_client()
        connection = getattr(client, "connection", None)
        if self._started and getattr(connection, "state", None) == "initialized":
            client.connect()  # a replacement, once the pool is up: at once
        if connection is not None:

            def on_state(change: Any) -> None:
                # Connected again, but not the connection it had (Ably could not recover
                # it): its pending publishes may never be acknowledged. Start afresh.
                if getattr(getattr(change, "reason", None), "code", None) == RECOVERY_FAILED:
                    self.recycle(slot, client, "connection not recovered")

            connection.on(on_state)
        return client

    def recycle(self, slot: int, client: Any, why: str) -> None:
        """Give the slot a fresh client (once per client); close the old one later."""
        if self.clients[slot] is not client:
            return  # recycled already
        self.clients[slot] = self._new_client(slot)
        log.warning("ably.connection_recycled", slot=slot, reason=why)
        task = asyncio.get_running_loop().create_task(self._retire(slot, client))
        self._retiring[task] = client
        task.add_done_callback(self._retired)
        for listener in self.on_recycle:
            listener(slot)

    def recycle_all(self, why: str) -> None:
        for slot, client in enumerate(list(self.clients)):
            self.recycle(slot, client, why)

    async def _retire(self, slot: int, client: Any) -> None:
        """Close a replaced client once nothing uses it (bounded), discarding its queue."""
        await asyncio.sleep(RETIRE_AFTER_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 2.0)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    async def close(self) -> None:
        # The replaced clients still waiting to retire are closed now, with the rest.
        retiring = list(self._retiring.values())
        for task in list(self._retiring):
            task.cancel()
        clients = [*self.clients, *retiring]
        await asyncio.gather(*(self._close_one(c) for c in clients), return_exceptions=True)

    @staticmethod
    async def _close_one(client: Any) -> None:
        with contextlib.suppress(Exception):
            await client.close()

    async def wait_connected(self, wait_one: Callable[[Any], Any]) -> None:
        """Connect the clients not connecting yet (made with `auto_connect=False`), a wave
        at a time, and wait for each (`wait_one`). Hundreds dialled at once (token
        request, WebSocket, TLS) starve each other into Ably's request timeout."""
        self._started = True
        for start in range(0, len(self.clients), CONNECT_WAVE):
            wave = self.clients[start : start + CONNECT_WAVE]
            for client in wave:
                if getattr(client.connection, "state", None) == "initialized":
                    client.connect()
            await asyncio.gather(*(wait_one(client) for client in wave))
