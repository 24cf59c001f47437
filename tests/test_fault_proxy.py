"""The fault proxy, shown with the real ably-python against Sockudo through it.

Latency, drop (with the resume it forces), black hole, Ably's rate counting with the
rollup of appends, and the refusal of what Ably's rate limits would refuse.

Un-awaited publishes and appends go out in bursts of at most 25: Sockudo 5.2.0 queues at
most 32 control frames (ACKs among them) per connection and drops the rest silently. A
lost ACK followed by another is settled by it (without the publish's serial); a lost last
ACK leaves its publish pending for ever: ably-python has no timeout on it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from ably import AblyException
from ably.types.message import Message

from tests.ably_helpers import wait_for
from worker.devstack.ably import LocalAbly, free_port
from worker.devstack.fault_proxy import FaultProxy, RateLimits
from worker.devstack.fault_proxy.counting import ConnectionCounter, RateBook
from worker.devstack.fault_proxy.protocol import ACK, MESSAGE, NACK, RATE_LIMIT_CODE
from worker.devstack.fault_proxy.serials import Outcome, SerialMap
from worker.transport.client import realtime_client

MakeClient = Callable[..., Awaitable[Any]]


@pytest.fixture
async def proxy(local_ably: LocalAbly) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(local_ably.endpoint) as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def enforcing_proxy(local_ably: LocalAbly) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(local_ably.endpoint, enforce_rate_limits=True) as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def clients(local_ably: LocalAbly) -> AsyncIterator[MakeClient]:
    """Connected realtime clients, direct or through a proxy's endpoint; closed afterwards.

    Request it after the proxy fixture, so the clients close before the proxy stops.
    """
    made: list[Any] = []

    async def make(endpoint: str | None = None, wait: bool = True, **options: Any) -> Any:
        client = realtime_client(local_ably.key, endpoint or local_ably.endpoint, **options)
        made.append(client)
        if wait and client.connection.state != "connected":
            await asyncio.wait_for(client.connection.once_async("connected"), 10)
        return client

    yield make
    for client in made:
        await asyncio.wait_for(client.close(), 5)


async def subscribed(client: Any, name: str) -> tuple[Any, list[Any]]:
    received: list[Any] = []
    channel = client.channels.get(name)
    await channel.subscribe(lambda message: received.append(message))  # a builtin is refused
    return channel, received


async def test_latency_delays_each_round_trip(
    proxy: FaultProxy, clients: MakeClient, channel_name: str
) -> None:
    direct = (await clients()).channels.get(channel_name)
    proxied = (await clients(proxy.endpoint)).channels.get(channel_name)
    await direct.attach()
    await proxied.attach()

    async def median_publish_s(channel: Any) -> float:
        times = []
        for i in range(3):
            start = time.perf_counter()
            await channel.publish("rtt", str(i))
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    proxy.set_latency(200)
    via_proxy, straight = await median_publish_s(proxied), await median_publish_s(direct)
    assert via_proxy >= 0.19, via_proxy
    assert straight < via_proxy / 2, (straight, via_proxy)

    async with aiohttp.ClientSession() as http:  # plain HTTP (the REST API) is delayed too
        start = time.perf_counter()
        async with http.get(f"{proxy.endpoint}/time") as resp:
            assert resp.status == 200
        assert time.perf_counter() - start >= 0.19

    proxy.set_latency(0)
    assert await median_publish_s(proxied) < 0.1


async def test_dropped_subscriber_resumes_and_gets_what_it_missed_once_in_order(
    proxy: FaultProxy, clients: MakeClient, channel_name: str
) -> None:
    subscriber = await clients(proxy.endpoint)
    states: list[str] = []
    subscriber.connection.on(lambda change: states.append(str(change.current.value)))
    _, received = await subscribed(subscriber, channel_name)
    publisher = (await clients()).channels.get(channel_name)
    await publisher.attach()
    await publisher.publish("n", "m0")
    await wait_for(lambda: len(received) == 1, what="m0")
    # ably-python 3.1.4 has no `connection.id` (RTN8): its connection manager holds it.
    manager = subscriber.connection.connection_manager
    connection_id = manager.connection_id
    assert connection_id

    # Keep the subscriber away while the others publish (its reconnection hangs in the
    # hole), so "meanwhile" is unambiguous: see the next test for publishes during the resume.
    proxy.blackhole(0.5)
    assert await proxy.drop_connections() == 1
    for i in range(1, 6):
        await publisher.publish("n", f"m{i}")

    await wait_for(lambda: len(received) >= 6, what="the missed messages after the resume")
    await asyncio.sleep(0.3)  # room for a duplicate to show up
    assert [m.data for m in received] == [f"m{i}" for i in range(6)]
    assert states[:2] == ["disconnected", "connecting"] and "connected" in states[2:]
    assert manager.connection_id == connection_id  # resumed (RTN15c6), not a new connection
    assert len(proxy.stats().connections) == 2  # one WebSocket before the drop, one after


async def test_sockudo_redelivers_what_is_published_between_resume_and_reattach(
    proxy: FaultProxy, clients: MakeClient, channel_name: str
) -> None:
    """A difference from Ably, recorded. Ably's docs (platform/architecture/connection-recovery):
    after a brief disruption clients "will maintain their state and all messages will be
    received by the client in the correct order". Sockudo 5.2.0, on a resume, rebinds the
    connection's subscriptions at once (live messages flow), then answers the SDK's ATTACH
    with `channelSerial` by replaying everything after that serial from history, so what was
    published between the two arrives twice, and what was published while away arrives after
    it. No message is lost, and a duplicate has the serial of its original: a subscriber that
    must not act twice (the worker on its prompt channels) skips serials it has seen.
    """
    subscriber = await clients(proxy.endpoint)
    _, received = await subscribed(subscriber, channel_name)
    publisher = (await clients()).channels.get(channel_name)
    await publisher.attach()
    proxy.set_latency(400)  # widens the window between CONNECTED and the re-ATTACH
    await proxy.drop_connections()
    sent = []
    for i in range(20):
        sent.append((await publisher.publish("n", f"m{i}")).serials[0])
        await asyncio.sleep(0.05)
    await wait_for(lambda: {m.serial for m in received} == set(sent), what="every message")
    await asyncio.sleep(0.5)

    serials = [m.serial for m in received]
    assert all(m.data == f"m{sent.index(m.serial)}" for m in received)
    assert len(serials) > len(set(serials)), "Sockudo no longer redelivers: update the notes"


async def test_more_connections_than_a_client_session_pools_are_all_bridged(
    proxy: FaultProxy, clients: MakeClient
) -> None:
    """A worker at 320 answers holds 107 connections: aiohttp's default of 100 per client
    session left the 101st waiting for a free one until Ably's request timeout."""
    made = [await clients(proxy.endpoint, wait=False) for _ in range(110)]
    connected = [
        c.connection.once_async("connected") for c in made if c.connection.state != "connected"
    ]
    await asyncio.wait_for(asyncio.gather(*connected), 30)
    assert [c.connection.state for c in made] == ["connected"] * 110


