"""What the worker relies on from Ably, checked with the real ably-python against Sockudo.

Each test is one behaviour the worker or its subscribers depend on. Where Sockudo differs
from Ably's documentation, the test says so in a comment (docs' words, then Sockudo's),
and the worker does not depend on the difference.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import jwt
import pytest
from ably import AblyException
from ably.types.channeloptions import ChannelOptions
from ably.types.message import Message, MessageAction
from ably.types.presence import PresenceAction

from tests.ably_helpers import TextView, wait_for
from worker.devstack.ably import AblyKey, LocalAbly
from worker.transport.client import realtime_client, rest_client

FRAGMENTS = ["Hé", "llo, ", "wörld", " — ", "世界", "你好", " 🚀", "👩‍💻", " naïve café", " …done."]


async def connected(client: Any) -> Any:
    await client.connection.once_async("connected")
    return client


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
async def test_connects_with_msgpack_and_json(ably_clients: Any, binary: bool) -> None:
    client = await connected(ably_clients(use_binary_protocol=binary))
    assert client.connection.state == "connected"
    assert client.connection.connection_manager.connection_id  # ably-python has no connection.id


async def _stream(channel: Any, fragments: list[str]) -> str:
    """Publish an empty message.create, then one un-awaited append task per fragment."""
    result = await channel.publish(Message(name="response", data=""))
    serial = result.serials[0]
    tasks = [
        asyncio.create_task(channel.append_message(Message(serial=serial, data=fragment)))
        for fragment in fragments
    ]
    await asyncio.gather(*tasks)
    return str(serial)


async def test_publish_returns_serial_and_unawaited_appends_are_all_acked(
    ably_clients: Any, channel_name: str
) -> None:
    channel = (await connected(ably_clients())).channels.get(channel_name)
    await channel.attach()
    first = await channel.publish(Message(name="response", data=""))
    second = await channel.publish(Message(name="response", data=""))
    assert first.serials[0] and second.serials[0]
    assert first.serials[0] < second.serials[0]  # serials order messages lexicographically

    # 25 at once, not more: Sockudo queues at most 32 control frames (ACKs) per connection
    # and drops the rest, and ably-python waits for ever for a lost ACK. (Ably does not
    # drop ACKs; the worker bounds every wait anyway: worker/transport/acks.py.)
    fragments = [f"<{i}>" for i in range(25)]
    serial = first.serials[0]
    tasks = [
        asyncio.create_task(channel.append_message(Message(serial=serial, data=fragment)))
        for fragment in fragments
    ]
    results = await asyncio.gather(*tasks)
    assert len(results) == 25  # every append acknowledged, none raised
    # In order: the stored text is the fragments in the order the tasks were created.
    stored = await channel.get_message(serial)
    assert stored.data == "".join(fragments)


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
async def test_live_subscriber_rewind_and_history_see_the_whole_text(
    ably_clients: Any, ably_rest: Any, channel_name: str, binary: bool
) -> None:
    live = TextView()
    subscriber = (await connected(ably_clients(use_binary_protocol=binary))).channels.get(
        channel_name
    )
    await subscriber.subscribe(live.on_message)
    publisher = (await connected(ably_clients(use_binary_protocol=binary))).channels.get(
        channel_name
    )
    await publisher.attach()
    expected = "".join(FRAGMENTS)

    serial = await _stream(publisher, FRAGMENTS)

    await wait_for(lambda: live.texts.get(serial) == expected, what="live text to complete")
    kinds = {action for _, action in live.actions}
    assert MessageAction.MESSAGE_CREATE in kinds and MessageAction.MESSAGE_APPEND in kinds
    appended = [m.data for m in live.messages if m.action == MessageAction.MESSAGE_APPEND]
    assert "".join(appended) == expected  # the fragments alone rebuild it too
    assert all(m.name == "response" for m in live.messages)

    # A late joiner with rewind=1 gets the whole message at once.
    rewound = TextView()
    late = (await connected(ably_clients(use_binary_protocol=binary))).channels.get(
        channel_name, ChannelOptions(params={"rewind": "1"})
    )
    await late.subscribe(rewound.on_message)
    await wait_for(lambda: rewound.texts.get(serial) == expected, what="rewound message")
    assert len(rewound.messages) == 1

    # REST history: one message with the whole text, not one per append.
    page = await ably_rest.channels.get(channel_name).history()
    assert [(m.serial, m.data) for m in page.items] == [(serial, expected)]


async def test_get_message_versions_and_update_replaces_text(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    channel = (await connected(ably_clients())).channels.get(channel_name)
    await channel.attach()
    serial = await _stream(channel, ["one ", "two ", "three"])

    assert (await channel.get_message(serial)).data == "one two three"
    versions = await channel.get_message_versions(serial)
    assert len(versions.items) >= 1

    await channel.update_message(Message(serial=serial, data="replaced", name="response"))
    await wait_for_async(lambda: _message_data(channel, serial), "replaced")
    history = await ably_rest.channels.get(channel_name).history()
    assert [m.data for m in history.items] == ["replaced"]


async def _message_data(channel: Any, serial: str) -> Any:
    return (await channel.get_message(serial)).data


async def wait_for_async(fetch: Any, expected: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := await fetch()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"got {value!r}, expected {expected!r}")
        await asyncio.sleep(0.05)


async def test_headers_in_extras_reach_subscribers_and_history(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    """The wire contract carries `responseId` and `status` in `extras.headers`; an append
    replaces extras, so every append resends all headers (DESIGN.md)."""
    live = TextView()
    sub = (await connected(ably_clients())).channels.get(channel_name)
    await sub.subscribe(live.on_message)
    pub = (await connected(ably_clients())).channels.get(channel_name)
    await pub.attach()
    streaming = {"headers": {"responseId": "job-1", "status": "streaming"}}
    complete = {"headers": {"responseId": "job-1", "status": "complete"}}
    result = await pub.publish(Message(name="response", data="", extras=streaming))
    serial = result.serials[0]
    await pub.append_message(Message(serial=serial, data="hi", extras=streaming))
    # Closing with an update carrying the whole text: Sockudo refuses an append with
    # empty data (40000 "append request data must not be empty"), which Ably's docs do
    # not forbid; the worker never sends one (see test_empty_append_is_refused).
    await pub.update_message(Message(serial=serial, name="response", data="hi", extras=complete))

    await wait_for(lambda: live.texts.get(serial) == "hi", what="text")
    await wait_for(
        lambda: (live.messages[-1].extras or {}).get("headers", {}).get("status") == "complete",
        what="closing headers",
    )
    stored = (await ably_rest.channels.get(channel_name).history()).items[0]
    assert stored.data == "hi"
    assert stored.extras["headers"] == {"responseId": "job-1", "status": "complete"}


async def test_presence_enter_update_leave_get_and_events(
    ably_clients: Any, channel_name: str
) -> None:
    events: list[tuple[int, str, Any]] = []
    watcher = (await connected(ably_clients())).channels.get(channel_name)
    await watcher.presence.subscribe(lambda m: events.append((m.action, m.client_id, m.data)))
    agent = (await connected(ably_clients(client_id="agent-1"))).channels.get(channel_name)

    await agent.presence.enter({"capacity": 4, "in_flight": 0})
    await wait_for(lambda: any(e[0] == PresenceAction.ENTER for e in events), what="enter")
    members = await watcher.presence.get()
    assert [(m.client_id, m.data) for m in members] == [
        ("agent-1", {"capacity": 4, "in_flight": 0})
    ]

    await agent.presence.update({"capacity": 4, "in_flight": 2})
    await wait_for(lambda: any(e[0] == PresenceAction.UPDATE for e in events), what="update")
    assert (await watcher.presence.get())[0].data == {"capacity": 4, "in_flight": 2}

    await agent.presence.leave()
    await wait_for(lambda: any(e[0] == PresenceAction.LEAVE for e in events), what="leave")
    assert await watcher.presence.get() == []
    assert [e[0] for e in events] == [
        PresenceAction.ENTER,
        PresenceAction.UPDATE,
        PresenceAction.LEAVE,
    ]
    assert {e[1] for e in events} == {"agent-1"}


PRESENT_SCRIPT = """
import asyncio, sys
from worker.transport.client import realtime_client
async def main():
    client = realtime_client(sys.argv[1], sys.argv[2], client_id="crashing-agent",
                             transport_params={"remainPresentFor": 1000})
    channel = client.channels.get(sys.argv[3])
    await channel.presence.enter({"pid": 1})
    print("entered", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_abrupt_disconnect_gives_a_synthetic_leave(
    local_ably: LocalAbly, ably_clients: Any, channel_name: str
) -> None:
    """Ably docs: a member whose connection drops abruptly is removed after 15 s (the
    `remainPresentFor` transport parameter shortens it). A killed process must leave."""
    watcher = (await connected(ably_clients())).channels.get(channel_name)
    events: list[tuple[int, str]] = []
    await watcher.presence.subscribe(lambda m: events.append((m.action, m.client_id)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PRESENT_SCRIPT, local_ably.key, local_ably.endpoint, channel_name,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"entered"
    await wait_for(lambda: (PresenceAction.ENTER, "crashing-agent") in events, what="enter")

    proc.send_signal(signal.SIGKILL)  # no CLOSE: the socket just dies
    await proc.wait()
    killed_at = time.monotonic()
    await wait_for(
        lambda: (PresenceAction.LEAVE, "crashing-agent") in events, timeout=20, what="leave"
    )
    assert time.monotonic() - killed_at >= 0.5  # after the grace period, not at once
    assert await watcher.presence.get() == []


def _jwt(key: AblyKey, capability: dict[str, list[str]], ttl_s: int = 600) -> str:
    now = int(time.time())
    claims = {"iat": now, "exp": now + ttl_s, "x-ably-capability": json.dumps(capability)}
    return jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.key_name})


@pytest.mark.filterwarnings("ignore:The HMAC key is")  # the local dev secret is short on purpose
async def test_jwt_capability_allows_one_channel_and_refuses_others(
    local_ably: LocalAbly, channel_name: str
) -> None:
    token = _jwt(AblyKey.parse(local_ably.key), {f"{channel_name}": ["subscribe", "publish"]})
    client = realtime_client(None, local_ably.endpoint, token=token)
    try:
        await connected(client)
        allowed = client.channels.get(channel_name)
        await allowed.attach()
        assert allowed.state == "attached"
        await allowed.publish("greeting", "hello")

        denied = client.channels.get(f"{channel_name}-other")
        with pytest.raises(AblyException) as refused:
            await denied.attach()
        assert refused.value.code == 40160
    finally:
        await client.close()


async def test_token_request_signed_with_the_key_authenticates(
    local_ably: LocalAbly, ably_rest: Any, channel_name: str
) -> None:
    async def auth_callback(_params: Any) -> Any:
        return await ably_rest.auth.create_token_request(
            {"capability": {channel_name: ["*"]}, "client_id": "signed-client"}
        )

    client = realtime_client(None, local_ably.endpoint, auth_callback=auth_callback)
    try:
        await connected(client)
        channel = client.channels.get(channel_name)
        await channel.attach()
        result = await channel.publish("greeting", "hello")
        assert result.serials[0]
        assert client.auth.client_id == "signed-client"
    finally:
        await client.close()


async def test_wrong_secret_is_refused(local_ably: LocalAbly) -> None:
    wrong = f"{AblyKey.parse(local_ably.key).key_name}:not-the-secret"
    client = rest_client(wrong, local_ably.endpoint)
    with pytest.raises(AblyException) as refused:
        await client.auth.request_token()
    assert 40100 <= refused.value.code < 40200
    await client.close()


async def test_empty_append_is_refused_by_sockudo(ably_clients: Any, channel_name: str) -> None:
    """Difference from Ably: Sockudo refuses `message.append` with empty data. Ably's docs
    describe appends without such a rule. The worker closes with an update instead."""
    channel = (await connected(ably_clients())).channels.get(channel_name)
    await channel.attach()
    serial = (await channel.publish(Message(name="response", data=""))).serials[0]
    with pytest.raises(AblyException) as refused:
        await channel.append_message(Message(serial=serial, data=""))
    assert refused.value.code == 40000


async def test_update_without_data_keeps_the_text(ably_clients: Any, channel_name: str) -> None:
    """An update that carries only extras leaves the text as it was (the worker's closing
    update for an answer too long to resend whole relies on this)."""
    channel = (await connected(ably_clients())).channels.get(channel_name)
    await channel.attach()
    serial = await _stream(channel, ["long ", "answer"])
    closing = {"headers": {"responseId": "r", "status": "complete"}}
    await channel.update_message(Message(serial=serial, name="response", extras=closing))
    stored = await channel.get_message(serial)
    assert (stored.data, stored.extras) == ("long answer", closing)


async def test_publishing_one_message_id_twice_gives_one_message(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    """Idempotent publish: the worker's create carries a fixed id, so a retry that lost
    the first ack gets the same message back (and its serial), never a second one."""
    first = (await connected(ably_clients())).channels.get(channel_name)
    second = (await connected(ably_clients())).channels.get(channel_name)
    one = await first.publish(Message(name="response", data="", id="job-9:response"))
    two = await second.publish(Message(name="response", data="", id="job-9:response"))
    assert one.serials == two.serials
    history = await ably_rest.channels.get(channel_name).history()
    assert [m.id for m in history.items] == ["job-9:response"]


# Repeating a message id with extras. Ably's docs (pub-sub "Idempotent publishing"): an
# attempt to publish the same message again does not make a duplicate; setting the id
# yourself keeps a publish idempotent when a publisher instance might be restarted; Ably
# detects a duplicate only within 2 minutes of the original, after which a message with
# the same id is treated as a new message. The docs do not say the payload is compared,
# nor what the repeat's acknowledgement carries.
# Sockudo: the repeat gets the first message's serial only if a SHA-256 fingerprint of its
# payload equals the first one's; otherwise it refuses with code 40000, status 400, "Failed
# to publish message 0: invalid input: message.id was already used with a different
# payload" (realtime and REST alike), for 300 s (`[idempotency] ttl_seconds` of
# worker/devstack/ably.py). `extras.headers` is fingerprinted in the random order of a
# Rust HashMap, so an identical payload with two or more headers is refused most of the
# time and deduplicated now and then. Either way the worker cannot count on a repeated
# create giving its serial back: a retry finds the message in history
# (worker/transport/lookup.py).

REPEATED_ID_REFUSAL = "message.id was already used with a different payload"
REPEATS = 12


def _worker_headers(status: str = "streaming", model: str = "m-1") -> dict[str, Any]:
    """What the worker's create carries: four headers (contract.Headers.extras())."""
    headers = {"user": "u1", "responseId": "job-9", "status": status, "model": model}
    return {"headers": headers}


async def _publish_outcome(channel: Any, message: Message) -> str:
    """The serial the publish got, or "refused" for Sockudo's repeated-id refusal."""
    try:
        return str((await channel.publish(message)).serials[0])
    except AblyException as refused:
        assert (refused.code, refused.status_code) == (40000, 400)
        assert REPEATED_ID_REFUSAL in refused.message
        return "refused"


async def test_one_message_id_twice_with_the_same_headers_is_refused_or_gives_one_message(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    first = (await connected(ably_clients())).channels.get(channel_name)
    second = (await connected(ably_clients())).channels.get(channel_name)
    create = {"name": "response", "data": "", "id": "job-9:response"}
    serial = (await first.publish(Message(**create, extras=_worker_headers()))).serials[0]

    outcomes = [
        await _publish_outcome(second, Message(**create, extras=_worker_headers()))
        for _ in range(REPEATS)
    ]
    assert set(outcomes) <= {serial, "refused"}  # never a second message
    assert "refused" in outcomes  # the same payload, refused (the header order differs)
    history = await ably_rest.channels.get(channel_name).history()
    assert [(m.id, m.serial) for m in history.items] == [("job-9:response", serial)]

    # With one header the fingerprint has one order: every repeat gives the same serial.
    one = {"headers": {"responseId": "job-10"}}
    create = {"name": "response", "data": "", "id": "job-10:response", "extras": one}
    serial = (await first.publish(Message(**create))).serials[0]
    outcomes = [await _publish_outcome(second, Message(**create)) for _ in range(REPEATS)]
    assert outcomes == [serial] * REPEATS


async def test_one_message_id_twice_with_a_different_payload_is_refused(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    first = (await connected(ably_clients())).channels.get(channel_name)
    second = (await connected(ably_clients())).channels.get(channel_name)
    create = {"name": "response", "id": "job-9:response"}
    serial = (await first.publish(Message(**create, data="", extras=_worker_headers()))).serials[0]

    different = [
        Message(**create, data="", extras=_worker_headers(model="m-2")),  # other headers
        Message(**create, data="", extras=_worker_headers(status="interrupted")),
        Message(**create, data="other text", extras=_worker_headers()),
        Message(**create, data=""),  # no extras
    ]
    for message in different:
        assert await _publish_outcome(second, message) == "refused"
    with pytest.raises(AblyException) as refused:  # REST: the same refusal
        await ably_rest.channels.get(channel_name).publish(different[0])
    assert (refused.value.code, refused.value.status_code) == (40000, 400)
    assert REPEATED_ID_REFUSAL in refused.value.message

    history = await ably_rest.channels.get(channel_name).history()
    assert [(m.serial, m.data, m.extras) for m in history.items] == [
        (serial, "", _worker_headers())
    ]


async def test_repeating_a_create_after_appends_and_an_update_leaves_the_message(
    ably_clients: Any, ably_rest: Any, channel_name: str
) -> None:
    """A create repeated after its message grew and was closed: compared with the first
    create's payload, not the message's current state, and never resets the message."""
    first = (await connected(ably_clients())).channels.get(channel_name)
    second = (await connected(ably_clients())).channels.get(channel_name)
    await first.attach()

    # Without extras: the same serial back, after an append and after an update.
    bare = {"name": "response", "data": "", "id": "bare:response"}
    bare_serial = (await first.publish(Message(**bare))).serials[0]
    await first.append_message(Message(serial=bare_serial, data="hi"))
    assert await _publish_outcome(second, Message(**bare)) == bare_serial
    await first.update_message(Message(serial=bare_serial, name="response", data="bye"))
    assert await _publish_outcome(second, Message(**bare)) == bare_serial
    assert (await first.get_message(bare_serial)).data == "bye"
    # (Sockudo then shows its own `sockudo_*` entries in this message's extras.headers,
    # since it was published without extras; the worker always sends headers.)

    # With the worker's headers: refused or the same serial, as for a fresh message.
    create = {"name": "response", "data": "", "id": "job-9:response"}
    serial = (await first.publish(Message(**create, extras=_worker_headers()))).serials[0]
    await first.append_message(Message(serial=serial, data="hel", extras=_worker_headers()))
    await first.append_message(Message(serial=serial, data="lo", extras=_worker_headers()))
    after_appends = [
        await _publish_outcome(second, Message(**create, extras=_worker_headers()))
        for _ in range(REPEATS)
    ]
    closing = Message(
        serial=serial, name="response", data="hello", extras=_worker_headers("complete")
    )
    await first.update_message(closing)
    after_update = [
        await _publish_outcome(second, Message(**create, extras=_worker_headers()))
        for _ in range(REPEATS)
    ]
    assert set(after_appends + after_update) <= {serial, "refused"}
    assert "refused" in after_appends and "refused" in after_update

    history = await ably_rest.channels.get(channel_name).history()
    assert [(m.serial, m.data) for m in history.items] == [(serial, "hello"), (bare_serial, "bye")]
    assert history.items[0].extras == _worker_headers("complete")


@pytest.mark.filterwarnings("ignore:The HMAC key is")
async def test_a_jwt_user_claim_is_not_stamped_on_messages_by_sockudo(
    local_ably: LocalAbly, ably_clients: Any, channel_name: str
) -> None:
    """Ably's docs: a JWT claim `ably.channel.<pattern>` is a user claim, which Ably adds
    to every message that client publishes on a matching channel as `extras.userClaim`
    (the worker's CANCEL_ROLES check reads it, never a header the client wrote). Sockudo
    5.2.0 verifies the token and its clientId but adds no `userClaim`: the role path is
    checked in the unit layer, and this test fails the day Sockudo stamps it."""
    key = AblyKey.parse(local_ably.key)
    now = int(time.time())
    claims = {"iat": now, "exp": now + 600, "x-ably-capability": json.dumps({"*": ["*"]}),
              "x-ably-clientId": "bob", "ably.channel.*": "moderator"}  # fmt: skip
    token = jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.key_name})
    user = realtime_client(None, local_ably.endpoint, token=token)
    try:
        received: list[Any] = []
        listening = (await connected(ably_clients())).channels.get(channel_name)
        await listening.subscribe(lambda message: received.append(message))
        cancel = Message(name="cancel", extras={"headers": {"responseId": "job-1"}})
        await user.channels.get(channel_name).publish(cancel)
        await wait_for(lambda: bool(received), what="the cancel")
    finally:
        await user.close()
    assert received[0].client_id == "bob"  # the token's identity is stamped
    assert "userClaim" not in (received[0].extras or {})
