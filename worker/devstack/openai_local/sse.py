"""Server-sent events on an aiohttp response, and breaking a stream off on purpose."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

import orjson
from aiohttp import web

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def encode(data: object, event: str | None = None) -> bytes:
    payload = b"data: " + orjson.dumps(data) + b"\n\n"
    if event is None:
        return payload
    return b"event: " + event.encode() + b"\n" + payload


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response


async def pump(
    request: web.Request,
    response: web.StreamResponse,
    batches: AsyncGenerator[list[bytes], None],
    first_seq: int = 0,
    break_before_seq: int | None = None,
) -> None:
    """Write event batches; with `break_before_seq`, cut the connection before that event.

    Raises ConnectionResetError when the client has gone.
    """
    seq = first_seq
    async with contextlib.aclosing(batches):
        async for batch in batches:
            if break_before_seq is not None and seq + len(batch) > break_before_seq:
                head = batch[: max(0, break_before_seq - seq)]
                if head:
                    await response.write(b"".join(head))
                break_connection(request)
                return
            if batch:
                await response.write(b"".join(batch))
            seq += len(batch)


def break_connection(request: web.Request) -> None:
    """Drop the TCP connection mid-body: the client sees an incomplete chunked read."""
    transport = request.transport
    if transport is not None:
        transport.abort()