async def test_blackhole_discards_then_forwarding_resumes(
    proxy: FaultProxy, clients: MakeClient, channel_name: str
) -> None:
    subscriber = await clients(proxy.endpoint)
    _, received = await subscribed(subscriber, channel_name)
    publisher = (await clients()).channels.get(channel_name)
    await publisher.attach()

    proxy.blackhole(1.5)
    late_joiner = await clients(proxy.endpoint, wait=False)  # its token request hangs
    for i in range(3):
        await publisher.publish("n", f"hole{i}")
    await asyncio.sleep(1.2)
    assert received == []  # discarded, not delayed
    assert late_joiner.connection.state != "connected"
    await asyncio.wait_for(late_joiner.connection.once_async("connected"), 5)

    # The SDK cannot tell a black hole from a quiet line until its idle timer (Sockudo's
    # maxIdleInterval 15 s + realtime_request_timeout) fires; a drop stands in for that.
    await proxy.drop_connections()
    await wait_for(lambda: len(received) == 3, what="the messages lost in the hole, on resume")
    await publisher.publish("n", "after")
    await wait_for(lambda: len(received) == 4, what="a message after the hole")
    assert [m.data for m in received] == ["hole0", "hole1", "hole2", "after"]


async def test_counts_messages_rolling_up_appends_as_ably_does(
    proxy: FaultProxy, clients: MakeClient, channel_name: str
) -> None:
    channel = (await clients(proxy.endpoint)).channels.get(channel_name)
    await channel.attach()
    created = await channel.publish(Message(name="response", data=""))
    serial = created.serials[0]
    start = time.monotonic()
    for burst in range(4):  # 100 un-awaited appends, in bursts of 25 (see top)
        appends = [
            asyncio.create_task(channel.append_message(Message(serial=serial, data=f"<{i}>")))
            for i in range(burst * 25, burst * 25 + 25)
        ]
        await asyncio.gather(*appends)
    elapsed = time.monotonic() - start

    (conn,) = proxy.stats().connections.values()
    counts = conn.channels[channel_name]
    assert (counts.protocol_messages, counts.messages) == (101, 101)
    # The create, plus one per 40 ms rollup window the appends spanned: at most 25/s.
    assert 2 <= counts.counted <= 2 + int(elapsed / 0.04), (counts, elapsed)
    assert counts.peak_counted_per_s <= 26
    assert conn.append_rollup_window_ms == 40

    plain = f"{channel_name}-plain"
    other = (await clients(proxy.endpoint)).channels.get(plain)
    await other.attach()
    await asyncio.gather(*(other.publish("n", str(i)) for i in range(10)))
    stats = proxy.stats()
    assert stats.channels[plain].counted == stats.channels[plain].protocol_messages == 10
    assert stats.channels[plain].peak_counted_per_s == 10

    async with aiohttp.ClientSession() as http:  # the same figures for other processes
        async with http.get(f"{proxy.endpoint}/_proxy/stats") as resp:
            body = await resp.json()
    assert body["channels"][channel_name]["protocol_messages"] == 101


