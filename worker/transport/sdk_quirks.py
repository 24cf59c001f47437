"""Corrections to ably-python 3.1.4, each named, each in this one place.

`apply()` is idempotent and is called by `worker.transport.client` before any client is
made. Each correction has a test in `tests/test_ably_sdk_quirks.py` that fails once the SDK
no longer needs it, so it can be deleted then.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urljoin, urlsplit, urlunsplit

import httpx
import msgpack
import orjson
from ably import AblyException
from ably.http import http as ably_http
from ably.http.httputils import HttpUtils
from ably.realtime.connectionmanager import ConnectionManager, PendingMessage
from ably.rest.auth import Auth
from ably.transport import websockettransport
from ably.transport.websockettransport import ProtocolMessageAction, WebSocketTransport
from ably.types.connectionstate import ConnectionState
from ably.types.message import Message
from ably.types.mixins import EncodeDataMixin
from ably.types.operations import PublishResult, UpdateDeleteResult
from ably.util.helper import unix_time_ms
from aiohttp import ClientSession, ClientTimeout
from httpx_aiohttp import AiohttpTransport
from websockets.exceptions import ConnectionClosedOK
from websockets.protocol import State

_applied = False
_log = logging.getLogger(__name__)
# The SDK's own functions, kept so tests can show each quirk is still there.
ORIGINAL_WS_CONNECT = WebSocketTransport.ws_connect
ORIGINAL_DECODE = EncodeDataMixin.decode
ORIGINAL_DIAL = websockettransport.ws_connect  # `websockets.connect`, as the SDK imports it
ORIGINAL_ON_AUTH_UPDATED = ConnectionManager.on_auth_updated
ORIGINAL_TRANSPORT_AUTH = Auth.get_auth_transport_param
ORIGINAL_HTTPX = ably_http.httpx  # the module, as the SDK's REST layer sees it
ORIGINAL_ON_ACTIVITY = WebSocketTransport.on_activity
ORIGINAL_READ_LOOP = WebSocketTransport.ws_read_loop
ORIGINAL_ON_PROTOCOL_MESSAGE = WebSocketTransport.on_protocol_message


def realtime_url_with_port(ws_url: str, options: Any) -> str:
    """Put the configured port back into the realtime URL.

    ably-python dials `ws://HOST?...` and drops the port (`WebSocketTransport.connect`),
    while its REST calls keep it. Only an explicit, non-default port is added.
    """
    parts = urlsplit(ws_url)
    port = options.tls_port if options.tls else options.port
    default = 443 if options.tls else 80
    if parts.port is not None or not port or port == default or parts.hostname is None:
        return ws_url
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


def _fix_realtime_port() -> None:
    async def ws_connect(self: WebSocketTransport, ws_url: str, headers: Any) -> Any:
        return await ORIGINAL_WS_CONNECT(
            self, realtime_url_with_port(ws_url, self.options), headers
        )

    WebSocketTransport.ws_connect = ws_connect


def _fix_null_encoding() -> None:
    """Read `"encoding": null` as no encoding, and never raise on an undecodable payload.

    Sockudo writes an explicit null; the SDK's decoder calls `.strip()` on it and raises,
    which drops live messages silently and makes history and `get_message` fail.
    """

    def decode(
        data: Any, encoding: str | None = "", cipher: Any = None, context: Any = None
    ) -> Any:
        try:
            return ORIGINAL_DECODE(data, encoding or "", cipher, context)
        except Exception:
            if context is not None and "vcdiff" in (encoding or ""):
                raise  # a delta the SDK must recover from by re-attaching
            # One message in an encoding nobody can decode (anyone may publish one) must
            # not make a whole history page, or the live stream, fail: leave it encoded,
            # as Ably's spec asks (RSL6b), and let whoever reads it ignore it.
            return {"encoding": encoding or "", "data": data}

    EncodeDataMixin.decode = staticmethod(decode)


def _dial(uri: str, **kwargs: Any) -> Any:
    """`websockets.connect` as the SDK calls it, with the two corrections below."""
    kwargs.setdefault("compression", None)
    if uri.startswith("wss:"):
        kwargs.setdefault("ssl", TLS.context)
    return ORIGINAL_DIAL(uri, **kwargs)


def _lean_dial() -> None:
    """Dial without per-message deflate, and (`wss://`) with the one TLS context.

    ably-python dials with `websockets.connect`'s default, `compression="deflate"`, so
    any server that agrees compresses every frame both ways. The worker's frames are
    small appends (a few tokens each): compressing them saves little and cost about
    2.5 % of the worker's CPU at 64 answers where it was agreed (issue 15's profile,
    through the fault proxy, whose aiohttp server agrees; Sockudo 5.2 itself does not).
    Ably's protocol does not need it.

    For `wss://`, websockets makes a TLS context per dial (`ssl.create_default_context`)
    unless given one: what `_lean_rest_calls` spares the REST calls, paid again at every
    dial of every connection, and held for the connection's life.
    """
    websockettransport.ws_connect = _dial


class _OneTlsContext:
    """The TLS context every Ably client shares, made on first use (httpx's: its CA
    settings, `SSL_CERT_FILE`...)."""

    _context: ssl.SSLContext | None = None

    @property
    def context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = ORIGINAL_HTTPX.create_ssl_context()
        return self._context


TLS = _OneTlsContext()


class _HttpxOverAiohttp:
    """`httpx` as ably-python's REST layer sees it: the same module, except that its
    clients send over aiohttp (`httpx_aiohttp`) and verify TLS with the one context."""

    def __getattr__(self, name: str) -> Any:
        return getattr(ORIGINAL_HTTPX, name)

    def AsyncClient(self, *args: Any, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("verify", TLS.context)
        kwargs.setdefault("transport", AiohttpTransport(verify=TLS.context))
        return ORIGINAL_HTTPX.AsyncClient(*args, **kwargs)


def _lean_rest_calls() -> None:
    """Every client's REST calls (history, `get_message`, `time`) go over aiohttp, with
    one TLS context.

    ably-python gives each client an `httpx.AsyncClient` on httpx's own transport
    (httpcore over anyio): 1.5 ms of CPU per history call against Sockudo, where the same
    call over aiohttp, the transport the worker's model calls already use, costs 0.86 ms.
    Every conversation's session reads its channel's history when it starts, so a burst
    of new answers paid that hundreds of times while they streamed. The SDK's
    `http2=True` is moot on this transport (HTTP/1.1 with keep-alive; a realtime client
    makes few REST calls).

    And each of those clients built a TLS context that loads the CA bundle: 17 ms of CPU
    and 880 KB of memory per client. The worker makes one client per Ably connection (86
    at 256 answers): 1.5 s with the event loop blocked while the pool was made, and 75 MB
    holding copies of one certificate store.
    """
    ably_http.httpx = _HttpxOverAiohttp()


@dataclass
class HistoryPage:
    """One page of a channel's history, read as `history` reads it: what the callers use
    of the SDK's `PaginatedResult` (`items`, `has_next`, `next`)."""

    channel: Any
    session: ClientSession
    items: list[Message]
    next_url: str | None

    def has_next(self) -> bool:
        return self.next_url is not None

    async def next(self) -> HistoryPage | None:  # raises AblyException if refused
        if self.next_url is None:
            return None
        return await _history_page(self.channel, self.session, self.next_url)


