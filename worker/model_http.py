"""A streamed model request sent straight over the SDK client's own aiohttp session.

Why: a burst of new answers is a burst of model requests, and through the `openai` SDK
each one cost about 0.9 ms of the event loop (its httpx2 request building parses the
URL three times, then the auth, retry and response layers) against 0.26 ms for the same
POST on the same aiohttp session: 256 answers enqueued at once got their first token
about 140 ms later for it (measured side by side on the local server, 200 ms first-token
delay: p50 406 ms through the SDK, 261 ms straight).

What is kept from the SDK: the client's settings (base URL, API key, headers, timeout)
and its connection pool; and everything but the plain success, which goes the SDK's way:
a refused connection, a timeout or any status but 200 makes the request again through
the SDK, whose retries, backoff and typed errors then apply (an error answer is made
twice: it is rare, and the second tells the SDK what it needs). A client whose auth is
not a plain API key (a key provider, workload identity, a provider runtime) always goes
the SDK's way. The body's events are read as the SDK's raw stream is (`worker.sse`), a
body that breaks off raising the SDK's own exceptions.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import orjson
from openai._vendor.httpx_aiohttp import AiohttpTransport

from worker.sse import Event, events_of

_FAILED_TO_SEND = (aiohttp.ClientError, TimeoutError, OSError)


@contextlib.asynccontextmanager
async def posted_stream(
    client: openai.AsyncOpenAI, path: str, body: dict[str, Any]
) -> AsyncIterator[AsyncIterator[Event] | None]:
    """The events of `POST {base_url}{path}` with `body`, or None: send it the SDK's way."""
    session = _session(client)
    if session is None:
        yield None
        return
    url = f"{client.base_url}{path}"
    try:
        response = await session.post(
            url, data=orjson.dumps(body), headers=_headers(client), timeout=_timeout(client)
        )
    except _FAILED_TO_SEND:
        yield None
        return
    try:
        if response.status != 200:
            yield None
            return
        yield events_of(_chunks(response, url), lambda: httpx2.Request("POST", url))
    finally:
        response.release()  # back to the pool once read to the end, else closed


def _session(client: openai.AsyncOpenAI) -> aiohttp.ClientSession | None:
    """The aiohttp session under the SDK's client (`DefaultAioHttpClient`), if it has one
    and its auth is a plain API key."""
    plain_key = (
        getattr(client, "_provider_runtime", None) is None
        and getattr(client, "_api_key_provider", None) is None
        and getattr(client, "workload_identity", None) is None
    )
    transport = getattr(getattr(client, "_client", None), "_transport", None)
    if not plain_key or not isinstance(transport, AiohttpTransport):
        return None
    if not isinstance(transport.client, aiohttp.ClientSession):
        transport.client = transport.get_client()  # as its first request would
    return transport.client


def _headers(client: openai.AsyncOpenAI) -> dict[str, str]:
    headers = {k: v for k, v in client.default_headers.items() if isinstance(v, str)}
    headers.update(client.auth_headers)
    return headers


def _timeout(client: openai.AsyncOpenAI) -> aiohttp.ClientTimeout:
    timeout = client.timeout
    if isinstance(timeout, int | float):
        return aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)
    if isinstance(timeout, httpx2.Timeout):
        return aiohttp.ClientTimeout(sock_connect=timeout.connect, sock_read=timeout.read)
    return aiohttp.ClientTimeout()


async def _chunks(response: aiohttp.ClientResponse, url: str) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive; a failure becomes the SDK's own exception."""
    iterator = response.content.iter_any().__aiter__()
    while True:
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise openai.APITimeoutError(request=httpx2.Request("POST", url)) from exc
        except aiohttp.ClientError as exc:
            raise openai.APIConnectionError(request=httpx2.Request("POST", url)) from exc
        yield chunk