async def test_append_rollup_window_from_the_query_string_is_honoured(
    proxy: FaultProxy, clients: MakeClient, channel_name: str
) -> None:
    client = await clients(
        proxy.endpoint, use_binary_protocol=False, transport_params={"appendRollupWindow": 0}
    )
    channel = client.channels.get(channel_name)
    await channel.attach()
    serial = (await channel.publish(Message(name="response", data=""))).serials[0]
    await asyncio.gather(
        *(channel.append_message(Message(serial=serial, data=str(i))) for i in range(20))
    )
    (conn,) = proxy.stats().connections.values()
    assert conn.append_rollup_window_ms == 0
    assert conn.channels[channel_name].counted == 21  # no rollup: every append counts


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
async def test_enforced_limits_nack_the_excess_and_later_publishes_succeed(
    enforcing_proxy: FaultProxy, clients: MakeClient, channel_name: str, binary: bool
) -> None:
    _, received = await subscribed(await clients(), channel_name)  # direct: sees what got in
    publisher = await clients(enforcing_proxy.endpoint, use_binary_protocol=binary)
    channel = publisher.channels.get(channel_name)
    await channel.attach()

    outcomes: list[Any] = []
    for burst in range(4):  # 80 publishes in well under a second, in bursts of 20 (see top)
        outcomes += await asyncio.gather(
            *(channel.publish("n", f"p{i}") for i in range(burst * 20, burst * 20 + 20)),
            return_exceptions=True,
        )
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    sent = {
        f"p{i}": o.serials[0] for i, o in enumerate(outcomes) if not isinstance(o, BaseException)
    }
    assert refused and all(
        isinstance(e, AblyException) and e.code == RATE_LIMIT_CODE and e.status_code == 429
        for e in refused
    ), refused
    assert len(sent) >= 50 and len(sent) + len(refused) == 80

    await wait_for(lambda: len(received) == len(sent), what="the accepted publishes")
    await asyncio.sleep(0.2)
    # Exactly the accepted ones, in order, each under the serial its ACK gave the publisher.
    assert [(m.data, m.serial) for m in received] == list(sent.items())

    await asyncio.sleep(1.05)  # the one-second window has passed
    result = await channel.publish("n", "later")
    await wait_for(lambda: len(received) == len(sent) + 1, what="the later publish")
    assert received[-1].data == "later" and received[-1].serial == result.serials[0]
    (conn,) = enforcing_proxy.stats().connections.values()
    assert conn.total.refused == len(refused)
    assert conn.total.peak_counted_per_s <= 50

    # A response streamed as un-awaited appends stays inside the budget: 80 appends in under
    # a second, none refused, as they roll up (in bursts of 20, see top).
    serial = (await channel.publish(Message(name="response", data=""))).serials[0]
    for burst in range(4):
        await asyncio.gather(
            *(
                channel.append_message(Message(serial=serial, data=f"{burst}.{i}"))
                for i in range(20)
            )
        )
    after = enforcing_proxy.stats().connections[conn.id]
    assert after.total.refused == len(refused)  # no append refused
    assert after.channels[channel_name].messages == len(sent) + 1 + 1 + 80


