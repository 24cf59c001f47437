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
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # latest, per serial
    statuses: dict[str, list[str]] = field(default_factory=dict)  # each status seen, in order

    def on_message(self, message: Any) -> None:
        self.messages.append(message)
        serial, action, data = message.serial, message.action, message.data or ""
        self.actions.append((serial, action))
        headers = (message.extras or {}).get("headers") or {}
        if headers:
            self.headers[serial] = headers
            seen = self.statuses.setdefault(serial, [])
            if headers.get("status") and (not seen or seen[-1] != headers["status"]):
                seen.append(headers["status"])
        if action == MessageAction.MESSAGE_APPEND:
            self.texts[serial] = self.texts.get(serial, "") + data
        else:
            self.texts[serial] = data

    def by_response(self, response_id: str) -> str | None:
        """The serial of the message whose headers name `response_id`."""
        for serial, headers in self.headers.items():
            if headers.get("responseId") == response_id:
                return serial
        return None

    def status(self, response_id: str) -> str | None:
        serial = self.by_response(response_id)
        return self.headers[serial].get("status") if serial else None