async def history(channel: Any, *, direction: str = "backwards", limit: int = 100) -> Any:
    """`channel.history(direction=, limit=)`, sent straight over the client's aiohttp
    session (the one `_lean_rest_calls` gives its REST layer).

    Every conversation's session reads its channel's history when it is taken (hundreds
    at once after a burst of new answers). Through the SDK a call costs 0.51-0.75 ms of
    CPU against Sockudo, most of it in its REST layers (`Http.make_request`, httpx's
    request building) above aiohttp; this costs 0.22 ms. Same request (host, port,
    scheme, auth headers from the SDK's own `Auth`, JSON), same decoding
    (`Message.from_encoded_array`). Anything but a 200 (an expired token, a 5xx that the
    SDK would retry on a fallback host, an error to raise) goes the SDK's way instead.
    """
    session = _rest_session(channel)
    if session is None or channel.cipher is not None:
        return await channel.history(direction=direction, limit=limit)
    http = channel.ably.http
    path = f"/channels/{quote_plus(channel.name, safe=':')}/messages"
    url = f"{http.preferred_scheme}://{http.get_hosts()[0]}:{http.preferred_port}{path}"
    try:
        return await _history_page(channel, session, f"{url}?direction={direction}&limit={limit}")
    except AblyException:
        return await channel.history(direction=direction, limit=limit)


def _rest_session(channel: Any) -> ClientSession | None:
    """The aiohttp session under the channel's client's REST layer (None if it has none)."""
    transport = getattr(getattr(channel.ably.http, "_Http__client", None), "_transport", None)
    if not isinstance(transport, AiohttpTransport):
        return None
    if not isinstance(transport.client, ClientSession):
        transport.client = transport.get_client()  # as its first request would
    return transport.client


