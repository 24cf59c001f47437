"""Test helpers for reading Ably channels the way a front end does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ably.types.message import MessageAction


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll `condition` until it holds; fail the test with `what` if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or condition}")
        await asyncio.sleep(0.02)


@dataclass
class TextView:
    """What a subscriber renders: one text per message serial.

    `message.create` starts a text, `message.append` adds its fragment, `message.update`
    replaces the whole text (Sockudo follows each live append with an update holding the
    text so far; rewind and history give one update with the whole text).
    """

    texts: dict[str, str] = field(default_factory=dict)
    actions: list[tuple[str, MessageAction]] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)

    def on_message(self, message: Any) -> None:
        self.messages.append(message)
        serial, action, data = message.serial, message.action, message.data or ""
        self.actions.append((serial, action))
        if action == MessageAction.MESSAGE_APPEND:
            self.texts[serial] = self.texts.get(serial, "") + data
        else:
            self.texts[serial] = data
