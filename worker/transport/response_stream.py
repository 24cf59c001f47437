"""Message per response: one growing channel message per answer.

The rhythm (DESIGN.md): publish a `message.create` and keep its serial; send each delta
with `append_message` as its own task, not awaited one by one (the SDK assigns msgSerial
synchronously, so tasks created in order go out in order, and Ably rolls the acks up);
at the end await them all together, then one closing update carries the final status
and the full text, so a client that missed a fragment converges too. (Not a closing
append with empty data: Sockudo refuses those.) An answer too long to resend whole inside
Ably's 64 KiB message limit is closed with an update of its headers alone, which leaves
the text as the appends built it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from worker.transport import contract
from worker.transport.acks import acked, settle
from worker.transport.contract import Headers, Status

T = TypeVar("T")

# Room for the headers and the protocol envelope inside Ably's 64 KiB message limit.
MAX_RESEND_BYTES = 60_000


class Pacer(Protocol):
    """The connection's say in when this answer may send (`transport.pool.Lease`)."""

    def min_interval_s(self) -> float: ...
    def reserve(self) -> float: ...


class Unpaced:
    """No budget: appends at most once per rollup window, everything else at once."""

    def __init__(self, interval_s: float = 0.04) -> None:
        self.interval_s = interval_s

    def min_interval_s(self) -> float:
        return self.interval_s

    def reserve(self) -> float:
        return 0.0


class ResponseStream:
    """One answer's message. Deltas that arrive while the answer may not send yet are
    coalesced into its next append: the first goes out at once (time to first token),
    later ones no closer than the pacer's interval (at least Ably's `appendRollupWindow`,
    so an answer costs at most 25 counted messages a second) and only with a token from
    the connection's budget. Few acks are in flight on a connection as a result (Sockudo
    drops ACKs past 32 queued on one connection, and ably-python then mis-attributes
    serials)."""

    def __init__(self, channel: Any, headers: Headers, pacer: Pacer | None = None) -> None:
        self.channel = channel
        self.headers = headers
        self.pacer = pacer or Unpaced()
        self.serial: str | None = None
        self.text = ""
        self.deltas = 0  # model deltas received
        self.appends = 0  # append messages sent (fewer: coalesced)
        self._buffer = ""
        self._last_send = -float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._pending: list[asyncio.Task[Any]] = []

    async def _paced(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """An awaited send (create, reopen, close), after its token."""
        await asyncio.sleep(self.pacer.reserve())
        return await acked(operation(), what)

    async def open(self, serial: str | None = None) -> str:
        """Start the message, or reopen the one an earlier attempt started (emptied, so the
        retry's text replaces the old one rather than following it)."""
        if serial:
            reset = contract.response_replace(serial, "", self.headers)
            await self._paced(lambda: self.channel.update_message(reset), "the reopening update")
            self.serial = serial
        else:
            # The create carries a fixed message id: if its ack was lost and the job runs
            # again, Ably's idempotent publish returns the same message, not a second one.
            create = contract.response_create(self.headers)
            result = await self._paced(lambda: self.channel.publish(create), "the create")
            self.serial = str(result.serials[0])
        return self.serial

    def append(self, delta: str) -> None:
        """Take one delta; returns at once (sends happen in their own tasks, in order)."""
        if not delta or self.serial is None:
            return
        self.text += delta
        self.deltas += 1
        self._buffer += delta
        if self._timer is None:
            wait = self._last_send + self.pacer.min_interval_s() - asyncio.get_running_loop().time()
            self._later(wait, self._take_token)

    def _later(self, wait: float, step: Callable[[], None]) -> None:
        if wait > 0:
            self._timer = asyncio.get_running_loop().call_later(wait, step)
        else:
            step()

    def _take_token(self) -> None:
        self._timer = None
        self._later(self.pacer.reserve(), self._send_buffer)

    def _send_buffer(self) -> None:
        self._timer = None
        if not self._buffer or self.serial is None:
            return
        message = contract.response_append(self.serial, self._buffer, self.headers)
        self._buffer = ""
        self._last_send = asyncio.get_running_loop().time()
        self.appends += 1
        self._pending.append(asyncio.create_task(self.channel.append_message(message)))

    async def flush(self) -> list[BaseException]:
        """Send what is coalescing, then wait for every append; returns the failures."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            await asyncio.sleep(self.pacer.reserve())
            self._send_buffer()
        pending, self._pending = self._pending, []
        return await settle(pending)

    async def close(self, status: Status, error: str | None = None) -> int:
        """Flush the appends, then mark the end with the full text. Returns failed appends."""
        assert self.serial is not None, "close() before open()"
        failures = await self.flush()
        self.headers = self.headers.with_status(status, error)
        if len(self.text.encode()) <= MAX_RESEND_BYTES:
            closing = contract.response_replace(self.serial, self.text, self.headers)
        else:
            closing = contract.response_close(self.serial, self.headers)
        await self._paced(lambda: self.channel.update_message(closing), "the closing update")
        return len(failures)
