"""msgSerial bookkeeping for a proxy that refuses some publishes itself.

A refused publish never reaches the server, so the server would see a gap in msgSerial;
the proxy renumbers what it forwards so the server's serials stay contiguous. And
ably-python settles pending publishes from the front of its queue up to the end of each
ACK/NACK range (`PendingMessageQueue.complete_messages` ignores where the range starts),
so a NACK for serial 5 sent while 3 and 4 wait would settle 3 and 4 with that error too.
The client therefore gets its ACKs and NACKs in its own numbering and in serial order:
an outcome waits until every earlier serial has one.

One map lives as long as the Ably connection, across resumes: the SDK keeps its serials
when it resumes and resends what was not acknowledged, which must reach the server under
the serial it had the first time (Sockudo derives message ids from it, and deduplicates).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from worker.devstack.fault_proxy.protocol import ACK, NACK, ProtocolMessage

_KEEP_FORWARDED = 10_000  # client serials remembered for resends after a resume


@dataclass(frozen=True)
class Outcome:
    ack: bool
    result: Any = None  # the ACK's `res` entry for this serial
    error: Any = None  # the NACK's `error`


@dataclass
class SerialMap:
    connection_id: str | None = None  # the Ably connection this map belongs to
    _next_upstream: int = 0
    _upstream_of: dict[int, int] = field(default_factory=dict)
    _client_of: dict[int, int] = field(default_factory=dict)
    _waiting: dict[int, Outcome | None] = field(default_factory=dict)
    _order: list[int] = field(default_factory=list)  # heap of the serials in _waiting

    def forward(self, serial: int) -> int:
        """The server-side serial for a publish the proxy forwards (the same on a resend)."""
        upstream = self._upstream_of.get(serial)
        if upstream is None:
            upstream = self._next_upstream
            self._next_upstream += 1
            self._upstream_of[serial] = upstream
            self._forget_old()
        self._client_of[upstream] = serial
        self._expect(serial)
        return upstream

    def hold(self, serial: int) -> None:
        """Keep the place of a refused publish until its NACK is `resolve`d."""
        self._expect(serial)

    def forwarded(self, serial: int) -> bool:
        """Whether this publish reached the server before: a resend after a resume."""
        return serial in self._upstream_of

    def resolve(self, serial: int, outcome: Outcome) -> None:
        if serial in self._waiting:
            self._waiting[serial] = outcome

    def on_server_reply(self, message: ProtocolMessage) -> None:
        """Take the server's ACK or NACK (in server serials) as outcomes of client serials.

        As the SDKs read it, a reply also settles every earlier serial still pending, with
        the same outcome: Sockudo drops ACKs when its control queue overflows, and a client
        talking to it directly would not notice a lost ACK followed by a later one.
        """
        start, count = int(message.get("msgSerial") or 0), int(message.get("count") or 1)
        results = message.get("res") or []
        ack = message.get("action") == ACK
        for upstream in sorted(u for u in self._client_of if u < start + count):
            client = self._client_of.pop(upstream)
            i = upstream - start
            if ack:
                result = results[i] if 0 <= i < len(results) else None
                self.resolve(client, Outcome(True, result=result))
            else:
                self.resolve(client, Outcome(False, error=message.get("error")))

    def ready(self) -> list[ProtocolMessage]:
        """ACK/NACK messages for the serials settled in order, runs of one kind merged."""
        replies: list[ProtocolMessage] = []
        while self._order and self._waiting.get(self._order[0]) is not None:
            serial = heapq.heappop(self._order)
            outcome = self._waiting.pop(serial)
            assert outcome is not None
            last = replies[-1] if replies else None
            if last is not None and _extends(last, serial, outcome):
                last["count"] += 1
                if outcome.ack:
                    last["res"].append(outcome.result)
            else:
                replies.append(_reply(serial, outcome))
        for reply in replies:
            if reply["action"] == ACK and not any(reply["res"]):
                del reply["res"]  # the server sent none
        return replies

    def _expect(self, serial: int) -> None:
        if serial not in self._waiting:
            heapq.heappush(self._order, serial)
        self._waiting[serial] = None  # a resend is decided afresh: forget a stale outcome

    def _forget_old(self) -> None:
        if len(self._upstream_of) > 2 * _KEEP_FORWARDED:
            newest = sorted(self._upstream_of)[-_KEEP_FORWARDED:]
            self._upstream_of = {s: self._upstream_of[s] for s in newest}


def _reply(serial: int, outcome: Outcome) -> ProtocolMessage:
    if outcome.ack:
        return {"action": ACK, "msgSerial": serial, "count": 1, "res": [outcome.result]}
    return {"action": NACK, "msgSerial": serial, "count": 1, "error": outcome.error}


def _extends(reply: ProtocolMessage, serial: int, outcome: Outcome) -> bool:
    if reply["msgSerial"] + reply["count"] != serial:
        return False
    if outcome.ack:
        return bool(reply["action"] == ACK)
    return reply["action"] == NACK and reply["error"] == outcome.error
