"""The resume routine's reading half: what a session missed, from the channel's history.

Called once the session's channel is attached and subscribed (live messages are held in
its inbox meanwhile). History is paged backwards from the newest message down to the
checkpoint (the last user message the session processed; with none, the moment the
session was opened), then returned oldest first.

The bound at the other end is the attach point (ably-js: `untilAttach`). ably-python
3.1.4 has no such option, and the channel serial its ATTACHED carries is not comparable
with message serials on Sockudo, so the same bound is reached with message serials,
which Ably (and Sockudo) order lexicographically on a channel: history messages at or
after the first message the subscription delivered are left to the live path, and the
session's set of seen serials drops any message both paths deliver (one published
after the attach but before this read; Sockudo's redelivery after a resume). No gap:
everything before the first live message comes from history; no repeat: each serial
is processed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.transport import sdk_quirks

PAGE_SIZE = 100
MAX_PAGES = 50  # 5,000 messages back at most: a session idle for long starts afresh


@dataclass(frozen=True)
class Checkpoint:
    serial: str | None  # the last user message processed; None: none yet
    at_ms: int  # its timestamp, or the moment the session was opened

    def covers(self, message: Any) -> bool:
        """Processed already (at or before the checkpoint)?"""
        serial = getattr(message, "serial", None) or ""
        if self.serial is not None:
            return serial <= self.serial
        return int(getattr(message, "timestamp", 0) or 0) < self.at_ms


@dataclass
class Missed:
    messages: list[Any]  # oldest first
    pages: int


async def missed_since(
    channel: Any,
    checkpoint: Checkpoint,
    *,
    live_from: str | None = None,
    page_size: int = PAGE_SIZE,
    max_pages: int = MAX_PAGES,
) -> Missed:
    """Messages after `checkpoint` and before the first live one (`live_from`)."""
    found: list[Any] = []
    page = await sdk_quirks.history(channel, direction="backwards", limit=page_size)
    pages = 1
    while True:
        reached = False
        for message in page.items or []:
            if checkpoint.covers(message):
                reached = True
                break
            if live_from is None or (getattr(message, "serial", "") or "") < live_from:
                found.append(message)
        if reached or pages >= max_pages or not page.has_next():
            break
        page = await page.next()
        if page is None:
            break
        pages += 1
    found.reverse()
    return Missed(found, pages)
