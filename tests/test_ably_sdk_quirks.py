"""The corrections in `worker.transport.sdk_quirks`: each works, and each is still needed.

A test named `..._still_...` fails once ably-python fixes the quirk: then delete the
correction and the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from worker.devstack.ably import LocalAbly
from worker.devstack.fault_proxy import FaultProxy
from worker.transport import sdk_quirks
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
