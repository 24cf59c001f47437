"""Message per token: `start`, one `token` message per delta, `stop` with the status.

The same rhythm as message per response (un-awaited publishes, awaited together at the
end), for front ends that want discrete messages; correlated by the responseId header.
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker.transport import contract
from worker.transport.contract import Headers, Status


class TokenStream:
    def __init__(self, channel: Any, headers: Headers) -> None:
        self.channel = channel
        self.headers = headers
        self.serial: str | None = None
        self.text = ""
        self.appends = 0
        self._pending: list[asyncio.Task[Any]] = []

    async def open(self, serial: str | None = None) -> str:
        """Publish `start`. A retry starts again (`start` tells clients to reset)."""
        result = await self.channel.publish(contract.token_start(self.headers))
        self.serial = str(result.serials[0])
        return self.serial

    def append(self, delta: str) -> None:
        if not delta:
            return
        self.text += delta
        self.appends += 1
        message = contract.token(delta, self.headers)
        self._pending.append(asyncio.create_task(self.channel.publish(message)))

    async def close(self, status: Status, error: str | None = None) -> int:
        results = await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending = []
        self.headers = self.headers.with_status(status, error)
        await self.channel.publish(contract.token_stop(self.text, self.headers))
        return sum(isinstance(r, BaseException) for r in results)
