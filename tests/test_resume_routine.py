"""The resume routine's reading half against the local Ably: what a session missed."""

from __future__ import annotations

from typing import Any

from ably.types.message import Message

from worker.sessions.resume import Checkpoint, missed_since


async def published(channel: Any, count: int) -> list[Any]:
    for i in range(count):
        await channel.publish(Message(name="prompt", data=f"m{i}"))
    page = await channel.history(direction="forwards", limit=100)
    return list(page.items)


async def test_everything_after_the_checkpoint_and_before_the_first_live_message(
    ably_clients: Any, channel_name: str
) -> None:
    channel = ably_clients(client_id="alice").channels.get(channel_name)
    messages = await published(channel, 7)
    checkpoint = Checkpoint(messages[1].serial, messages[1].timestamp)
    missed = await missed_since(channel, checkpoint, live_from=messages[5].serial, page_size=2)
    assert [m.data for m in missed.messages] == ["m2", "m3", "m4"]  # oldest first
    assert missed.pages == 3  # 6-5, 4-3, 2-1: stopped at the checkpoint, not the end


async def test_no_checkpoint_starts_from_when_the_session_was_opened(
    ably_clients: Any, channel_name: str
) -> None:
    channel = ably_clients(client_id="alice").channels.get(channel_name)
    messages = await published(channel, 4)
    opened = Checkpoint(None, messages[2].timestamp)
    missed = await missed_since(channel, opened)
    # Older prompts than the session are never answered; none after it is missed.
    assert [m.data for m in missed.messages] == [
        m.data for m in messages if m.timestamp >= messages[2].timestamp
    ]
    assert "m3" in [m.data for m in missed.messages]


async def test_nothing_missed_when_the_checkpoint_is_the_newest(
    ably_clients: Any, channel_name: str
) -> None:
    channel = ably_clients(client_id="alice").channels.get(channel_name)
    messages = await published(channel, 3)
    checkpoint = Checkpoint(messages[-1].serial, messages[-1].timestamp)
    missed = await missed_since(channel, checkpoint)
    assert (missed.messages, missed.pages) == ([], 1)
