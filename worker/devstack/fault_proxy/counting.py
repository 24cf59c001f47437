"""Counting what clients publish the way Ably's rate limits do.

Ably allows 50 inbound messages a second per connection and 50 per channel. Appends to one
message serial are rolled up: the first append opens a window of `appendRollupWindow`
(default 40 ms; the client may choose it in the connection's query string) and the appends
that follow inside it count with it as one, so one response costs at most 25 a second.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from worker.devstack.fault_proxy.protocol import MESSAGE_APPEND, ProtocolMessage

WINDOW_S = 1.0
DEFAULT_ROLLUP_WINDOW_MS = 40.0


@dataclass(frozen=True)
class RateLimits:
    """Ably's inbound limits, in counted messages per second."""

    connection: int = 50
    channel: int = 50


class SlidingWindow:
    """The count over the last second, and the highest it has been."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, int]] = deque()
        self._sum = 0
        self.peak = 0

    def _evict(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - WINDOW_S:
            self._sum -= self._events.popleft()[1]

    def would_exceed(self, now: float, n: int, limit: int) -> bool:
        self._evict(now)
        return n > 0 and self._sum + n > limit

    def add(self, now: float, n: int) -> None:
        if n <= 0:
            return
        self._evict(now)
        self._events.append((now, n))
        self._sum += n
        self.peak = max(self.peak, self._sum)


@dataclass(frozen=True)
class Counts:
    protocol_messages: int  # MESSAGE protocol messages forwarded
    messages: int  # messages inside them
    counted: int  # messages as Ably counts them (appends rolled up)
    refused: int  # protocol messages the proxy refused with a 42911 NACK
    peak_counted_per_s: int  # highest `counted` over any one-second window


@dataclass
class Tally:
    """Running counts for one scope: a connection, a channel, or a channel on a connection."""

    protocol_messages: int = 0
    messages: int = 0
    counted: int = 0
    refused: int = 0
    window: SlidingWindow = field(default_factory=SlidingWindow)

    def snapshot(self) -> Counts:
        return Counts(
            self.protocol_messages, self.messages, self.counted, self.refused, self.window.peak
        )


@dataclass(frozen=True)
class Publish:
    """One client MESSAGE protocol message, measured before it is forwarded."""

    channel: str
    messages: int
    counted: int
    opens: tuple[str, ...]  # message serials whose rollup window this publish opens


class AppendRollup:
    """Which appends open a rollup window (and count) and which fall inside one (and don't)."""

    def __init__(self, window_ms: float) -> None:
        self.window_s = max(window_ms, 0.0) / 1000
        self._open_until: dict[tuple[str, str], float] = {}

    def rolled_up(self, channel: str, serial: str, now: float) -> bool:
        return now < self._open_until.get((channel, serial), 0.0)

    def open(self, channel: str, serials: tuple[str, ...], now: float) -> None:
        if self.window_s <= 0:
            return
        if len(self._open_until) > 10_000:  # forget closed windows now and then
            self._open_until = {k: t for k, t in self._open_until.items() if t > now}
        for serial in serials:
            self._open_until[(channel, serial)] = now + self.window_s


@dataclass(frozen=True)
class ConnectionStats:
    id: int  # proxy-local: one per WebSocket the proxy accepted
    ably_connection_id: str | None  # from CONNECTED: stays the same across a resume
    append_rollup_window_ms: float
    open: bool
    total: Counts
    channels: dict[str, Counts]


@dataclass(frozen=True)
class ProxyStats:
    connections: dict[int, ConnectionStats]
    channels: dict[str, Counts]  # every connection together: what Ably's channel limit sees

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConnectionCounter:
    """What one client WebSocket has published."""

    def __init__(self, conn_id: int, rollup_window_ms: float) -> None:
        self.id = conn_id
        self.ably_connection_id: str | None = None
        self.open = True
        self.rollup = AppendRollup(rollup_window_ms)
        self.total = Tally()
        self.channels: dict[str, Tally] = {}

    def measure(self, message: ProtocolMessage, now: float) -> Publish:
        channel = str(message.get("channel") or "")
        inner = message.get("messages") or []
        counted, opens = 0, []
        for item in inner:
            serial = item.get("serial") if isinstance(item, dict) else None
            if isinstance(item, dict) and item.get("action") == MESSAGE_APPEND and serial:
                if serial in opens or self.rollup.rolled_up(channel, serial, now):
                    continue
                opens.append(serial)
            counted += 1
        return Publish(channel, len(inner), counted, tuple(opens))

    def stats(self) -> ConnectionStats:
        return ConnectionStats(
            id=self.id,
            ably_connection_id=self.ably_connection_id,
            append_rollup_window_ms=self.rollup.window_s * 1000,
            open=self.open,
            total=self.total.snapshot(),
            channels={name: tally.snapshot() for name, tally in self.channels.items()},
        )


class RateBook:
    """Every connection's counts and the per-channel counts across connections."""

    def __init__(self, limits: RateLimits | None = None) -> None:
        self.limits = limits or RateLimits()
        self.connections: dict[int, ConnectionCounter] = {}
        self.channels: dict[str, Tally] = {}
        self._ids = itertools.count(1)

    def open_connection(self, rollup_window_ms: float) -> ConnectionCounter:
        counter = ConnectionCounter(next(self._ids), rollup_window_ms)
        self.connections[counter.id] = counter
        return counter

    def admits(self, conn: ConnectionCounter, publish: Publish, now: float) -> bool:
        """Whether Ably would take this publish without going over a limit."""
        channel = self.channels.get(publish.channel) or Tally()
        return not (
            conn.total.window.would_exceed(now, publish.counted, self.limits.connection)
            or channel.window.would_exceed(now, publish.counted, self.limits.channel)
        )

    def record(self, conn: ConnectionCounter, publish: Publish, now: float, refused: bool) -> None:
        scopes = (
            conn.total,
            conn.channels.setdefault(publish.channel, Tally()),
            self.channels.setdefault(publish.channel, Tally()),
        )
        for tally in scopes:
            if refused:
                tally.refused += 1
                continue
            tally.protocol_messages += 1
            tally.messages += publish.messages
            tally.counted += publish.counted
            tally.window.add(now, publish.counted)
        if not refused:
            conn.rollup.open(publish.channel, publish.opens, now)

    def stats(self) -> ProxyStats:
        return ProxyStats(
            connections={cid: conn.stats() for cid, conn in self.connections.items()},
            channels={name: tally.snapshot() for name, tally in self.channels.items()},
        )

    def reset(self) -> None:
        """Forget closed connections and zero the rest (rate windows included)."""
        self.channels.clear()
        for cid, conn in list(self.connections.items()):
            if not conn.open:
                del self.connections[cid]
                continue
            conn.total, conn.channels = Tally(), {}
