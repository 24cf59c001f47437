"""An awaited message that Ably refuses only for its rate limit (42911) is sent again a
second later, so the answer goes on. Real parts: ably-python through the fault proxy,
which refuses what Ably would (over 50 messages a second on a channel), and Sockudo."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ably import AblyException
from structlog.testing import capture_logs

from worker.devstack.ably import LocalAbly
from worker.devstack.fault_proxy import FaultProxy
from worker.transport import lookup
from worker.transport.client import realtime_client
from worker.transport.contract import Headers, Status
from worker.transport.response_stream import ResponseStream

pytestmark = pytest.mark.timeout(60)


async def fill_the_second(channel: Any) -> int:
    """80 publishes in well under a second (bursts of 20: Sockudo sheds ACKs past 32
    queued on a connection); returns how many the proxy refused."""
    refused = 0
    for burst in range(4):
        outcomes = await asyncio.gather(
            *(channel.publish("filler", f"{burst}.{i}") for i in range(20)),
            return_exceptions=True,
        )
        refused += sum(isinstance(o, AblyException) for o in outcomes)
    return refused


async def test_a_create_and_a_close_refused_for_the_rate_are_sent_again(
    local_ably: LocalAbly, channel_name: str
) -> None:
    with capture_logs() as logs:
        await _stream_through_a_full_second(local_ably, channel_name)
    retried = [e for e in logs if e["event"] == "ably.rate_limited"]
    assert {e["what"] for e in retried} == {"the create", "the closing update"}


async def _stream_through_a_full_second(local_ably: LocalAbly, channel_name: str) -> None:
    async with FaultProxy(local_ably.endpoint, enforce_rate_limits=True) as proxy:
        client = realtime_client(local_ably.key, proxy.endpoint)
        try:
            await asyncio.wait_for(client.connection.once_async("connected"), 10)
            channel = client.channels.get(channel_name)
            await channel.attach()
            filler_refused = await fill_the_second(channel)
            assert filler_refused > 0  # the second is full: the next publish is refused

            stream = ResponseStream(channel, Headers(response_id="r-rate", model="m"))
            assert await stream.open() is None  # refused, then sent again: made
            stream.append("Hello, ")
            stream.append("world.")
            await fill_the_second(channel)
            await stream.close(Status.COMPLETE)  # refused, then sent again: closed

            (connection,) = proxy.stats().connections.values()
            assert connection.total.refused >= 2 * filler_refused + 2
            found = await lookup.response_state(channel, str(stream.serial))
            assert found is not None
            assert (found.status, found.text) == (Status.COMPLETE, "Hello, world.")
        finally:
            await client.close()
