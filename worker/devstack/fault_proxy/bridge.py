"""One client WebSocket bridged to one server WebSocket, frame by frame.

Two readers put frames into two delayed pipes; each pipe's task delivers them. On the way
up, client MESSAGEs are counted and, when enforcing, refused with a NACK of their own; on
the way down, the server's ACKs and NACKs are translated back to the client's serials.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import WSMsgType, web

from worker.devstack.fault_proxy.counting import ConnectionCounter, RateBook
from worker.devstack.fault_proxy.faults import DelayedPipe, Faults
from worker.devstack.fault_proxy.protocol import (
    ACK,
    CONNECTED,
    MESSAGE,
    NACK,
    Frame,
    ProtocolMessage,
    decode,
    encode,
    rate_limit_nack,
)
from worker.devstack.fault_proxy.serials import Outcome, SerialMap

AnyWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
_ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
_ABNORMAL = 1006


@dataclass(frozen=True)
class Closed:
    """The other side went away: cleanly with `code`, or abruptly."""

    code: int | None
    abrupt: bool


@dataclass(frozen=True)
class Refusal:
    """A client publish the proxy refused: its NACK travels down like a server frame."""

    msg_serial: int


def abort(ws: AnyWebSocket, transport: asyncio.BaseTransport | None) -> None:
    """Cut the TCP connection under a websocket: the peer sees a drop, not a close."""
    if transport is None and isinstance(ws, aiohttp.ClientWebSocketResponse):
        # aiohttp has no public abort for a client websocket: take its connection's transport.
        conn = ws._response.connection
        transport = conn.transport if conn is not None else None
    if isinstance(transport, asyncio.Transport):
        transport.abort()


class Bridge:
    def __init__(
        self,
        *,
        client: web.WebSocketResponse,
        client_transport: asyncio.BaseTransport | None,
        upstream: aiohttp.ClientWebSocketResponse,
        faults: Faults,
        book: RateBook,
        counter: ConnectionCounter,
        binary: bool,
        serials: SerialMap | None,
        remember_serials: Callable[[str, SerialMap], None],
    ) -> None:
        self.client, self.upstream = client, upstream
        self._client_transport = client_transport
        self._faults, self._book, self.counter = faults, book, counter
        self._binary = binary
        self._serials = serials  # set when enforcing rate limits: refusals renumber serials
        self._remember_serials = remember_serials
        self._up: DelayedPipe[Frame | Closed] = DelayedPipe(faults, self._to_server)
        self._down: DelayedPipe[Frame | Closed | Refusal] = DelayedPipe(faults, self._to_client)
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        pumps = [asyncio.create_task(self._up.run()), asyncio.create_task(self._down.run())]
        self._tasks = [
            *pumps,
            asyncio.create_task(self._read(self.client, self._up.put)),
            asyncio.create_task(self._read(self.upstream, self._down.put)),
        ]
        try:
            _, rest = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            # One side has closed; the other side's close follows through its own pipe.
            if rest:
                await asyncio.wait(rest, timeout=self._faults.one_way_s + 1.0)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.counter.open = False
            for ws in (self.client, self.upstream):
                if not ws.closed:
                    abort(ws, self._client_transport if ws is self.client else None)

    def drop(self) -> None:
        """Cut both sides now: the SDK sees its transport fail and reconnects."""
        abort(self.client, self._client_transport)
        abort(self.upstream, None)
        for task in self._tasks:
            task.cancel()

    @staticmethod
    async def _read(ws: AnyWebSocket, put: Callable[[Frame | Closed, bool], None]) -> None:
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                put(msg.data, True)
            elif msg.type in _ENDED:
                code = ws.close_code
                abrupt = msg.type == WSMsgType.ERROR or code in (None, _ABNORMAL)
                put(Closed(code, abrupt), False)  # never lost: it ends the bridge
                return

    async def _to_server(self, item: Frame | Closed) -> bool:
        if isinstance(item, Closed):
            await self._close(self.upstream, None, item)
            return False
        message = decode(item)
        serial = message.get("msgSerial") if message is not None else None
        if message is not None and self._serials is not None and isinstance(serial, int):
            return await self._to_server_enforced(item, message, serial, self._serials)
        if message is not None and message.get("action") == MESSAGE:
            now = time.monotonic()
            self._book.record(self.counter, self.counter.measure(message, now), now, False)
        return await _send(self.upstream, item)

    async def _to_server_enforced(
        self, item: Frame, message: ProtocolMessage, serial: int, serials: SerialMap
    ) -> bool:
        # A resend after a resume of what the server already took is not counted or refused
        # again (Ably deduplicates it): it goes up under the serial it had the first time.
        if message.get("action") == MESSAGE and not serials.forwarded(serial):
            if not self._admit(message, serial, serials):
                return True
        upstream_serial = serials.forward(serial)
        if upstream_serial != serial:
            item = encode({**message, "msgSerial": upstream_serial}, self._binary)
        return await _send(self.upstream, item)

    def _admit(self, message: ProtocolMessage, serial: int, serials: SerialMap) -> bool:
        """Count a client publish; False if it is refused (its NACK is on its way down)."""
        now = time.monotonic()
        publish = self.counter.measure(message, now)
        refuse = not self._book.admits(self.counter, publish, now)
        self._book.record(self.counter, publish, now, refused=refuse)
        if refuse:
            serials.hold(serial)
            self._down.put(Refusal(serial))
        return not refuse

    async def _to_client(self, item: Frame | Closed | Refusal) -> bool:
        if isinstance(item, Closed):
            await self._close(self.client, self._client_transport, item)
            return False
        if isinstance(item, Refusal):
            assert self._serials is not None
            error = rate_limit_nack(item.msg_serial)["error"]
            self._serials.resolve(item.msg_serial, Outcome(False, error=error))
            return await self._send_replies()
        # Server frames are read only when needed: CONNECTED, and ACK/NACK when enforcing.
        if self._serials is None and self.counter.ably_connection_id is not None:
            return await _send(self.client, item)
        message = decode(item) or {}
        action = message.get("action")
        if action == CONNECTED:
            self._on_connected(message)
        elif action in (ACK, NACK) and self._serials is not None:
            self._serials.on_server_reply(message)
            return await self._send_replies()
        return await _send(self.client, item)

    def _on_connected(self, message: ProtocolMessage) -> None:
        connection_id = message.get("connectionId")
        self.counter.ably_connection_id = connection_id
        if self._serials is None:
            return
        if self._serials.connection_id not in (None, connection_id):
            self._serials = SerialMap()  # resume failed: the SDK starts again from serial 0
        self._serials.connection_id = connection_id
        key = (message.get("connectionDetails") or {}).get("connectionKey")
        if key:
            self._remember_serials(str(key), self._serials)

    async def _send_replies(self) -> bool:
        assert self._serials is not None
        for reply in self._serials.ready():
            if not await _send(self.client, encode(reply, self._binary)):
                return False
        return True

    @staticmethod
    async def _close(
        ws: AnyWebSocket, transport: asyncio.BaseTransport | None, closed: Closed
    ) -> None:
        if closed.abrupt:
            abort(ws, transport)
            return
        code = closed.code if closed.code and closed.code not in (1005, _ABNORMAL) else 1000
        with contextlib.suppress(Exception):
            await ws.close(code=code)


async def _send(ws: AnyWebSocket, frame: Frame) -> bool:
    """Send a frame; False once that side is gone."""
    try:
        if isinstance(frame, str):
            await ws.send_str(frame)
        else:
            await ws.send_bytes(frame)
    except (ConnectionError, aiohttp.ClientError, RuntimeError):
        return False
    return True
