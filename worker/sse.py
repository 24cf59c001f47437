"""Server-sent events read from raw bytes, the model stream's hot path.

The `openai` SDK decodes every streamed event into a pydantic model, which was a quarter
of the worker's CPU per token. The worker reads the HTTP response's bytes instead and
decodes each event's data with orjson: a response its request got straight over aiohttp
(`worker.model_http`), or the SDK's own (`with_streaming_response`, with its auth,
retries and errors). Only what the runtime needs is read from the result (`worker.model`).

The parsing follows the SSE spec's field rules: lines end in LF, CRLF or CR; `:` starts
a comment; `data` lines of one event are joined with LF; an empty line ends the event.
`id` and `retry` are not needed here and are skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import openai
import orjson

_CR = b"\r"


class SseParser:
    """Feed it bytes as they arrive; it returns the events completed so far as
    (event name or None, data bytes)."""

    def __init__(self) -> None:
        self._tail = b""
        self._event: bytes | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str | None, bytes]]:
        buffer = self._tail + chunk if self._tail else chunk
        if _CR in buffer:
            # A CR at the very end may be the first half of a CRLF: keep it for later.
            hold = buffer.endswith(_CR)
            body = buffer[:-1] if hold else buffer
            buffer = body.replace(b"\r\n", b"\n").replace(_CR, b"\n") + (_CR if hold else b"")
        lines = buffer.split(b"\n")
        self._tail = lines.pop()
        events: list[tuple[str | None, bytes]] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def finish(self) -> list[tuple[str | None, bytes]]:
        """The events left when the body ends (a last event without its empty line)."""
        tail, self._tail = self._tail.rstrip(_CR), b""
        events = [e for e in (self._line(tail) if tail else None, self._line(b"")) if e]
        return events

    def _line(self, line: bytes) -> tuple[str | None, bytes] | None:
        if not line:
            if not self._data and self._event is None:
                return None
            event = (self._event.decode() if self._event else None, b"\n".join(self._data))
            self._event, self._data = None, []
            return event
        if line[:1] == b":":
            return None
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        return None


Event = dict[str, Any]


def json_events(response: Any) -> AsyncIterator[Event]:
    """The JSON objects of a streamed OpenAI response (an `AsyncAPIResponse` from
    `with_streaming_response`), until `[DONE]` or the end of the body."""
    return events_of(_chunks(response), lambda: response.http_response.request)


async def events_of(
    chunks: AsyncIterator[bytes], request: Callable[[], httpx2.Request]
) -> AsyncIterator[Event]:
    """The JSON objects of a streamed body's `chunks`, until `[DONE]` or their end.

    Raises what the SDK's own stream raises: `openai.APIError` for an event whose data
    carries an `error` (`request` gives the request it names), and whatever `chunks`
    raises when reading breaks (`APITimeoutError`/`APIConnectionError`)."""
    parser = SseParser()
    async for chunk in chunks:
        for _, data in parser.feed(chunk):
            if data.startswith(b"[DONE]"):
                return
            yield _decoded(data, request)
    for _, data in parser.finish():
        if data.startswith(b"[DONE]"):
            return
        yield _decoded(data, request)


def _decoded(data: bytes, request: Callable[[], httpx2.Request]) -> Event:
    event = orjson.loads(data)
    if not isinstance(event, dict):
        raise openai.APIError("the model stream sent an event that is not an object",
                              request=request(), body=None)  # fmt: skip
    error = event.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else None
        raise openai.APIError(
            message
            if isinstance(message, str) and message
            else "An error occurred during streaming",
            request=request(),
            body=error,
        )
    return event


async def _chunks(response: Any) -> AsyncIterator[bytes]:
    """The body's bytes; a transport failure becomes the SDK's own exception."""
    request = response.http_response.request
    iterator = response.http_response.aiter_bytes().__aiter__()
    while True:
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except httpx2.TimeoutException as exc:
            raise openai.APITimeoutError(request=request) from exc
        except httpx2.TransportError as exc:
            raise openai.APIConnectionError(request=request) from exc
        yield chunk
