"""Which sessions this process serves: leases taken, renewed, lost and released.

Every `lease_ttl / 3` the manager renews the leases it holds (a session whose lease was
lost stops at once), and tries to take every session nobody holds: the channels in
`LISTEN_CHANNELS`, and every channel with activity (a job enqueued, a prompt, an answer)
within `SESSION_IDLE_SECONDS`. An idle session is released and forgotten. One process
holds each session; when it dies, its lease expires and another takes the session over
and catches up (the resume routine). Should two ever overlap, the idempotent job id
(the prompt's message id) keeps one job per prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from worker.logs import get_logger
from worker.queue import Queue
from worker.sessions.session import Session, SessionOptions
from worker.sessions.store import SessionStore, now_ms
from worker.transport.pool import ConnectionPool

log = get_logger("worker.session")

TAKE_AT_ONCE = 16  # sessions started side by side


@dataclass(frozen=True)
class ManagerOptions:
    listen_channels: tuple[str, ...] = ()
    idle_s: float = 1800.0
    lease_ttl_s: float = 15.0
    session: SessionOptions = field(default_factory=SessionOptions)


class SessionManager:
    def __init__(
        self,
        store: SessionStore,
        queue: Queue,
        pool: ConnectionPool,
        options: ManagerOptions,
        agent_ids: Callable[[], Awaitable[set[str]]],
    ) -> None:
        self.store = store
        self.queue = queue
        self.pool = pool
        self.options = options
        self.agent_ids = agent_ids
        self.sessions: dict[str, Session] = {}
        self._turns = itertools.count()  # round robin over the pool's connections
        # Whether a job runs in this process (the runtime sets it): a session whose active
        # answer runs here is woken by `job_ended` instead of polling Redis for its end.
        self.running_here: Callable[[str], bool] = lambda _job_id: False

    def job_ended(self, channel: str) -> None:
        """A job of this process on `channel` has ended (its outcome written)."""
        session = self.sessions.get(channel)
        if session is not None:
            session.wake()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve sessions until `stop`; then release them all (others take over at once)."""
        for channel in self.options.listen_channels:
            await self.store.open(channel)  # the first time any worker serves it: from now
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except Exception as exc:  # Redis away: try again next time
                    log.warning("session.manage_failed", error=f"{type(exc).__name__}: {exc}")
                # A little jitter, so processes started together do not race for each one.
                interval = self.options.lease_ttl_s / 3 * random.uniform(0.8, 1.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            await self.close()

    async def tick(self) -> None:
        for channel, session in list(self.sessions.items()):
            if session.client not in self.pool.clients:  # its connection was recycled
                await self._drop(channel, release=False)  # taken again below, resumed
        lost = await self.store.renew(list(self.sessions))
        for channel in lost:
            log.warning("session.lost", channel=channel)
            await self._drop(channel, release=False)
        wanted = set(self.options.listen_channels)
        wanted.update(await self.store.active_since(now_ms() - int(self.options.idle_s * 1000)))
        for channel in [c for c in self.sessions if c not in wanted]:
            log.info("session.idle", channel=channel)
            await self._drop(channel, release=True)
            await self.store.forget(channel)
        await self._take_all(sorted(wanted - set(self.sessions)))

    async def _take_all(self, channels: list[str]) -> None:
        """Take the sessions nobody holds, a few side by side: each is an attach and a
        catch-up (about 0.1 s), and a fresh process may find thousands waiting."""
        gate = asyncio.Semaphore(TAKE_AT_ONCE)

        async def take(channel: str) -> None:
            async with gate:
                if await self.store.acquire(channel):
                    await self._take(channel)

        failures = [
            outcome
            for outcome in await asyncio.gather(*map(take, channels), return_exceptions=True)
            if isinstance(outcome, Exception)
        ]
        if failures:
            raise failures[0]  # Redis away: the next tick tries again

    def client_of(self, channel: str) -> Any:
        """The connection the channel's session listens on, or None."""
        session = self.sessions.get(channel)
        return session.client if session is not None else None

    async def _take(self, channel: str) -> None:
        # The connection an answer on the channel streams on, if any: it does not hear its
        # own appends back (`echo: false`), so the session is spared them.
        client = (
            self.pool.client_streaming(channel)
            or self.pool.clients[next(self._turns) % len(self.pool.clients)]
        )
        session = Session(channel, client, self.store, self.queue, self.options.session,
                          self.agent_ids, self.pool.uses,
                          lambda job_id: self.running_here(job_id))  # fmt: skip
        try:
            await asyncio.wait_for(session.start(), 10)
        except Exception as exc:
            log.warning("session.attach_failed", channel=channel, error=str(exc))
            await session.stop()
            await self.store.release(channel)
            return
        self.sessions[channel] = session
        log.info("session.taken", channel=channel)

    async def _drop(self, channel: str, *, release: bool) -> None:
        session = self.sessions.pop(channel, None)
        if session is not None:
            await session.stop()
        if release:
            with contextlib.suppress(Exception):
                await self.store.release(channel)

    async def close(self) -> None:
        """Release every lease first (another process takes over at once), then detach."""
        sessions, self.sessions = self.sessions, {}
        for channel in sessions:
            with contextlib.suppress(Exception):
                await self.store.release(channel)
        await asyncio.gather(*(s.stop() for s in sessions.values()), return_exceptions=True)
