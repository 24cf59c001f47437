"""The corrections in `worker.transport.sdk_quirks`: each works, and each is still needed.

A test named `..._still_...` fails once ably-python fixes the quirk: then delete the
correction and the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from ably import AblyException
from ably.realtime.connectionmanager import PendingMessage, PendingMessageQueue
from ably.transport.websockettransport import ProtocolMessageAction, WebSocketTransport
from ably.types.channelstate import ChannelState
from httpx_aiohttp import AiohttpTransport

from worker.devstack.ably import LocalAbly
from worker.devstack.fault_proxy import FaultProxy
from worker.transport import sdk_quirks
from worker.transport.channel_uses import ChannelUses
from worker.transport.client import realtime_client


def _options(tls: bool, port: int = 0, tls_port: int = 0) -> Any:
    return SimpleNamespace(tls=tls, port=port, tls_port=tls_port)


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("ws://127.0.0.1?v=5", _options(False, port=8080), "ws://127.0.0.1:8080?v=5"),
        ("wss://h.example?v=5", _options(True, tls_port=8443), "wss://h.example:8443?v=5"),
        ("ws://[::1]?v=5", _options(False, port=9000), "ws://[::1]:9000?v=5"),
        # Ably itself: default ports, nothing to correct.
        ("wss://main.realtime.ably.net?v=5", _options(True), "wss://main.realtime.ably.net?v=5"),
        ("ws://127.0.0.1?v=5", _options(False, port=80), "ws://127.0.0.1?v=5"),
        # A URL that already has a port is left alone.
        ("ws://127.0.0.1:7000?v=5", _options(False, port=8080), "ws://127.0.0.1:7000?v=5"),
    ],
)
def test_realtime_url_gets_the_configured_port(url: str, options: Any, expected: str) -> None:
    assert sdk_quirks.realtime_url_with_port(url, options) == expected


async def test_sdk_still_drops_the_realtime_port(
    local_ably: LocalAbly, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ably.transport.websockettransport")
    client = realtime_client(local_ably.key, local_ably.endpoint)
    try:
        await client.connection.once_async("connected")  # connected: the correction works
        dialled = [r.getMessage() for r in caplog.records if "attempting to connect" in r.message]
        assert dialled, "the SDK no longer logs the URL it dials: check the quirk by hand"
        assert "ws://127.0.0.1?" in dialled[0]
        assert f":{local_ably.port}" not in dialled[0]
    finally:
        await client.close()


def test_sdk_decoder_still_rejects_a_null_encoding() -> None:
    with pytest.raises(AttributeError):
        sdk_quirks.ORIGINAL_DECODE("text", None)
    sdk_quirks.apply()
    from ably.types.message import Message

    assert Message.from_encoded({"data": "text", "encoding": None}).data == "text"


async def test_python_booleans_in_transport_params_are_still_refused(local_ably: LocalAbly) -> None:
    """The SDK sends `str(True)`; Sockudo answers HTTP 400. The factory sends `true`."""
    from ably import AblyRealtime

    from worker.transport.endpoint import Endpoint

    raw = AblyRealtime(
        key=local_ably.key, use_token_auth=True, transport_params={"echo": True},
        **Endpoint.parse(local_ably.endpoint).client_options(),
    )  # fmt: skip
    ours = realtime_client(local_ably.key, local_ably.endpoint, transport_params={"echo": True})
    try:
        await ours.connection.once_async("connected")
        await asyncio.sleep(0.5)
        assert raw.connection.state != "connected"
        assert raw.connection.error_reason is not None and "400" in str(raw.connection.error_reason)
    finally:
        await ours.close()
        with contextlib.suppress(Exception):
            await raw.close()


async def test_realtime_token_requests_carry_the_configured_client_id(
    local_ably: LocalAbly,
) -> None:
    """Without `default_token_params`, ably-python's realtime client signs token requests
    without its clientId and then refuses its own token (40102)."""
    client = realtime_client(local_ably.key, local_ably.endpoint, client_id="agent-7")
    try:
        await asyncio.wait_for(client.connection.once_async("connected"), 5)
        assert client.auth.client_id == "agent-7"
    finally:
        await client.close()


async def test_sdk_still_refuses_basic_auth_over_plain_http(local_ably: LocalAbly) -> None:
    """Hence token auth everywhere (`client_options`): with Basic auth, every REST call
    to a non-TLS endpoint (history, get_message) fails before it is sent."""
    from ably import AblyException, AblyRest

    from worker.transport.endpoint import Endpoint

    basic = AblyRest(key=local_ably.key, **Endpoint.parse(local_ably.endpoint).client_options())
    try:
        with pytest.raises(AblyException) as refused:
            await basic.channels.get("quirk:basic").history()
        assert refused.value.code == 40103
    finally:
        await basic.close()


def _extensions(client: Any) -> list[str]:
    """The WebSocket extensions the client's connection negotiated."""
    websocket = client.connection.connection_manager.transport.websocket
    return [type(extension).__name__ for extension in websocket.protocol.extensions]


