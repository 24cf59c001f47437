"""Finding a response's message on its channel: by its message id or its `responseId`.

A job killed between its `message.create` and the saved serial leaves a message the next
attempt must reopen, not duplicate. Republishing the create with the same id does not
reliably give the serial back (Sockudo refuses it with 40000 "message.id was already used
with a different payload" for the worker's headers; Ably deduplicates an id only for about
2 minutes, after which a repeat is a new message), so a retry looks the message up here
in the channel's history and finishes it.

History gives one message per serial in its latest aggregated state (the create's place in
history, the latest text and headers after every append and update: Ably's docs, and what
Sockudo does), so the state found here is the one to continue from. `response_state`
reads one message by serial (`get_message`: the latest version too).

Both work with either kind of ably-python 3.1.4 channel: `rest_client(...).channels.get(n)`
or a realtime client's `channels.get(n)`. A realtime channel inherits `history()` and
`get_message()` from the REST channel: plain HTTP requests with the client's auth, no
attach needed (and no `untilAttach`). Errors from Ably (`AblyException`) reach the caller,
except a 404 from `response_state`, which is None.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ably import AblyException

from worker.transport.contract import RESPONSE, Status

DEFAULT_PAGE_SIZE = 100  # Ably's default page; the SDK refuses more than 1000
_CLOSED = frozenset({Status.COMPLETE, Status.CANCELLED, Status.FAILED})


def response_message_id(response_id: str) -> str:
    """The message id `contract.response_create` gives a response's message."""
    return f"{response_id}:response"


@dataclass(frozen=True)
class FoundResponse:
    """A response's message as the channel holds it now."""

    serial: str
    status: str | None  # the `status` header, None when absent
    text: str  # the message's current data ("" when it has none, or none that is text)
    headers: dict[str, str] = field(default_factory=dict, hash=False)  # `extras.headers`: text
    message_id: str | None = None

    @property
    def closed(self) -> bool:
        """Closed for good (`complete`, `cancelled`, `failed`): nothing to resume.
        `streaming` and `interrupted` are open: a retry reopens the same message."""
        return self.status in _CLOSED

    @classmethod
    def from_message(cls, message: Any) -> FoundResponse:
        extras = getattr(message, "extras", None)
        raw = extras.get("headers") if isinstance(extras, dict) else None
        headers = {
            name: value
            for name, value in (raw if isinstance(raw, dict) else {}).items()
            if isinstance(name, str) and isinstance(value, str)
        }
        data = getattr(message, "data", None)
        return cls(
            serial=str(message.serial),
            status=headers.get("status"),
            text=data if isinstance(data, str) else "",
            headers=headers,
            message_id=getattr(message, "id", None),
        )


def is_response_message(message: Any, response_id: str) -> bool:
    """The message carries this response: its id is the create's id, or it is named
    `response` with this `responseId` header (message-per-token `start`/`stop` and
    `cancel` messages carry the header too, under other names, and do not match)."""
    if not getattr(message, "serial", None):
        return False
    if getattr(message, "id", None) == response_message_id(response_id):
        return True
    if getattr(message, "name", None) != RESPONSE:
        return False
    extras = getattr(message, "extras", None)
    headers = extras.get("headers") if isinstance(extras, dict) else None
    return isinstance(headers, dict) and headers.get("responseId") == response_id


async def _history_newest_first(channel: Any, max_pages: int, page_size: int) -> AsyncIterator[Any]:
    if max_pages < 1:
        raise ValueError("max_pages must be at least 1")
    if not 1 <= page_size <= 1000:
        raise ValueError("page_size must be between 1 and 1000")
    page = await channel.history(limit=page_size)  # backwards: newest first
    for number in range(1, max_pages + 1):
        for message in page.items or []:
            yield message
        if number == max_pages or not page.has_next():
            return
        page = await page.next()
        if page is None:
            return


async def find_responses(
    channel: Any,
    response_id: str,
    *,
    max_pages: int = 10,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> list[FoundResponse]:
    """Every message of `response_id` within `max_pages` pages of history, newest first.

    More than one only on Ably when a create was repeated after its 2-minute
    deduplication window (which made a second message), or after a bug.
    """
    return [
        FoundResponse.from_message(message)
        async for message in _history_newest_first(channel, max_pages, page_size)
        if is_response_message(message, response_id)
    ]


async def find_response(
    channel: Any,
    response_id: str,
    *,
    max_pages: int = 10,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> FoundResponse | None:
    """The newest message of `response_id` on `channel`, or None.

    Pages history back from the newest message, `page_size` messages a page, at most
    `max_pages` pages, and stops at the first message whose id is
    `{response_id}:response` or that is named `response` with header
    `responseId == response_id`. History holds a message at its create's place, so an
    older answer needs more pages, however recently it was updated.
    """
    async for message in _history_newest_first(channel, max_pages, page_size):
        if is_response_message(message, response_id):
            return FoundResponse.from_message(message)
    return None


async def response_state(channel: Any, serial: str) -> FoundResponse | None:
    """The latest version of the message with `serial` (`get_message`), or None if the
    channel has no such message (404). Not checked to be a `response` message."""
    try:
        message = await channel.get_message(serial)
    except AblyException as error:
        if error.status_code == 404 or error.code == 40400:
            return None
        raise
    return FoundResponse.from_message(message)
