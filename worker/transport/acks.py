"""Waiting for Ably's acknowledgements, never for ever.

ably-python awaits each publish until its ACK or NACK, with no timeout; a lost ACK (a
dropped connection that does not resume, or a server that sheds control frames under
load, as Sockudo does past 32 queued) would hang a job for good. Every wait here is
bounded; an append that is not acknowledged in time counts as failed, and the closing
update, which carries the whole text, repairs what subscribers missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from worker.logs import get_logger

log = get_logger("worker.ably")

ACK_TIMEOUT_S = 15.0
RATE_LIMITED = 42911  # Ably: too many messages in one second (per connection or channel)
RATE_LIMIT_RETRIES = 3
RATE_LIMIT_WAIT_S = 1.0  # Ably's limits are per second: the next one has room

T = TypeVar("T")


class AckTimeout(Exception):
    """Ably did not acknowledge in time. Deliberately not a `TimeoutError`: the runner
    reads `TimeoutError` as the job's own deadline, and a 15 s wait for one ack is not."""


def _nothing() -> None:
    pass


async def acked(
    operation: Awaitable[T],
    what: str,
    timeout_s: float | None = None,
    on_timeout: Callable[[], None] = _nothing,
) -> T:
    """`on_timeout` hears of an unanswered send (the pool recycles that connection)."""
    timeout_s = ACK_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        return await asyncio.wait_for(operation, timeout_s)
    except TimeoutError:
        on_timeout()
        raise AckTimeout(f"no acknowledgement from Ably for {what} in {timeout_s:g} s") from None


class InFlight:
    """Un-awaited sends. Each is forgotten once done, keeping only its failure: an answer
    of a few hundred appends would otherwise hold every finished task (and its result)
    until it closes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failures: list[BaseException] = []

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, send: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(send)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._failures.append(error)

    async def settle(
        self, timeout_s: float = ACK_TIMEOUT_S, on_timeout: Callable[[], None] = _nothing
    ) -> list[BaseException]:
        """Wait for the sends in flight; returns the failures since the last settle, an
        unanswered send as AckTimeout (and cancelled)."""
        if self._tasks:
            # Each task's `_done` runs before `wait` returns: its failure is recorded.
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                on_timeout()
            self._failures.extend(AckTimeout("append not acknowledged") for _ in late)
        failures, self._failures = self._failures, []
        return failures

    def cancel(self) -> None:
        """Cancel every send in flight (their failures are not wanted)."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()


def is_rate_limited(error: BaseException) -> bool:
    return getattr(error, "code", None) == RATE_LIMITED


async def unless_rate_limited(send: Callable[[], Awaitable[T]], what: str) -> T:
    """`send()`, made again (up to `RATE_LIMIT_RETRIES` times, a second apart) while Ably
    refuses it for its rate limit. The budgets keep each second inside Ably's 50, but a
    busy event loop can bunch sends planned apart into one second; an awaited message (a
    create, a close) refused for that alone must not fail the answer."""
    for attempt in range(1, RATE_LIMIT_RETRIES + 1):
        try:
            return await send()
        except Exception as exc:
            if not is_rate_limited(exc):
                raise
            log.warning("ably.rate_limited", what=what, attempt=attempt)
        await asyncio.sleep(RATE_LIMIT_WAIT_S)
    return await send()
