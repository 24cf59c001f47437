"""Waiting for Ably's acknowledgements, never for ever.

ably-python awaits each publish until its ACK or NACK, with no timeout; a lost ACK (a
dropped connection that does not resume, or a server that sheds control frames under
load, as Sockudo does past 32 queued) would hang a job for good. Every wait here is
bounded; an append that is not acknowledged in time counts as failed, and the closing
update, which carries the whole text, repairs what subscribers missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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


async def settle(
    tasks: list[asyncio.Task[Any]],
    timeout_s: float = ACK_TIMEOUT_S,
    on_timeout: Callable[[], None] = _nothing,
) -> list[BaseException]:
    """Wait for un-awaited sends; returns their failures, an unanswered one as AckTimeout."""
    if not tasks:
        return []
    done, late = await asyncio.wait(tasks, timeout=timeout_s)
    for task in late:
        task.cancel()
    if late:
        on_timeout()
    failures: list[BaseException] = [AckTimeout("append not acknowledged") for _ in late]
    failures.extend(e for t in done if not t.cancelled() and (e := t.exception()) is not None)
    return failures


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
