"""Sessions in Redis: who holds each one (a lease with a TTL, renewed like a job's
heartbeat), its checkpoint, and the conversation's state (the active answer, the prompts
waiting behind it, the model's last response id). Keys: `worker.sessions.keys`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from worker.queue.redis_streams import now_ms
from worker.sessions.keys import lease_key, open_session, session_key, sessions_key

# Renew the lease only if it is still ours; 1 if renewed, 0 if lost.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Waiting:
    """A prompt accepted from the channel, waiting for the answer before it to end."""

    job: dict[str, Any]  # the job's fields, as it will be enqueued

    def to_json(self) -> str:
        return json.dumps(self.job)


@dataclass
class SessionState:
    opened_at: int
    checkpoint_serial: str | None = None
    checkpoint_at: int | None = None
    last_response_id: str | None = None
    active: str | None = None  # the job answering now (one at a time per conversation)
    waiting: list[dict[str, Any]] = field(default_factory=list)


class SessionStore:
    def __init__(self, redis: Any, prefix: str, consumer: str, lease_ttl_s: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.consumer = consumer
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    # -- which sessions, and who holds them --------------------------------------------

    async def open(self, channel: str, at_ms: int | None = None) -> None:
        """Serve this channel from now on (a fixed `LISTEN_CHANNELS` one, or a job's)."""
        await open_session(self.redis, self.prefix, channel, at_ms or now_ms())

    async def touch(self, channel: str) -> None:
        await self.redis.zadd(sessions_key(self.prefix), {channel: now_ms()}, gt=True)

    async def active_since(self, since_ms: int) -> list[str]:
        """Channels with activity since `since_ms` (the others are idle)."""
        return list(await self.redis.zrangebyscore(sessions_key(self.prefix), since_ms, "+inf"))

    async def acquire(self, channel: str) -> bool:
        """Take the session if nobody holds it (or we do already)."""
        key = lease_key(self.prefix, channel)
        if await self.redis.set(key, self.consumer, nx=True, px=self.lease_ttl_ms):
            return True
        return bool(await self._renew(keys=[key], args=[self.consumer, self.lease_ttl_ms]))

    async def renew(self, channels: list[str]) -> set[str]:
        """Renew our leases; returns the channels whose lease is no longer ours."""
        lost = set()
        for channel in channels:
            key = lease_key(self.prefix, channel)
            if not await self._renew(keys=[key], args=[self.consumer, self.lease_ttl_ms]):
                lost.add(channel)
        return lost

    async def release(self, channel: str) -> None:
        await self._release(keys=[lease_key(self.prefix, channel)], args=[self.consumer])

    async def holder(self, channel: str) -> str | None:
        value = await self.redis.get(lease_key(self.prefix, channel))
        return str(value) if value else None

    async def listing(self) -> list[dict[str, Any]]:
        """Every known session with its last activity and holder (`worker status`)."""
        rows = await self.redis.zrange(sessions_key(self.prefix), 0, -1, withscores=True)
        return [
            {"channel": channel, "last_activity_ms": int(score),
             "holder": await self.holder(channel)}
            for channel, score in rows
        ]  # fmt: skip

    async def forget(self, channel: str) -> None:
        """An idle session: no longer served (its checkpoint is kept for a later one)."""
        await self.redis.zrem(sessions_key(self.prefix), channel)

    # -- one session's state -----------------------------------------------------------

    async def state(self, channel: str) -> SessionState:
        raw = await self.redis.hgetall(session_key(self.prefix, channel))
        if "opened_at" not in raw:
            await self.open(channel)
            raw = await self.redis.hgetall(session_key(self.prefix, channel))
        return SessionState(
            opened_at=int(raw["opened_at"]),
            checkpoint_serial=raw.get("checkpoint_serial") or None,
            checkpoint_at=int(raw["checkpoint_at"]) if raw.get("checkpoint_at") else None,
            last_response_id=raw.get("last_response_id") or None,
            active=raw.get("active") or None,
            waiting=json.loads(raw.get("waiting") or "[]"),
        )

    async def save(self, channel: str, **fields: Any) -> None:
        """Write session fields (None deletes one; lists are stored as JSON)."""
        key = session_key(self.prefix, channel)
        values = {
            name: json.dumps(value) if isinstance(value, list) else value
            for name, value in fields.items()
            if value is not None
        }
        gone = [name for name, value in fields.items() if value is None]
        async with self.redis.pipeline(transaction=True) as tx:
            if values:
                tx.hset(key, mapping=values)
            if gone:
                tx.hdel(key, *gone)
            await tx.execute()
