"""The few parts of Ably's realtime protocol the proxy reads and writes.

Frames are JSON text or MessagePack binary, chosen per connection by the `format` query
parameter (JSON when absent, as in Ably). Only what the proxy needs is named here.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

# ProtocolMessage actions
ACK = 1
NACK = 2
CONNECTED = 4
MESSAGE = 15

# Message action of `append_message`
MESSAGE_APPEND = 5

RATE_LIMIT_CODE = 42911
RATE_LIMIT_STATUS = 429

ProtocolMessage = dict[str, Any]
Frame = str | bytes


def decode(frame: Frame) -> ProtocolMessage | None:
    """The protocol message in a frame, or None if it is not one (never raises)."""
    try:
        value = json.loads(frame) if isinstance(frame, str) else msgpack.unpackb(frame, raw=False)
    except (ValueError, msgpack.UnpackException):
        return None
    return value if isinstance(value, dict) else None


def encode(message: ProtocolMessage, binary: bool) -> Frame:
    """A frame in the connection's format: MessagePack bytes, or a JSON text."""
    if binary:
        return bytes(msgpack.packb(message, use_bin_type=True))
    return json.dumps(message, separators=(",", ":"))


def rate_limit_nack(msg_serial: int, count: int = 1) -> ProtocolMessage:
    """What Ably sends when a publish would exceed a rate limit."""
    return {
        "action": NACK,
        "msgSerial": msg_serial,
        "count": count,
        "error": {
            "code": RATE_LIMIT_CODE,
            "statusCode": RATE_LIMIT_STATUS,
            "message": "Rate limit exceeded; request rejected (fault proxy: 50 messages/s "
            "per connection and per channel)",
        },
    }