async def _negotiated(endpoint: str, key: str) -> list[str]:
    client = realtime_client(key, endpoint)
    try:
        await client.connection.once_async("connected")
        return _extensions(client)
    finally:
        await client.close()


async def test_worker_connections_dial_without_deflate(local_ably: LocalAbly) -> None:
    # The fault proxy's WebSocket server (aiohttp) takes deflate whenever it is offered.
    async with FaultProxy(local_ably.endpoint) as proxy:
        assert await _negotiated(proxy.endpoint, local_ably.key) == []


async def test_sdk_still_offers_deflate(
    local_ably: LocalAbly, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ably.transport import websockettransport

    monkeypatch.setattr(websockettransport, "ws_connect", sdk_quirks.ORIGINAL_DIAL)
    async with FaultProxy(local_ably.endpoint) as proxy:
        assert await _negotiated(proxy.endpoint, local_ably.key) == ["PerMessageDeflate"]
    # Sockudo 5.2 itself never agrees to it: on the local stack the quirk changes nothing.
    assert await _negotiated(local_ably.endpoint, local_ably.key) == []


# --- one TLS context ----------------------------------------------------------------------


def _rest_transport(client: Any) -> Any:
    return client.http._Http__client._transport


def _tls_context(client: Any) -> Any:
    transport = _rest_transport(client)
    if isinstance(transport, AiohttpTransport):
        return transport.ssl_context
    return transport._pool._ssl_context  # httpx's own transport (the SDK's)


async def test_worker_clients_share_one_tls_context_and_still_make_rest_calls(
    local_ably: LocalAbly,
) -> None:
    clients = [realtime_client(local_ably.key, local_ably.endpoint) for _ in range(3)]
    try:
        assert len({id(_tls_context(c)) for c in clients}) == 1
        assert isinstance(await clients[0].time(), int)  # the REST layer works as before
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def test_sdk_still_builds_a_tls_context_per_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from ably import AblyRest
    from ably.http import http as ably_http

    monkeypatch.setattr(ably_http, "httpx", sdk_quirks.ORIGINAL_HTTPX)
    clients = [AblyRest(key="app.key:secret") for _ in range(2)]
    assert _tls_context(clients[0]) is not _tls_context(clients[1])


async def test_rest_calls_go_over_aiohttp_and_read_what_they_did(
    local_ably: LocalAbly, channel_name: str
) -> None:
    """History, `get_message` and an error status read the same over the lean transport:
    what the SDK's REST layer builds on (status, headers, body, errors) is unchanged."""
    client = realtime_client(local_ably.key, local_ably.endpoint)
    try:
        assert isinstance(_rest_transport(client), AiohttpTransport)
        channel = client.channels.get(channel_name)
        sent = await channel.publish("response", "hello over aiohttp")
        page = await channel.history(direction="backwards", limit=10)
        assert [m.data for m in page.items] == ["hello over aiohttp"]
        found = await channel.get_message(sent.serials[0])
        assert found.data == "hello over aiohttp"
        with pytest.raises(AblyException) as refused:
            await client.channels.get(f"{channel_name}-none").get_message("no-such-serial")
        assert refused.value.status_code == 404
    finally:
        await client.close()


def test_sdk_still_sends_rest_calls_over_httpx_own_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ably import AblyRest
    from ably.http import http as ably_http

    monkeypatch.setattr(ably_http, "httpx", sdk_quirks.ORIGINAL_HTTPX)
    transport = _rest_transport(AblyRest(key="app.key:secret"))
    assert isinstance(transport, sdk_quirks.ORIGINAL_HTTPX.AsyncHTTPTransport)


@pytest.fixture
def tls_proxy_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context with a self-signed certificate for 127.0.0.1 (the openssl
    command makes it), and the certificate's file."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


def _websocket_tls_context(client: Any) -> Any:
    websocket = client.connection.connection_manager.transport.websocket
    return websocket.transport.get_extra_info("ssl_object").context


async def test_connections_over_tls_dial_with_the_one_context(
    local_ably: LocalAbly, tls_proxy_context: tuple[ssl.SSLContext, Path]
) -> None:
    server_context, cert = tls_proxy_context
    sdk_quirks.TLS.context.load_verify_locations(cert)  # this process trusts the test CA
    async with FaultProxy(local_ably.endpoint, ssl_context=server_context) as proxy:
        clients = [realtime_client(local_ably.key, proxy.endpoint) for _ in range(2)]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(c.connection.once_async("connected") for c in clients)), 10
            )
            assert {id(_websocket_tls_context(c)) for c in clients} == {id(sdk_quirks.TLS.context)}
            assert isinstance(await clients[0].time(), int)  # REST over https: the same
        finally:
            await asyncio.gather(*(c.close() for c in clients))


