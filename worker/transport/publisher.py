"""The publisher seam: what the runner needs from one answer's channel messages.

`ResponseStream` (message per response) and `TokenStream` (message per token) both are
one; the unit tests use a double of it. A publisher never sends once its process's
lease on the job may have lapsed (`alive()` false) or once `abort()` was called: a
worker that lost a job stops writing to its message at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from worker.transport.contract import Status


class Abandoned(Exception):
    """The publisher may no longer send: the job is someone else's now."""


class Pacer(Protocol):
    """The connection's say in when this answer may send (`transport.pool.Lease`)."""

    def min_interval_s(self) -> float: ...
    def reserve(self) -> float: ...
    def stalled(self) -> None: ...  # an acknowledgement never came on this connection


class Unpaced:
    """No budget: appends at most once per rollup window, everything else at once."""

    def __init__(self, interval_s: float = 0.04) -> None:
        self.interval_s = interval_s

    def min_interval_s(self) -> float:
        return self.interval_s

    def reserve(self) -> float:
        return 0.0

    def stalled(self) -> None:
        pass


def always_alive() -> bool:
    return True


Alive = Callable[[], bool]


class Publisher(Protocol):
    serial: str | None  # the channel message (or start message) once opened
    text: str  # everything appended so far
    deltas: int  # model deltas received
    appends: int  # messages sent for them (fewer when coalesced)

    async def open(self, serial: str | None = None, *, resuming: bool = False) -> Status | None:
        """Start the answer's message, or reopen an earlier attempt's. When `resuming`,
        an earlier attempt's message already closed complete or cancelled is left as it
        is and its status returned: the job is finished, not to be run again."""
        ...

    def append(self, delta: str) -> None:
        """Take one delta; returns at once (sends happen in their own tasks, in order)."""
        ...

    async def close(self, status: Status, error: str | None = None) -> int:
        """Flush, then the closing message with the status; returns failed sends."""
        ...

    def abort(self) -> None:
        """Stop at once: cancel what is coalescing and what is in flight; send nothing."""
        ...