async def _history_page(channel: Any, session: ClientSession, url: str) -> HistoryPage:
    http = channel.ably.http
    headers = HttpUtils.default_get_headers(binary=False)
    headers.update(await channel.ably.auth._get_auth_headers())
    timeout = ClientTimeout(total=http.http_request_timeout)
    async with session.get(url, headers=headers, timeout=timeout) as response:
        if response.status != 200:
            raise AblyException(f"history: HTTP {response.status}", response.status, 50000)
        body = await response.read()
        link = response.links.get("next")
    items = Message.from_encoded_array(orjson.loads(body)) if body else []
    next_url = urljoin(url, str(link["url"])) if link is not None else None
    return HistoryPage(channel, session, items, next_url)


def _one_idle_timer() -> None:
    """Arm the connection's idle timer once, not again for every message received.

    On every protocol message received (each ACK, each message), the SDK cancels its idle
    timer and makes a new one: a task, a sleep and a timer handle, and for the cancelled
    one a `CancelledError` whose traceback holds its frames in a reference cycle. At 160
    answers that was 3,700 cancelled timers in every two seconds: CPU, and cyclic garbage
    that made young collections of 40,000 objects pause the streams 75 to 150 ms. Now an
    activity only notes its time and arms the timer if none is armed; when it fires, the
    SDK's own handler (`on_idle_timer_expire`) re-arms it for the time that remains after
    the last activity, or gives the connection up as before: dropped once nothing came for
    the connection's `maxIdleInterval` (plus Ably's realtime request timeout and 100 ms).
    """

    def on_activity(self: WebSocketTransport) -> None:
        if not self.max_idle_interval:
            return
        self.last_activity = unix_time_ms()
        if self.idle_timer is None:
            self.set_idle_timer(self.max_idle_interval + 100)

    WebSocketTransport.on_activity = on_activity


# --- a lean append (not a patch: called by name) -----------------------------------------

BACKED_UP_BYTES = 64 * 1024  # more unsent than this on the socket: the SDK's path, which drains


async def append(channel: Any, wire: dict[str, Any]) -> Any:
    """`channel.append_message` for the hot path, with the message already in wire form
    (`contract.response_append_wire`).

    The SDK's append makes a `Message`, turns it into a dict, formats two log lines
    whatever the log level, and goes through five coroutines and websockets' send
    context before its frame is written: about a third of the worker's CPU at 128 answers
    (issue 15's profile). When the connection is plainly up (connected, nothing queued
    for resending, the socket open and not backed up) and the channel is not encrypted,
    this does what that path does and no more: takes the next msgSerial, puts the message
    in the SDK's own queue of messages awaiting their ACK (which completes it, resends it
    after a resume, or fails it, as for any publish), and writes the frame, all in this
    task's first step, as the SDK does, so sends keep the order of their tasks. Otherwise
    it is the SDK's own `append_message`.
    """
    manager = channel.ably.connection.connection_manager
    websocket = _open_socket(manager)
    if websocket is None or channel.cipher is not None:
        return await channel.append_message(_message(wire))
    channel._throw_if_unpublishable_state()
    protocol_message = {
        "action": ProtocolMessageAction.MESSAGE,
        "channel": channel.name,
        "messages": [wire],
    }
    pending = PendingMessage(protocol_message)
    protocol_message["msgSerial"] = manager.msg_serial
    manager.pending_message_queue.push(pending)
    manager.msg_serial += 1
    if manager.transport.format == "msgpack":
        websocket.protocol.send_binary(msgpack.packb(protocol_message, use_bin_type=True))
    else:
        websocket.protocol.send_text(orjson.dumps(protocol_message))
    # A socket that fails here is the SDK's to notice: it requeues the pending message
    # and resends it on the resumed connection, or fails it.
    websocket.send_data()
    result = await pending.future
    serials = getattr(result, "serials", None)
    return UpdateDeleteResult(version_serial=serials[0]) if serials else UpdateDeleteResult()


def _open_socket(manager: Any) -> Any:
    """The connection's websocket if a frame can be written to it now, else None."""
    if manager.state != ConnectionState.CONNECTED or manager.queued_messages:
        return None
    websocket = getattr(manager.transport, "websocket", None)
    if websocket is None or websocket.protocol.state is not State.OPEN:
        return None
    if websocket.transport.get_write_buffer_size() > BACKED_UP_BYTES:
        return None
    return websocket