async def test_sdk_still_dials_wss_with_a_new_tls_context_each_time(
    local_ably: LocalAbly,
    tls_proxy_context: tuple[ssl.SSLContext, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ably.transport import websockettransport

    server_context, cert = tls_proxy_context
    sdk_quirks.TLS.context.load_verify_locations(cert)  # the REST calls' (token requests)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # what a fresh default context trusts
    monkeypatch.setattr(websockettransport, "ws_connect", sdk_quirks.ORIGINAL_DIAL)
    async with FaultProxy(local_ably.endpoint, ssl_context=server_context) as proxy:
        clients = [realtime_client(local_ably.key, proxy.endpoint) for _ in range(2)]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(c.connection.once_async("connected") for c in clients)), 10
            )
            contexts = [_websocket_tls_context(c) for c in clients]
            assert contexts[0] is not contexts[1]
            assert sdk_quirks.TLS.context not in contexts
        finally:
            await asyncio.gather(*(c.close() for c in clients))


# --- one idle timer ---------------------------------------------------------------------


async def _connected(client: Any) -> Any:
    await asyncio.wait_for(client.connection.once_async("connected"), 10)
    return client.connection.connection_manager.transport


async def _publish_some(client: Any, channel_name: str, count: int) -> None:
    channel = client.channels.get(channel_name)
    for i in range(count):
        await channel.publish("m", f"message {i}")  # each ACK is activity


async def test_a_connection_keeps_one_idle_timer_while_messages_arrive(
    local_ably: LocalAbly, channel_name: str
) -> None:
    client = realtime_client(local_ably.key, local_ably.endpoint)
    try:
        transport = await _connected(client)
        armed = transport.idle_timer
        await _publish_some(client, channel_name, 20)
        assert transport.idle_timer is armed
    finally:
        await client.close()


