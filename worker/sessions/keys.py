"""Where sessions live in Redis (the queue's scripts open sessions too, so both use these).

- `P:sessions` (sorted set): channels by last activity in ms (a prompt, a job enqueued,
  taken or finished);
- `P:session:{channel}` (hash): `opened_at`, the checkpoint (`checkpoint_serial`,
  `checkpoint_at`), `last_response_id`, the `active` job and the prompts `waiting`;
- `P:session:{channel}:lease` (string): the consumer that holds the session, with a TTL.
"""

from __future__ import annotations

from typing import Any


def sessions_key(prefix: str) -> str:
    return f"{prefix}:sessions"


def session_key(prefix: str, channel: str) -> str:
    return f"{prefix}:session:{channel}"


def lease_key(prefix: str, channel: str) -> str:
    return f"{prefix}:session:{channel}:lease"


# Lua: open (or touch) the session of channel ARGV[a] at time ARGV[b], given KEYS for the
# sorted set and the prefix. Used inside the queue's enqueue and take scripts.
OPEN_SESSION_LUA = """
local function open_session(sessions, prefix, channel, at)
  if not channel or channel == '' then return end
  redis.call('ZADD', sessions, 'GT', at, channel)
  redis.call('HSETNX', prefix .. ':session:' .. channel, 'opened_at', at)
end
"""


async def open_session(redis: Any, prefix: str, channel: str, at_ms: int) -> None:
    """Mark the channel's session active at `at_ms`, opening it then if it is new (the
    queue does this for every job's channel; sessions for `LISTEN_CHANNELS`)."""
    async with redis.pipeline(transaction=True) as tx:
        tx.zadd(sessions_key(prefix), {channel: at_ms}, gt=True)
        tx.hsetnx(session_key(prefix, channel), "opened_at", at_ms)
        await tx.execute()