async def test_enforcement_stays_consistent_across_a_drop_mid_burst(
    local_ably: LocalAbly, clients: MakeClient, channel_name: str
) -> None:
    """The SDK resends what was not acknowledged when it resumes: what the server took is
    forwarded again under its first serial, and every publish ends either acknowledged and
    delivered once, or refused and never delivered. (Limits of 20/s keep each burst of ACKs
    under Sockudo's 32-frame control queue, which drops what overflows.)"""
    limits = RateLimits(connection=20, channel=20)
    async with FaultProxy(
        local_ably.endpoint, latency_ms=40, enforce_rate_limits=True, limits=limits
    ) as proxy:
        _, received = await subscribed(await clients(), channel_name)
        publisher = await clients(proxy.endpoint)
        channel = publisher.channels.get(channel_name)
        await channel.attach()
        publishes = [asyncio.create_task(channel.publish("n", f"p{i}")) for i in range(30)]
        await asyncio.sleep(0.01)
        await proxy.drop_connections()
        outcomes = await asyncio.wait_for(asyncio.gather(*publishes, return_exceptions=True), 15)
        sent = {
            f"p{i}": o.serials[0]
            for i, o in enumerate(outcomes)
            if not isinstance(o, BaseException)
        }
        assert all(
            getattr(o, "code", None) == RATE_LIMIT_CODE
            for o in outcomes
            if isinstance(o, BaseException)
        )
        assert len(sent) == 20
        await wait_for(lambda: len(received) >= len(sent), what="the accepted publishes")
        await asyncio.sleep(0.3)
        assert [(m.data, m.serial) for m in received] == list(sent.items())
        await publisher.close()  # before its proxy goes


async def test_command_line_proxy_and_its_control_api(local_ably: LocalAbly) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.devstack.fault_proxy", "--upstream", local_ably.endpoint,
        "--port", str(port), "--latency-ms", "100", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 15)
        endpoint = f"http://127.0.0.1:{port}"
        assert endpoint in ready.decode()
        async with aiohttp.ClientSession(base_url=endpoint) as http:
            start = time.perf_counter()
            async with http.get("/time") as resp:  # forwarded, 100 ms round trip added
                assert resp.status == 200
            assert time.perf_counter() - start >= 0.09
            async with http.post("/_proxy/latency", params={"ms": "0"}) as resp:
                assert await resp.json() == {"latency_ms": 0.0}
            async with http.post("/_proxy/blackhole", params={"seconds": "0.3"}) as resp:
                assert resp.status == 200
            async with http.post("/_proxy/drop") as resp:
                assert await resp.json() == {"dropped": 0}
            async with http.get("/_proxy/stats") as resp:
                assert await resp.json() == {"connections": {}, "channels": {}}
            async with http.post("/_proxy/latency", params={"ms": "x"}) as resp:
                assert resp.status == 400
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serial_map_renumbers_and_settles_in_client_order() -> None:
    """Serials 0 and 2 forwarded (the server sees 0, 1), 1 refused: the client hears 0, 1,
    2 in that order, though 2's ACK comes before 1's refusal is settled."""
    serials = SerialMap()
    assert serials.forward(0) == 0
    serials.hold(1)
    assert serials.forward(2) == 1
    serials.on_server_reply(
        {"action": ACK, "msgSerial": 0, "count": 1, "res": [{"serials": ["a"]}]}
    )
    assert serials.ready() == [
        {"action": ACK, "msgSerial": 0, "count": 1, "res": [{"serials": ["a"]}]}
    ]
    serials.on_server_reply(
        {"action": ACK, "msgSerial": 1, "count": 1, "res": [{"serials": ["b"]}]}
    )
    assert serials.ready() == []  # 2 is settled, 1 is not yet
    serials.resolve(1, Outcome(False, error={"code": RATE_LIMIT_CODE}))
    assert serials.ready() == [
        {"action": NACK, "msgSerial": 1, "count": 1, "error": {"code": RATE_LIMIT_CODE}},
        {"action": ACK, "msgSerial": 2, "count": 1, "res": [{"serials": ["b"]}]},
    ]
    assert serials.forward(2) == 1  # a resend after a resume keeps its server serial


def test_a_server_reply_settles_the_earlier_serials_as_the_sdks_do() -> None:
    serials = SerialMap()
    for serial in range(3):
        serials.forward(serial)
    serials.on_server_reply({"action": ACK, "msgSerial": 2, "count": 1})  # 0 and 1's ACKs lost
    assert serials.ready() == [{"action": ACK, "msgSerial": 0, "count": 3}]


def test_rollup_counts_one_append_per_window_per_serial() -> None:
    counter = ConnectionCounter(1, rollup_window_ms=40)
    book = RateBook()

    def publish(serial: str, now: float) -> int:
        message = {"action": MESSAGE, "channel": "c", "messages": [{"action": 5, "serial": serial}]}
        measured = counter.measure(message, now)
        book.record(counter, measured, now, refused=False)
        return measured.counted

    assert [publish("a", t) for t in (0.0, 0.01, 0.039, 0.04, 0.05)] == [1, 0, 0, 1, 0]
    assert publish("b", 0.05) == 1  # another message's appends roll up separately
    assert counter.total.snapshot().counted == 3 and counter.total.window.peak == 3
