"""Finding a response's message in its channel's history, against the local Ably.

The case it is for: a worker killed after its create but before the serial was saved.
The retry's create is refused (Sockudo, see the conformance suite) or lands after Ably's
deduplication window, so the retry looks the message up and finishes that one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from ably import AblyException
from ably.types.message import Message

from worker.transport import contract
from worker.transport.contract import Headers, Status
from worker.transport.lookup import (
    FoundResponse,
    find_response,
    find_responses,
    response_message_id,
    response_state,
)


async def connected(client: Any) -> Any:
    await client.connection.once_async("connected")
    return client


async def settled(
    fetch: Callable[[], Awaitable[FoundResponse | None]],
    ready: Callable[[FoundResponse], bool],
    timeout: float = 5.0,
) -> FoundResponse:
    """Poll until the lookup finds a message in the expected state (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await fetch()
        if found is not None and ready(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"lookup gave {found!r}")
        await asyncio.sleep(0.05)


async def publisher(ably_clients: Any, channel_name: str) -> Any:
    channel = (await connected(ably_clients())).channels.get(channel_name)
    await channel.attach()
    return channel


async def stream_response(
    channel: Any, headers: Headers, deltas: list[str], close: Status | None = None
) -> str:
    """Publish one response the worker's way: create, appends, then a closing update."""
    serial = str((await channel.publish(contract.response_create(headers))).serials[0])
    for delta in deltas:
        await channel.append_message(contract.response_append(serial, delta, headers))
    if close is not None:
        closed = headers.with_status(close)
        await channel.update_message(contract.response_replace(serial, "".join(deltas), closed))
    return serial


def test_message_id_is_the_contracts() -> None:
    headers = Headers(response_id="job-1", model="m")
    assert response_message_id("job-1") == contract.response_create(headers).id


@pytest.mark.parametrize("kind", ["rest", "realtime"])
async def test_finds_the_closed_response_among_others(
    ably_clients: Any, ably_rest: Any, channel_name: str, kind: str
) -> None:
    pub = await publisher(ably_clients, channel_name)
    target = Headers(response_id="job-2", model="m-1", metadata={"user": "u1"})
    await pub.publish(Message(name=contract.PROMPT, data="hello?"))
    await stream_response(pub, Headers(response_id="job-1", model="m-1"), ["old"], Status.COMPLETE)
    serial = await stream_response(pub, target, ["Hel", "lo, ", "wörld"], Status.COMPLETE)
    # Newer messages that carry job-2's responseId under other names, and another answer.
    await pub.publish(Message(name=contract.CANCEL, extras={"headers": {"responseId": "job-2"}}))
    await pub.publish(contract.token_start(target, attempt=1))
    await stream_response(pub, Headers(response_id="job-3", model="m-1"), ["new"])
    await pub.publish(Message(name=contract.PROMPT, data="and?"))

    channel = (
        ably_rest.channels.get(channel_name)
        if kind == "rest"
        else (await connected(ably_clients())).channels.get(channel_name)  # never attached
    )
    found = await settled(lambda: find_response(channel, "job-2"), lambda f: f.status == "complete")
    assert found.serial == serial
    assert found.text == "Hello, wörld"
    assert found.closed
    assert found.message_id == "job-2:response"
    assert found.headers == {
        "user": "u1",
        "responseId": "job-2",
        "status": "complete",
        "model": "m-1",
    }

    # The latest version by serial agrees.
    assert await response_state(channel, serial) == found


async def test_unknown_response_is_none(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    assert await find_response(ably_rest.channels.get(channel_name), "job-1") is None  # empty
    pub = await publisher(ably_clients, channel_name)
    await stream_response(pub, Headers(response_id="job-1", model="m"), ["a"], Status.COMPLETE)
    await pub.publish(Message(name=contract.PROMPT, data="job-2"))
    assert await find_response(ably_rest.channels.get(channel_name), "job-2") is None
    assert await find_responses(ably_rest.channels.get(channel_name), "job-2") == []


async def test_finds_a_response_created_but_never_appended(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    """The issue's case: the create went out, the worker died before anything else."""
    pub = await publisher(ably_clients, channel_name)
    headers = Headers(response_id="job-4", model="m", metadata={"user": "u1"})
    serial = await stream_response(pub, headers, [])
    await pub.publish(Message(name=contract.PROMPT, data="next question"))

    # The retry's create: refused by Sockudo (or, now and then, given the same serial).
    try:
        again = (await pub.publish(contract.response_create(headers))).serials[0]
        assert again == serial
    except AblyException as refused:
        assert refused.code == 40000

    found = await find_response(ably_rest.channels.get(channel_name), "job-4")
    assert found is not None
    assert (found.serial, found.status, found.text) == (serial, "streaming", "")
    assert not found.closed


async def test_finds_a_response_mid_stream(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    pub = await publisher(ably_clients, channel_name)
    serial = await stream_response(pub, Headers(response_id="job-5", model="m"), ["par", "tial"])
    channel = ably_rest.channels.get(channel_name)
    found = await settled(lambda: find_response(channel, "job-5"), lambda f: f.text == "partial")
    assert (found.serial, found.status) == (serial, "streaming")


async def test_pages_back_past_other_messages(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    pub = await publisher(ably_clients, channel_name)
    serial = await stream_response(pub, Headers(response_id="job-6", model="m"), ["x"])
    for number in range(7):  # history, newest first, 2 a page: job-6 is on page 4
        await pub.publish(Message(name=contract.PROMPT, data=f"prompt {number}"))

    channel = ably_rest.channels.get(channel_name)
    assert await find_response(channel, "job-6", page_size=2, max_pages=3) is None
    found = await find_response(channel, "job-6", page_size=2, max_pages=4)
    assert found is not None
    assert (found.serial, found.text) == (serial, "x")
    # A later update keeps the message at its create's place in history.
    closed = Headers(response_id="job-6", model="m", status=Status.INTERRUPTED)
    await pub.update_message(contract.response_replace(serial, "x", closed))
    assert await find_response(channel, "job-6", page_size=2, max_pages=3) is None
    found = await settled(
        lambda: find_response(channel, "job-6", page_size=2, max_pages=4),
        lambda f: f.status == "interrupted",
    )
    assert found.serial == serial and not found.closed


async def test_finds_a_response_by_its_header_alone_newest_first(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    """A `response` message without the fixed id (as Ably makes when a create is repeated
    after its 2-minute window) is found by `responseId`; the newest comes first."""
    pub = await publisher(ably_clients, channel_name)
    headers = Headers(response_id="job-7", model="m")
    older = await stream_response(pub, headers, ["first"], Status.INTERRUPTED)
    extras = headers.extras()
    newer = str((await pub.publish(Message(name="response", data="", extras=extras))).serials[0])
    await pub.publish(Message(name=contract.PROMPT, data="more"))

    channel = ably_rest.channels.get(channel_name)
    found = await find_response(channel, "job-7")
    assert found is not None
    assert (found.serial, found.text) == (newer, "")
    assert found.message_id != "job-7:response"  # matched by its header
    both = await find_responses(channel, "job-7")
    assert [f.serial for f in both] == [newer, older]
    assert [f.status for f in both] == ["streaming", "interrupted"]


async def test_response_state_of_an_unknown_serial_is_none(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    pub = await publisher(ably_clients, channel_name)
    serial = await stream_response(pub, Headers(response_id="job-8", model="m"), ["y"])
    unknown = serial[:-6] + "999999"
    assert await response_state(ably_rest.channels.get(channel_name), unknown) is None
    state = await response_state(pub, serial)  # a realtime channel reads it too
    assert state is not None and (state.serial, state.text) == (serial, "y")


async def test_bad_paging_arguments_are_refused(ably_rest: Any, channel_name: str) -> None:
    channel = ably_rest.channels.get(channel_name)
    with pytest.raises(ValueError):
        await find_response(channel, "job-1", max_pages=0)
    with pytest.raises(ValueError):
        await find_response(channel, "job-1", page_size=1001)