async def test_sdk_still_makes_an_idle_timer_per_message_received(
    local_ably: LocalAbly, channel_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ably.transport.websockettransport import WebSocketTransport

    monkeypatch.setattr(WebSocketTransport, "on_activity", sdk_quirks.ORIGINAL_ON_ACTIVITY)
    client = realtime_client(local_ably.key, local_ably.endpoint)
    try:
        transport = await _connected(client)
        seen = set()
        for _ in range(5):
            await _publish_some(client, channel_name, 1)
            seen.add(id(transport.idle_timer._task))
        assert len(seen) == 5
    finally:
        await client.close()


async def test_a_silent_connection_is_still_given_up_and_a_busy_one_is_not(
    local_ably: LocalAbly, channel_name: str
) -> None:
    """With an idle interval of 0.3 s: a second of traffic keeps the connection (the
    timer fires and re-arms for what remains); then a black hole, where nothing comes,
    ends it as the SDK would (disconnected, then it reconnects)."""
    async with FaultProxy(local_ably.endpoint) as proxy:
        client = realtime_client(local_ably.key, proxy.endpoint)
        try:
            transport = await _connected(client)
            transport.idle_timer.cancel()
            transport.idle_timer, transport.max_idle_interval = None, 300
            transport.on_activity()
            states: list[str] = []
            client.connection.on(lambda change: states.append(change.current.value))
            for _ in range(10):
                await _publish_some(client, channel_name, 1)
                await asyncio.sleep(0.1)
            assert states == []  # busy: never given up
            proxy.blackhole(3.0)
            await asyncio.sleep(1.5)
            assert "disconnected" in states, states
        finally:
            await client.close()


# --- the lean append --------------------------------------------------------------------


def _headers(ait: bool) -> Any:
    from worker.transport import contract
    from worker.transport.ait import AitRun

    run = AitRun(job_id="j1", input_codec_message_id="c1", client_id="u1") if ait else None
    return contract.Headers(response_id="r1", model="m", metadata={"k": "v"}, ait=run)


@pytest.mark.parametrize("ait", [False, True])
def test_the_lean_append_sends_what_the_sdk_would(ait: bool) -> None:
    from ably.types.message import Message, MessageAction

    from worker.transport import contract

    headers = _headers(ait)
    made = contract.response_append("serial-1", "Hello", headers)
    sdk = Message(  # as `_send_update` copies it, with the append's action
        name=made.name, data=made.data, serial=made.serial, extras=made.extras,
        action=MessageAction.MESSAGE_APPEND,
    )  # fmt: skip
    for binary in (True, False):
        assert contract.response_append_wire("serial-1", "Hello", headers) == sdk.as_dict(binary)


async def _stream_mixed(
    local_ably: LocalAbly, channel_name: str
) -> tuple[list[str], str, list[str]]:
    """A create, then 30 appends (lean and the SDK's, alternating, un-awaited); returns the
    fragments a subscriber received, the message's text, and the SDK's send log lines."""
    from ably.realtime import channel as sdk_channel

    from worker.transport import contract

    sdk_sends: list[str] = []
    original = sdk_channel.log.info

    headers = _headers(False)
    publisher = realtime_client(local_ably.key, local_ably.endpoint)
    subscriber = realtime_client(local_ably.key, local_ably.endpoint)
    received: list[str] = []
    all_in = asyncio.Event()

    def on_message(message: Any) -> None:
        if message.action == 5:  # an append
            received.append(message.data)
            if len(received) == 30:
                all_in.set()

    try:
        listen = subscriber.channels.get(channel_name)
        await listen.subscribe(on_message)
        channel = publisher.channels.get(channel_name)
        await channel.attach()
        created = await channel.publish(contract.response_create(headers))
        serial = created.serials[0]
        sdk_channel.log.info = lambda line, *a, **k: sdk_sends.append(str(line))  # type: ignore[method-assign]
        sends = []
        for i in range(30):
            if i % 2:
                message = contract.response_append(serial, f"<{i}>", headers)
                sends.append(asyncio.ensure_future(channel.append_message(message)))
            else:
                wire = contract.response_append_wire(serial, f"<{i}>", headers)
                sends.append(asyncio.ensure_future(sdk_quirks.append(channel, wire)))
        results = await asyncio.gather(*sends)
        assert all(r.version_serial for r in results), "every append acknowledged with its serial"
        await asyncio.wait_for(all_in.wait(), 10)
        stored = await channel.get_message(serial)
        return received, stored.data, [line for line in sdk_sends if "_send_update" in line]
    finally:
        sdk_channel.log.info = original  # type: ignore[method-assign]
        await publisher.close()
        await subscriber.close()


async def test_lean_appends_reach_subscribers_in_order_beside_the_sdks(
    local_ably: LocalAbly,
) -> None:
    received, stored, sdk_sends = await _stream_mixed(local_ably, "quirks:lean-append")
    expected = [f"<{i}>" for i in range(30)]
    assert received == expected
    assert stored == "".join(expected)
    assert len(sdk_sends) == 15, "the lean appends went out without the SDK's send path"


async def test_sdk_append_still_formats_its_log_lines_with_logging_off(
    local_ably: LocalAbly,
) -> None:
    """Still needed while the SDK's append builds (and formats log lines for) every send:
    with its logger at WARNING, `append_message` still calls `log.info` with a string
    it formatted for the append."""
    from ably.realtime import channel as sdk_channel

    from worker.transport import contract

    logging.getLogger("ably").setLevel(logging.WARNING)
    calls: list[str] = []
    original = sdk_channel.log.info

    def spy(message: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(str(message))
        original(message, *args, **kwargs)

    client = realtime_client(local_ably.key, local_ably.endpoint)
    try:
        channel = client.channels.get("quirks:sdk-append-logs")
        created = await channel.publish(contract.response_create(_headers(False)))
        sdk_channel.log.info = spy  # type: ignore[method-assign]
        serial = created.serials[0]
        await channel.append_message(contract.response_append(serial, "x", _headers(False)))
        assert any(serial in line for line in calls), "the SDK no longer formats a line per append"
    finally:
        sdk_channel.log.info = original  # type: ignore[method-assign]
        await client.close()


# --- no AUTH per REST call ----------------------------------------------------------------


async def _updates_after_history(local_ably: LocalAbly) -> int:
    """Connection `update` events while a connected realtime client reads a channel's
    history (a REST call) three times."""
    client = realtime_client(local_ably.key, local_ably.endpoint, client_id="quirks-worker")
    updates: list[Any] = []
    try:
        await client.connection.once_async("connected")
        client.connection.on(
            lambda change: updates.append(change) if change.event == "update" else None
        )
        channel = client.channels.get("quirks:history-auth")
        await channel.attach()
        for _ in range(3):
            await channel.history()
        await asyncio.sleep(0.3)  # a CONNECTED answering an AUTH would be in by now
        return len(updates)
    finally:
        await client.close()


async def test_rest_calls_of_a_realtime_client_send_no_auth(local_ably: LocalAbly) -> None:
    assert await _updates_after_history(local_ably) == 0


async def test_sdk_still_reauthorises_the_connection_on_every_rest_call(
    local_ably: LocalAbly,
) -> None:
    from ably.realtime.connectionmanager import ConnectionManager

    sdk_quirks.apply()
    ours = ConnectionManager.on_auth_updated
    ConnectionManager.on_auth_updated = sdk_quirks.ORIGINAL_ON_AUTH_UPDATED  # type: ignore[method-assign]
    try:
        assert await _updates_after_history(local_ably) == 3
    finally:
        ConnectionManager.on_auth_updated = ours  # type: ignore[method-assign]


async def test_sdk_still_suspends_a_channel_attached_while_it_detaches(
    ably_clients: Any, channel_name: str
) -> None:
    """The quirk `ChannelUses.ready` waits out: an attach during a detach raises a
    TypeError (`raise None`) and leaves the channel SUSPENDED."""
    channel = ably_clients().channels.get(channel_name)
    await channel.attach()
    detaching = asyncio.ensure_future(channel.detach())
    await asyncio.sleep(0)  # the DETACH is sent
    with pytest.raises(TypeError):
        await channel.attach()
    with contextlib.suppress(AblyException):
        await detaching
    assert channel.state == ChannelState.SUSPENDED


async def test_a_use_taken_while_the_last_one_detaches_attaches_and_hears(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    """An answer ends (its channel detaching) as the conversation's session takes the
    channel: the session waits for the detach, then attaches and hears the channel."""
    client, uses = ably_clients(), ChannelUses()
    await uses.take(client, channel_name).attach()
    giving_back = asyncio.ensure_future(uses.give_back(client, channel_name))
    await asyncio.sleep(0)  # the DETACH is sent
    channel = uses.take(client, channel_name)
    await uses.ready(client, channel_name)
    heard: asyncio.Queue[Any] = asyncio.Queue()
    await channel.subscribe(heard.put_nowait)
    await giving_back
    assert channel.state == ChannelState.ATTACHED
    await ably_rest.channels.get(channel_name).publish("prompt", "still heard")
    message = await asyncio.wait_for(heard.get(), 10)
    assert message.data == "still heard"


def _read(message: Any) -> tuple[Any, ...]:
    return (message.id, message.serial, message.name, message.data, message.extras,
            message.client_id, message.timestamp, message.action)  # fmt: skip


async def test_lean_history_reads_every_page_as_the_sdk_does(
    ably_clients: Any, channel_name: str
) -> None:
    channel = ably_clients(client_id="alice").channels.get(channel_name)
    for i in range(5):
        await channel.publish("prompt", f"m{i}", extras={"headers": {"n": str(i)}})
    lean = await sdk_quirks.history(channel, direction="backwards", limit=2)
    sdk = await channel.history(direction="backwards", limit=2)
    assert isinstance(lean, sdk_quirks.HistoryPage)  # not the SDK's way round
    pages = 0
    while True:
        pages += 1
        assert [_read(m) for m in lean.items] == [_read(m) for m in sdk.items]
        assert lean.has_next() == sdk.has_next()
        if not sdk.has_next():
            break
        lean, sdk = await lean.next(), await sdk.next()
    assert pages == 3
    assert lean.items[-1].data == "m0"


async def test_lean_history_refused_raises_what_the_sdk_raises(
    local_ably: LocalAbly, channel_name: str
) -> None:
    wrong = realtime_client(local_ably.key.split(":")[0] + ":wrong", local_ably.endpoint,
                            auto_connect=False)  # fmt: skip
    try:
        with pytest.raises(AblyException) as sdk:
            await wrong.channels.get(channel_name).history()
        with pytest.raises(AblyException) as lean:
            await sdk_quirks.history(wrong.channels.get(channel_name))
        assert (lean.value.status_code, lean.value.code) == (sdk.value.status_code, sdk.value.code)
    finally:
        await wrong.close()


async def test_sdk_history_still_builds_each_request_through_httpx(
    ably_clients: Any, channel_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layers `sdk_quirks.history` skips: an httpx request built per call."""
    built: list[Any] = []
    original = httpx.AsyncClient.build_request

    def build_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        built.append(kwargs.get("url"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "build_request", build_request)
    channel = ably_clients().channels.get(channel_name)
    await channel.history(direction="backwards", limit=10)
    assert any("/messages" in str(url) for url in built)
    built.clear()
    await sdk_quirks.history(channel, direction="backwards", limit=10)
    assert built == []


# --- ACKs and channel messages applied as read --------------------------------------------


class _Frames:
    """A websocket that yields these frames, then ends."""

    def __init__(self, frames: list[dict[str, Any]]) -> None:
        self.frames = [orjson.dumps(f).decode() for f in frames]

    def __aiter__(self) -> Any:
        return self._each()

    async def _each(self) -> Any:
        for frame in self.frames:
            yield frame


def _pending(serial: int) -> PendingMessage:
    pending = PendingMessage({"action": ProtocolMessageAction.MESSAGE, "msgSerial": serial})
    pending.future = asyncio.get_running_loop().create_future()
    return pending


async def _read_frames(frames: list[dict[str, Any]], pending: list[PendingMessage]) -> None:
    """The read loop over `frames`, on a transport whose connection awaits `pending`."""
    sdk_quirks.apply()  # the worker's read loop (as every client made here has)
    queue = PendingMessageQueue()
    for message in pending:
        queue.push(message)
    manager = SimpleNamespace(pending_message_queue=queue)
    manager.on_ack = lambda serial, count, res: queue.complete_messages(serial, count, res)
    manager.on_nack = lambda serial, count, err: queue.complete_messages(serial, count, None, err)
    transport = WebSocketTransport.__new__(WebSocketTransport)
    transport.websocket = _Frames(frames)
    transport.connection_manager = manager
    transport.format = "json"
    transport.max_idle_interval = None
    await transport.ws_read_loop()
    await asyncio.sleep(0.01)  # the tasks of messages the SDK's way


async def test_acks_read_complete_their_publishes_with_their_serials() -> None:
    pending = [_pending(0), _pending(1)]
    ack = {"action": ProtocolMessageAction.ACK, "msgSerial": 0, "count": 2,
           "res": [{"serials": ["s0"]}, {"serials": ["s1"]}]}  # fmt: skip
    await _read_frames([ack], pending)
    assert [p.future.result().serials for p in pending if p.future] == [["s0"], ["s1"]]


async def test_an_ack_never_overtakes_a_nack_read_before_it() -> None:
    """Completing an ACK's serial completes every message before it: read right after a
    NACK still being handled, the ACK waits its turn, and the refused publish fails."""
    pending = [_pending(0), _pending(1)]
    nack = {"action": ProtocolMessageAction.NACK, "msgSerial": 0, "count": 1,
            "error": {"code": 42910, "statusCode": 429, "message": "rate limit"}}  # fmt: skip
    ack = {"action": ProtocolMessageAction.ACK, "msgSerial": 1, "count": 1,
           "res": [{"serials": ["s1"]}]}  # fmt: skip
    await _read_frames([nack, ack], pending)
    first, second = (p.future for p in pending)
    assert first is not None and second is not None
    assert isinstance(first.exception(), AblyException)
    assert second.result().serials == ["s1"]


async def test_sdk_still_formats_a_line_per_message_received_with_logging_off(
    ably_clients: Any,
) -> None:
    """Still needed while the SDK's handler formats the whole message it received into a
    debug line whatever the logger's level."""
    from ably.transport import websockettransport as sdk_transport

    logging.getLogger("ably").setLevel(logging.WARNING)
    client = ably_clients()
    await client.connection.once_async("connected")
    transport = client.connection.connection_manager.transport
    lines: list[str] = []
    original = sdk_transport.log.debug
    sdk_transport.log.debug = lambda message, *a, **k: lines.append(str(message))  # type: ignore[method-assign]
    try:
        ack = {"action": ProtocolMessageAction.ACK, "msgSerial": 987654, "count": 0}
        await sdk_quirks.ORIGINAL_ON_PROTOCOL_MESSAGE(transport, ack)
    finally:
        sdk_transport.log.debug = original  # type: ignore[method-assign]
    assert any("987654" in line for line in lines), "the SDK no longer formats the message"