def _message(wire: dict[str, Any]) -> Message:
    return Message(
        name=wire.get("name"), serial=wire["serial"], data=wire.get("data"),
        extras=wire.get("extras"),
    )  # fmt: skip


def _no_reauth_for_rest_calls() -> None:
    """Send AUTH on the realtime connection only for a token it does not use yet.

    A realtime client's REST calls (history, `get_message`) fetch their Authorization
    header through `Auth.__authorize_when_necessary`, which hands the (cached, unchanged)
    token to `ConnectionManager.on_auth_updated`, which sends it as an AUTH protocol
    message: one per REST call. Ably answers each with a fresh CONNECTED, and the SDK
    re-attaches every channel of the connection; Sockudo then stops delivering the
    channel's live messages to it (a session that read its history after attaching never
    heard the next prompt). Each connection remembers the token it authenticated with;
    a new token (renewed, or an explicit `authorize`) is still sent.
    """

    async def get_auth_transport_param(self: Auth) -> Any:
        credentials = await ORIGINAL_TRANSPORT_AUTH(self)
        self._worker_connection_token = credentials.get("accessToken")
        return credentials

    async def on_auth_updated(self: ConnectionManager, token_details: Any) -> Any:
        auth = self.ably.auth
        if self.state == ConnectionState.CONNECTED and token_details.token == getattr(
            auth, "_worker_connection_token", None
        ):
            return None  # the connection is using this very token
        auth._worker_connection_token = token_details.token
        return await ORIGINAL_ON_AUTH_UPDATED(self, token_details)

    Auth.get_auth_transport_param = get_auth_transport_param
    ConnectionManager.on_auth_updated = on_auth_updated


# What the SDK's handler does for these is one call, no await: done as read.
_CHANNEL_ACTIONS = frozenset({
    ProtocolMessageAction.ATTACHED, ProtocolMessageAction.DETACHED,
    ProtocolMessageAction.MESSAGE, ProtocolMessageAction.PRESENCE,
    ProtocolMessageAction.ANNOTATION, ProtocolMessageAction.SYNC,
})  # fmt: skip


def _messages_as_read() -> None:
    """An ACK or a channel's message is applied as the read loop reads it: no task for
    it, no lines formatted.

    For every protocol message received, the SDK's read loop makes a task to handle it;
    the handler formats a debug line holding the whole message (an f-string, with its
    logger off) and, for an ACK, `on_ack` formats another with its results. A streaming
    worker receives mostly ACKs (one per append it sends), a subscriber mostly messages:
    at 256 answers the ACKs' three were 4 % of the worker's busy time. Each is applied as
    the SDK applies it (activity noted; an ACK's results parsed and its messages
    completed; a channel message handed to its channel), unless a message read before it
    is still being handled in its task: then it takes the SDK's way too, so nothing is
    overtaken (a NACK, say: completing an ACK's serial completes every message before
    it). Every other message goes the SDK's way.
    """

    async def ws_read_loop(self: WebSocketTransport) -> None:
        if not self.websocket:
            await ORIGINAL_READ_LOOP(self)  # raises the SDK's error
            return
        last: asyncio.Task[Any] | None = None
        try:
            async for raw in self.websocket:
                try:
                    message = self.decode_raw_websocket_frame(raw)
                    if last is None or last.done():
                        action = message.get("action")
                        if action == ProtocolMessageAction.ACK:
                            _apply_ack(self, message)
                            continue
                        if action in _CHANNEL_ACTIONS:
                            self.on_activity()
                            self.connection_manager.on_channel_message(message)
                            continue
                    last = asyncio.create_task(self.on_protocol_message(message))
                    last.add_done_callback(self.on_protcol_message_handled)
                except Exception:
                    _log.exception("ably: a protocol message could not be handled")
        except (ConnectionClosedOK, GeneratorExit):
            return

    WebSocketTransport.ws_read_loop = ws_read_loop


def _apply_ack(transport: WebSocketTransport, message: dict[str, Any]) -> None:
    transport.on_activity()
    res = message.get("res")
    results = [PublishResult.from_dict(r) for r in res] if res is not None else None
    queue = transport.connection_manager.pending_message_queue
    queue.complete_messages(message.get("msgSerial", 0), message.get("count", 1), results)


def apply() -> None:
    global _applied
    if _applied:
        return
    _fix_realtime_port()
    _fix_null_encoding()
    _lean_dial()
    _no_reauth_for_rest_calls()
    _lean_rest_calls()
    _one_idle_timer()
    _messages_as_read()
    _applied = True
