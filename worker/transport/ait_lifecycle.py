"""An AI Transport run's lifecycle events around its answer: `ai-run-start` before the
`ai-output` message is created, `ai-run-end` after it is closed (shapes: `transport.ait`);
and finding a user's `ai-input` on the channel by its ids.

Both are awaited (bounded by `transport.acks`) and take a token of the connection's
budget like every other send; neither goes out once the job is no longer this worker's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ably import AblyException

from worker.logs import get_logger
from worker.transport import ait
from worker.transport.acks import acked
from worker.transport.ait import AitRun, RunReason
from worker.transport.contract import is_used_message_id
from worker.transport.publisher import Abandoned, Alive, Pacer, Unpaced, always_alive

log = get_logger("worker.ait")


class RunLifecycle:
    def __init__(
        self,
        channel: Any,
        run: AitRun,
        response_id: str,
        pacer: Pacer | None = None,
        alive: Alive = always_alive,
    ) -> None:
        self.channel = channel
        self.run = run
        self.response_id = response_id
        self.pacer = pacer or Unpaced()
        self.alive = alive
        self.started = False  # this attempt, or an earlier one, published the start

    async def start(self) -> None:
        await self._publish(self.run.run_start(self.response_id), "ai-run-start")
        self.started = True
        log.info("ait.run_started", run_id=self.run.run_id)

    async def end(self, reason: RunReason, error: str | None = None) -> None:
        await self._publish(self.run.run_end(self.response_id, reason, error), "ai-run-end")
        log.info("ait.run_ended", run_id=self.run.run_id, reason=reason)

    async def _publish(self, message: Any, what: str) -> None:
        await asyncio.sleep(self.pacer.reserve())
        if not self.alive():
            raise Abandoned(f"not sending {what}: the job is no longer this worker's")
        try:
            await acked(self.channel.publish(message), what, on_timeout=self.pacer.stalled)
        except AblyException as exc:
            # The fixed message id was used already: an earlier attempt sent this event.
            if not is_used_message_id(exc):
                raise


@dataclass(frozen=True)
class FoundInput:
    """A user's `ai-input` found on the channel: who sent it, and its ids."""

    codec_message_id: str
    event_id: str | None
    client_id: str | None  # as Ably reports it


async def find_input(
    channel: Any,
    *,
    event_id: str | None = None,
    codec_message_id: str | None = None,
    max_pages: int = 5,
) -> FoundInput | None:
    """The newest `ai-input` with this event-id (or codec-message-id) in the channel's
    history (as the JS agent locates an invocation's input), or None."""
    page = await channel.history(limit=100)  # newest first
    for number in range(1, max_pages + 1):
        for message in page.items or []:
            part = ait.input_part(message)
            if part is None:
                continue
            if (event_id and part.event_id == event_id) or (
                codec_message_id and part.codec_message_id == codec_message_id
            ):
                client_id = getattr(message, "client_id", None) or None
                return FoundInput(part.codec_message_id, part.event_id, client_id)
        if number == max_pages or not page.has_next():
            return None
        page = await page.next()
        if page is None:
            return None
    return None
