"""The control API under `/_proxy/`, so curl and other processes can drive the proxy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from worker.devstack.fault_proxy.proxy import FaultProxy

PREFIX = "/_proxy"


def _number(request: web.Request, name: str) -> float:
    try:
        value = float(request.query[name])
    except (KeyError, ValueError):
        raise web.HTTPBadRequest(text=f"expected ?{name}=<number>\n") from None
    if value < 0:
        raise web.HTTPBadRequest(text=f"{name} must not be negative\n")
    return value


def control_routes(proxy: FaultProxy) -> list[web.RouteDef]:
    async def drop(request: web.Request) -> web.Response:
        return web.json_response({"dropped": await proxy.drop_connections()})

    async def blackhole(request: web.Request) -> web.Response:
        seconds = _number(request, "seconds")
        proxy.blackhole(seconds)
        return web.json_response({"blackhole_seconds": seconds})

    async def latency(request: web.Request) -> web.Response:
        proxy.set_latency(_number(request, "ms"))
        return web.json_response({"latency_ms": proxy.faults.latency_ms})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(proxy.stats().as_dict())

    async def reset_stats(request: web.Request) -> web.Response:
        proxy.reset_stats()
        return web.json_response({"reset": True})

    return [
        web.post(f"{PREFIX}/drop", drop),
        web.post(f"{PREFIX}/blackhole", blackhole),
        web.post(f"{PREFIX}/latency", latency),
        web.get(f"{PREFIX}/stats", stats),
        web.post(f"{PREFIX}/stats/reset", reset_stats),
    ]
