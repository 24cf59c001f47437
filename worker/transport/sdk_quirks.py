"""Corrections to ably-python 3.1.4, each named, each in this one place.

`apply()` is idempotent and is called by `worker.transport.client` before any client is
made. Each correction has a test in `tests/test_ably_sdk_quirks.py` that fails once the SDK
no longer needs it, so it can be deleted then.
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ably.transport import websockettransport
from ably.transport.websockettransport import WebSocketTransport
from ably.types.mixins import EncodeDataMixin

_applied = False
# The SDK's own functions, kept so tests can show each quirk is still there.
ORIGINAL_WS_CONNECT = WebSocketTransport.ws_connect
ORIGINAL_DECODE = EncodeDataMixin.decode
ORIGINAL_DIAL = websockettransport.ws_connect  # `websockets.connect`, as the SDK imports it


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


def _no_deflate() -> None:
    """Dial without per-message deflate.

    ably-python dials with `websockets.connect`'s default, `compression="deflate"`, so
    any server that agrees compresses every frame both ways. The worker's frames are
    small appends (a few tokens each): compressing them saves little and cost about
    2.5 % of the worker's CPU at 64 answers where it was agreed (issue 15's profile,
    through the fault proxy, whose aiohttp server agrees; Sockudo 5.2 itself does not).
    Ably's protocol does not need it.
    """
    websockettransport.ws_connect = functools.partial(ORIGINAL_DIAL, compression=None)


def apply() -> None:
    global _applied
    if _applied:
        return
    _fix_realtime_port()
    _fix_null_encoding()
    _no_deflate()
    _applied = True
