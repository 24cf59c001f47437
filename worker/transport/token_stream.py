"""Message per token: `start`, one `token` message per delta, `stop` with the status.

The same rhythm as message per response (un-awaited publishes, awaited together at the
end), for front ends that want discrete messages; correlated by the responseId header.
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker.transport import contract
from worker.transport.acks import InFlight, acked, unless_rate_limited
from worker.transport.contract import Headers, Status
from worker.transport.publisher import Abandoned, Alive, Pacer, Unpaced, always_alive


class TokenStream:
    """Every token is its own message, so each takes a token of the connection's budget:
    past it, tokens wait their turn (in order) rather than being refused by Ably."""

    def __init__(
        self,
        channel: Any,
        headers: Headers,
        attempt: int = 1,
        pacer: Pacer | None = None,
        alive: Alive = always_alive,
    ) -> None:
        self.channel = channel
        self.headers = headers
        self.attempt = attempt
        self.pacer = pacer or Unpaced()
        self.alive = alive
        self.aborted = False
        self.serial: str | None = None
        self.text = ""
        self.deltas = 0
        self.appends = 0
        self._in_flight = InFlight()

    def _check(self, what: str) -> None:
        if self.aborted or not self.alive():
            self.abort()
            raise Abandoned(f"not sending {what}: the job is no longer this worker's")

    async def open(self, serial: str | None = None, *, resuming: bool = False) -> Status | None:
        """Publish `start`. A retry starts again (`start` tells clients to reset)."""
        start = contract.token_start(self.headers, self.attempt)
        result = await self._paced(start, "the start message")
        self.serial = str(result.serials[0])
        return None

    async def _paced(self, message: Any, what: str) -> Any:
        """An awaited publish, after its token; again if Ably refuses it for its rate."""

        async def send() -> Any:
            await asyncio.sleep(self.pacer.reserve())
            self._check(what)
            return await acked(self.channel.publish(message), what, on_timeout=self.pacer.stalled)

        return await unless_rate_limited(send, what)

    def append(self, delta: str) -> None:
        if not delta or self.aborted:
            return
        if not self.alive():
            self.abort()
            return
        self.text += delta
        self.deltas += 1
        self.appends += 1
        message = contract.token(delta, self.headers)
        wait = self.pacer.reserve()  # reservations grow in order, so tokens stay in order
        self._in_flight.add(self._publish_after(wait, message))

    async def _publish_after(self, wait: float, message: Any) -> Any:
        if wait > 0:
            await asyncio.sleep(wait)
        self._check("a token")
        return await self.channel.publish(message)

    def abort(self) -> None:
        self.aborted = True
        self._in_flight.cancel()

    async def close(self, status: Status, error: str | None = None) -> int:
        failures = await self._in_flight.settle(on_timeout=self.pacer.stalled)
        self.headers = self.headers.with_status(status, error)
        await self._paced(contract.token_stop(self.text, self.headers), "the stop message")
        return len(failures)
