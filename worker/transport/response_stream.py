"""Message per response: one growing channel message per answer.

The rhythm (DESIGN.md): publish a `message.create` and keep its serial; send each delta
with `append_message` as its own task, not awaited one by one (the SDK assigns msgSerial
synchronously, so tasks created in order go out in order, and Ably rolls the acks up);
at the end await them all together, then one closing update carries the final status
and the full text, so a client that missed a fragment converges too. (Not a closing
append with empty data: Sockudo refuses those.) An answer too long to resend whole inside
Ably's 64 KiB message limit is closed with an update of its headers alone, which leaves
the text as the appends built it.

A retry finds the earlier attempt's message (by the serial it saved, or else by its
message id and `responseId` in the channel's history, when the attempt died before
saving it): one closed complete or cancelled is left alone, any other is reopened.

Continuing instead (`continue_message`, for a background model response that goes on
upstream): the message is taken as it stands, never emptied. `acked_chars` says how much
of `text` Ably has acknowledged, in order, for the job record; the message may hold more
than the record says (appends acknowledged after it was written), so the resumed deltas
that repeat what it holds are taken as sent, not sent again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ably import AblyException

from worker.transport import contract, lookup, sdk_quirks
from worker.transport.acks import InFlight, acked, unless_rate_limited
from worker.transport.contract import Headers, Status
from worker.transport.publisher import Abandoned, Alive, Pacer, Unpaced, always_alive

T = TypeVar("T")

# Room for the headers and the protocol envelope inside Ably's 64 KiB message limit.
MAX_RESEND_BYTES = 60_000
FINISHED = (Status.COMPLETE, Status.CANCELLED)


class ResponseStream:
    """One answer's message. Deltas that arrive while the answer may not send yet are
    coalesced into its next append: the first goes out at once (time to first token),
    later ones no closer than the pacer's interval (at least Ably's `appendRollupWindow`,
    so an answer costs at most 25 counted messages a second) and only with a token from
    the connection's budget. Few acks are in flight on a connection as a result (Sockudo
    drops ACKs past 32 queued on one connection, and ably-python then mis-attributes
    serials)."""

    def __init__(
        self,
        channel: Any,
        headers: Headers,
        pacer: Pacer | None = None,
        alive: Alive = always_alive,
    ) -> None:
        self.channel = channel
        self.headers = headers
        self.pacer = pacer or Unpaced()
        self.alive = alive
        self.aborted = False
        self.serial: str | None = None
        self.text = ""
        self.deltas = 0  # model deltas received
        self.appends = 0  # append messages sent (fewer: coalesced)
        self._buffer = ""
        self._last_send = -float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight = InFlight()
        self._restart()

    def _restart(self) -> None:
        """Forget the text: a new message, or a continuation that could not go on."""
        self.serial = None
        self.text = ""
        self.acked_chars = 0  # the prefix of `text` Ably acknowledged, every send in order
        self._unacked: deque[tuple[asyncio.Task[Any], int]] = deque()  # (send, text end)
        self._ack_broken = False  # a send failed: the message may have a hole from there
        self._shown = ""  # text the continued message holds past `text`, not yet resumed
        self._replace = False  # the next send replaces the whole text (it held other text)

    def _may_send(self) -> bool:
        if self.aborted:
            return False
        if not self.alive():
            self.abort()
            return False
        return True

    async def _paced(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """An awaited send (create, reopen, close), after its token; sent again if Ably
        refuses it for its rate limit."""

        async def send() -> T:
            await asyncio.sleep(self.pacer.reserve())
            if not self._may_send():
                raise Abandoned(f"not sending {what}: the job is no longer this worker's")
            return await acked(operation(), what, on_timeout=self.pacer.stalled)

        return await unless_rate_limited(send, what)

    async def open(self, serial: str | None = None, *, resuming: bool = False) -> Status | None:
        """Start the message, or reopen the one an earlier attempt started (emptied, so the
        retry's text replaces the old one rather than following it). Returns the status of
        an earlier attempt's message that is already finished, which is then left alone."""
        if self.serial is not None:  # after `continue_message`: the continuation failed
            await self.flush()
            self._restart()
        found = await self._earlier(serial) if resuming or serial else None
        if found is None:
            found = await self._create()
        if found is not None and found.status in FINISHED:
            self.serial = found.serial
            return Status(found.status)
        if found is not None:
            reset = contract.response_replace(found.serial, "", self.headers)
            await self._paced(lambda: self.channel.update_message(reset), "the reopening update")
            self.serial = found.serial
        return None

    async def continue_message(self, serial: str, chars: int) -> Status | None:
        """Take an earlier attempt's message as it stands (no reset: its text stays and
        the answer goes on after it). `chars`: how much of its text the job record says
        was acknowledged. Returns the status of a message already finished (complete or
        cancelled), left alone as `open` leaves it. When it cannot be continued (not
        found, closed failed, or holding less than `chars`) `serial` stays None: the
        caller regenerates with `open`."""
        found = await lookup.response_state(self.channel, serial)
        if found is None:
            return None
        if found.status in FINISHED:
            self.serial = found.serial
            return Status(found.status)
        if found.closed or len(found.text) < chars:
            return None
        if found.status != Status.STREAMING:  # e.g. `interrupted` by a drain: text kept
            update = contract.response_close(found.serial, self.headers)
            await self._paced(lambda: self.channel.update_message(update), "the reopening update")
        self.serial = found.serial
        self.text = found.text[:chars]
        self.acked_chars = chars
        self._shown = found.text[chars:]
        return None

    async def _earlier(self, serial: str | None) -> lookup.FoundResponse | None:
        if serial:
            return await lookup.response_state(self.channel, serial) or lookup.FoundResponse(
                serial=serial, status=None, text="", headers={}
            )
        return await lookup.find_response(self.channel, self.headers.response_id)

    async def _create(self) -> lookup.FoundResponse | None:
        """Publish the create; None when it made the message (`self.serial` is set).

        The create carries a fixed message id. If an earlier attempt's create went out but
        its serial was never saved (the worker died in between), Ably's idempotent publish
        returns that message, or (Sockudo, when the message has extras) refuses the id as
        used: then the earlier message is found in the channel's history and reopened.
        """
        create = contract.response_create(self.headers)
        try:
            result = await self._paced(lambda: self.channel.publish(create), "the create")
        except AblyException as exc:
            if not contract.is_used_message_id(exc):
                raise
            found = await lookup.find_response(self.channel, self.headers.response_id)
            if found is None:
                raise
            return found
        self.serial = str(result.serials[0])
        return None

    def append(self, delta: str) -> None:
        """Take one delta; returns at once (sends happen in their own tasks, in order)."""
        if not delta or self.serial is None:
            return
        self.deltas += 1
        if self._shown:
            delta = self._skip_shown(delta)
            if not delta:
                return
        self.text += delta
        self._buffer += delta
        if self._timer is None:
            wait = self._last_send + self.pacer.min_interval_s() - asyncio.get_running_loop().time()
            self._later(wait, self._take_token)

    def _skip_shown(self, delta: str) -> str:
        """What of `delta` the continued message does not hold yet. The part that repeats
        its text is taken as sent; if it differs (the message holds text this response
        did not write there) the next send replaces the whole text."""
        n = min(len(delta), len(self._shown))
        if delta[:n] != self._shown[:n]:
            self._shown, self._replace = "", True
            return delta
        self.text += delta[:n]
        self._shown = self._shown[n:]
        if not self._ack_broken and not self._unacked:
            self.acked_chars = len(self.text)  # on the channel already
        return delta[n:]

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
        if not self._buffer or self.serial is None or not self._may_send():
            return
        if self._replace:
            self._replace = False
            whole = contract.response_replace(self.serial, self.text, self.headers)
            send = self.channel.update_message(whole)
        else:
            message = contract.response_append_wire(self.serial, self._buffer, self.headers)
            send = sdk_quirks.append(self.channel, message)
        self._buffer = ""
        self._last_send = asyncio.get_running_loop().time()
        self.appends += 1
        task = self._in_flight.add(send)
        self._unacked.append((task, len(self.text)))
        task.add_done_callback(self._on_sent)

    def _on_sent(self, _: asyncio.Task[Any]) -> None:
        """Move `acked_chars` on over the sends acknowledged in order; stop for good at
        one that failed (the text after it may have a hole on the channel)."""
        while self._unacked and self._unacked[0][0].done():
            task, end = self._unacked.popleft()
            if task.cancelled() or task.exception() is not None:
                self._ack_broken = True
            if not self._ack_broken:
                self.acked_chars = end

    async def flush(self) -> list[BaseException]:
        """Send what is coalescing, then wait for every append; returns the failures."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            await asyncio.sleep(self.pacer.reserve())
            self._send_buffer()
        return await self._in_flight.settle(on_timeout=self.pacer.stalled)

    def abort(self) -> None:
        """Stop at once: drop what is coalescing, cancel the appends in flight."""
        self.aborted = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buffer = ""
        self._in_flight.cancel()

    async def close(self, status: Status, error: str | None = None) -> int:
        """Flush the appends, then mark the end with the full text. Returns failed appends."""
        assert self.serial is not None, "close() before open()"
        failures = await self.flush()
        self.headers = self.headers.with_status(status, error)
        send, what = self.channel.update_message, "the closing update"
        if len(self.text.encode()) <= MAX_RESEND_BYTES:
            closing = contract.response_replace(self.serial, self.text, self.headers)
        elif contract.closes_by_append(self.headers):
            closing = contract.response_append(self.serial, "", self.headers)
            send, what = self.channel.append_message, "the closing append"
        else:
            closing = contract.response_close(self.serial, self.headers)
        await self._paced(lambda: send(closing), what)
        return len(failures)
