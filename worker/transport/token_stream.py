"""Message per token: `start`, one `token` message per delta, `stop` with the status.

The same rhythm as message per response (un-awaited publishes, awaited together at the
end), for front ends that want discrete messages; correlated by the responseId header.
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker.transport import contract
from worker.transport.acks import acked, settle
from worker.transport.contract import Headers, Status
from worker.transport.response_stream import Pacer, Unpaced


class TokenStream:
    """Every token is its own message, so each takes a token of the connection's budget:
    past it, tokens wait their turn (in order) rather than being refused by Ably."""

    def __init__(
        self, channel: Any, headers: Headers, attempt: int = 1, pacer: Pacer | None = None
    ) -> None:
        self.channel = channel
        self.headers = headers
        self.attempt = attempt
        self.pacer = pacer or Unpaced()
        self.serial: str | None = None
        self.text = ""
        self.deltas = 0
        self.appends = 0
        self._pending: list[asyncio.Task[Any]] = []

    async def open(self, serial: str | None = None) -> str:
        """Publish `start`. A retry starts again (`start` tells clients to reset)."""
        start = contract.token_start(self.headers, self.attempt)
        await asyncio.sleep(self.pacer.reserve())
        result = await acked(self.channel.publish(start), "the start message")
        self.serial = str(result.serials[0])
        return self.serial

    def append(self, delta: str) -> None:
        if not delta:
            return
        self.text += delta
        self.deltas += 1
        self.appends += 1
        message = contract.token(delta, self.headers)
        wait = self.pacer.reserve()  # reservations grow in order, so tokens stay in order
        self._pending.append(asyncio.create_task(self._publish_after(wait, message)))

    async def _publish_after(self, wait: float, message: Any) -> Any:
        if wait > 0:
            await asyncio.sleep(wait)
        return await self.channel.publish(message)

    async def close(self, status: Status, error: str | None = None) -> int:
        pending, self._pending = self._pending, []
        failures = await settle(pending)
        self.headers = self.headers.with_status(status, error)
        await asyncio.sleep(self.pacer.reserve())
        await acked(self.channel.publish(contract.token_stop(self.text, self.headers)), "stop")
        return len(failures)
