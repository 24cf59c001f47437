"""`FaultProxy`: the aiohttp server that forwards REST calls and realtime WebSockets."""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from worker.devstack.fault_proxy.bridge import Bridge
from worker.devstack.fault_proxy.control import control_routes
from worker.devstack.fault_proxy.counting import (
    DEFAULT_ROLLUP_WINDOW_MS,
    ProxyStats,
    RateBook,
    RateLimits,
)
from worker.devstack.fault_proxy.faults import Faults
from worker.devstack.fault_proxy.serials import SerialMap
from worker.devstack.ports import LISTEN_BACKLOG
from worker.devstack.processes import InProcessServer

# Headers that belong to one hop (RFC 9110 7.6.1) or that aiohttp sets itself.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip
_WS_HANDSHAKE = ("sec-websocket-",)


def _forwardable(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in _HOP_BY_HOP and not name.lower().startswith(_WS_HANDSHAKE)
    )


def _rollup_window_ms(value: str | None) -> float:
    """The client's `appendRollupWindow` transport parameter, or Ably's default."""
    try:
        return float(value) if value is not None else DEFAULT_ROLLUP_WINDOW_MS
    except ValueError:
        return DEFAULT_ROLLUP_WINDOW_MS


class FaultProxy(InProcessServer):
    """A proxy between Ably SDKs and the server on loopback, with faults on request.

    Use as an async context manager; point SDKs at `.endpoint`.
    """

    def __init__(
        self,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        enforce_rate_limits: bool = False,
        limits: RateLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = URL(upstream.rstrip("/"))
        self.ssl_context = ssl_context  # serve https and wss (with this certificate)
        self.host, self.port = host, port
        self.enforce_rate_limits = enforce_rate_limits
        self.faults = Faults(latency_ms=latency_ms)
        self.book = RateBook(limits)
        self._bridges: set[Bridge] = set()
        self._serial_maps: dict[str, SerialMap] = {}  # by Ably connection key, for resumes
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    # -- faults and figures ------------------------------------------------------------

    def set_latency(self, ms: float) -> None:
        """Round-trip latency added to every frame and HTTP request from now on."""
        self.faults.latency_ms = max(0.0, float(ms))

    def blackhole(self, seconds: float) -> None:
        """Discard frames both ways and hold new connections for `seconds` from now."""
        self.faults.blackhole(float(seconds))

    async def drop_connections(self) -> int:
        """Cut every open WebSocket at the TCP level; returns how many there were."""
        bridges = list(self._bridges)
        for bridge in bridges:
            bridge.drop()
        await asyncio.sleep(0)  # let the bridges' tasks see their cancellation
        return len(bridges)

    def stats(self) -> ProxyStats:
        return self.book.stats()

    def reset_stats(self) -> None:
        self.book.reset()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # Each bridged WebSocket holds one upstream connection for its life: no cap
            # (aiohttp's default of 100 stalled the 101st until the client gave up).
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app = web.Application()
        app.add_routes(control_routes(self))
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = int(sock.getsockname()[1])
        site = web.SockSite(
            self._runner, sock, backlog=LISTEN_BACKLOG, ssl_context=self.ssl_context
        )
        await site.start()

    async def stop(self) -> None:
        for bridge in list(self._bridges):
            bridge.drop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- forwarding ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await self.faults.wait_open()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._bridge(request)
        return await self._forward_http(request)

    def _upstream_url(self, request: web.Request, websocket: bool = False) -> URL:
        base = str(self.upstream)
        if websocket:
            base = base.replace("http", "ws", 1)
        return URL(base + request.raw_path, encoded=True)  # path and query unchanged

    async def _forward_http(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        await self.faults.one_way()
        try:
            async with self._session.request(
                request.method,
                self._upstream_url(request),
                headers=_forwardable(request.headers),
                data=body or None,
                allow_redirects=False,
            ) as upstream:
                payload = await upstream.read()
                status, headers = upstream.status, _forwardable(upstream.headers)
        except (aiohttp.ClientError, OSError) as exc:
            return web.Response(status=502, text=f"fault proxy: upstream failed: {exc}")
        await self.faults.one_way()
        await self.faults.wait_open()
        return web.Response(status=status, body=payload, headers=headers)

    async def _bridge(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        offered = request.headers.get("Sec-WebSocket-Protocol", "").split(",")
        protocols = [p.strip() for p in offered if p.strip()]
        try:
            upstream = await self._session.ws_connect(
                self._upstream_url(request, websocket=True),
                headers=_forwardable(request.headers),
                protocols=protocols,
                autoping=True,
                max_msg_size=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            return web.Response(status=exc.status, text=exc.message)
        except (aiohttp.ClientError, OSError) as exc:
            return web.Response(status=502, text=f"fault proxy: upstream failed: {exc}")
        client = web.WebSocketResponse(protocols=protocols, autoping=True, max_msg_size=0)
        try:
            await client.prepare(request)
        except BaseException:
            await upstream.close()
            raise
        bridge = self._make_bridge(request, client, upstream)
        self._bridges.add(bridge)
        try:
            await bridge.run()
        finally:
            self._bridges.discard(bridge)
        return client

    def _make_bridge(
        self,
        request: web.Request,
        client: web.WebSocketResponse,
        upstream: aiohttp.ClientWebSocketResponse,
    ) -> Bridge:
        query = request.query
        serials = None
        if self.enforce_rate_limits:
            resumed = query.get("resume") or query.get("recover")
            serials = self._serial_maps.get(resumed or "") or SerialMap()
        return Bridge(
            client=client,
            client_transport=request.transport,
            upstream=upstream,
            faults=self.faults,
            book=self.book,
            counter=self.book.open_connection(_rollup_window_ms(query.get("appendRollupWindow"))),
            binary=query.get("format") == "msgpack",
            serials=serials,
            remember_serials=self._serial_maps.__setitem__,
        )
