"""The job queue on Redis Streams: one consumer group, at-least-once.

Keys, under a prefix (default `aitw`):

| key | type | holds |
| --- | --- | --- |
| `P:jobs` | stream | waiting and in-flight jobs, field `job` = the job's JSON; group `workers` |
| `P:job:{id}` | hash | the job record: state, attempts, entry, response_serial, timings, error |
| `P:delayed` | sorted set | job ids waiting out a retry backoff, scored by due time (ms) |
| `P:dead` | stream | dead-lettered jobs: `job_id`, `job`, `error`, `attempts`, `worker` |
| `P:worker:{consumer}` | string | a live worker's heartbeat (JSON), with a TTL |
| `P:workers` | sorted set | consumers by last heartbeat (ms), for `status` |

A job is acknowledged (and its entry deleted) only when the runtime says it is finished.
An unacknowledged entry goes to another worker only once its owner's heartbeat key has
expired (`reclaim`), so a slow but live worker keeps its jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import NEVER_DECODE
from redis.exceptions import ResponseError

from worker.jobs import Job, JobError, default_limits, parse_job, valid_channel, valid_job_id
from worker.logs import get_logger
from worker.queue.base import Delivery, JobState, QueueStats
from worker.queue.batch import ScriptBatch
from worker.sessions.keys import OPEN_SESSION_LUA, sessions_key

GROUP = "workers"

log = get_logger("worker.queue")

# KEYS[3] the sessions sorted set, ARGV[5] the prefix: the job's channel becomes (or stays)
# a session the worker listens on, opened no later than this enqueue.
_ENQUEUE = (
    OPEN_SESSION_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, 'channel', ARGV[2],
           'enqueued_at', ARGV[3], 'entry', entry, 'payload', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
open_session(KEYS[3], ARGV[5], ARGV[2], ARGV[3])
return 1
"""
)

# Returns {attempts, response_serial} for a job this worker may run, {-1} for a second
# entry of a job that already has one (a duplicate enqueue), {-2} for a finished job.
# KEYS[2] the sessions sorted set, ARGV[7] the prefix, ARGV[8] the job's channel ('' when
# the job cannot run), ARGV[9] the entry's time: a job taken keeps its session active
# (jobs added with a raw XADD open theirs here). One round trip per job taken.
_TAKE = (
    OPEN_SESSION_LUA
    + """
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry and entry ~= ARGV[1] then return {-1, ''} end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'completed' or state == 'dead' or state == 'cancelled' then return {-2, ''} end
if not entry then
  redis.call('HSET', KEYS[1], 'payload', ARGV[4], 'channel', ARGV[5], 'enqueued_at', ARGV[3],
             'entry', ARGV[1])
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2], 'started_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
open_session(KEYS[2], ARGV[7], ARGV[8], ARGV[9])
return {attempts, redis.call('HGET', KEYS[1], 'response_serial') or ''}
"""
)

# Moves due retries from the delayed set back into the stream.
_PROMOTE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local record = ARGV[2] .. id
  local payload = redis.call('HGET', record, 'payload')
  -- Only a job still waiting out its backoff: a finished record never moves back.
  if payload and redis.call('HGET', record, 'state') == 'retrying' then
    local entry = redis.call('XADD', KEYS[2], '*', 'job', payload)
    redis.call('HSET', record, 'state', 'queued', 'entry', entry)
  end
end
return #ids
"""

# Fencing: every transition that ends or hands back a job first checks, in the same
# atomic step, that the job is still this consumer's at this entry and attempt: the entry
# is pending under this consumer (XCLAIM by a reclaimer moves it) and the record still
# says `running` at this entry and attempt. A stale owner's transition changes nothing
# and returns 0. KEYS[1] record, KEYS[2] stream; ARGV[1] group, ARGV[2] entry,
# ARGV[3] consumer, ARGV[4] attempt; the script's own arguments follow from ARGV[5].
_OWNED = """
local function owned()
  local p = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[2], ARGV[2], 1)
  if #p == 0 or p[1][2] ~= ARGV[3] then return false end
  local r = redis.call('HMGET', KEYS[1], 'entry', 'attempts', 'state')
  return r[1] == ARGV[2] and tonumber(r[2]) == tonumber(ARGV[4]) and r[3] == 'running'
end
local function done_with_entry()
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
end
"""

_OWNS = _OWNED + "return owned() and 1 or 0"

# ARGV[5] response serial.
_SET_SERIAL = (
    _OWNED
    + """
if not owned() then return 0 end
redis.call('HSET', KEYS[1], 'response_serial', ARGV[5])
return 1
"""
)

# The background model response the channel message holds the text of, for a later
# attempt to continue (not a transition: the job stays running). ARGV[5] its id ('' forgets
# it), ARGV[6] the sequence number of its last event whose text the message holds
# (acknowledged by Ably), ARGV[7] the length of the message's text up to there.
_PROGRESS = (
    _OWNED
    + """
if not owned() then return 0 end
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[1], 'model_response_id', 'model_sequence', 'model_chars')
else
  redis.call('HSET', KEYS[1], 'model_response_id', ARGV[5], 'model_sequence', ARGV[6],
             'model_chars', ARGV[7])
end
return 1
"""
)

# ARGV[5] final state, ARGV[6] finished_at, ARGV[7..] field, value pairs (the figures).
# KEYS[3] sessions; ARGV[7] prefix, ARGV[8] the job's channel ('' for none): an answer
# is activity, so its session stays active (in the same step, no second round trip).
_COMPLETE = (
    OPEN_SESSION_LUA
    + _OWNED
    + """
if not owned() then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'finished_at', ARGV[6])
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
done_with_entry()
open_session(KEYS[3], ARGV[7], ARGV[8], ARGV[6])
return 1
"""
)

# KEYS[3] delayed set; ARGV[5] job id, ARGV[6] due (ms), ARGV[7] error.
_RETRY = (
    _OWNED
    + """
if not owned() then return 0 end
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
redis.call('HSET', KEYS[1], 'state', 'retrying', 'error', ARGV[7], 'next_attempt_at', ARGV[6])
done_with_entry()
return 1
"""
)

# KEYS[3] dead stream; ARGV[5] job id, ARGV[6] error, ARGV[7] now (ms).
_DEAD_LETTER = (
    _OWNED
    + """
if not owned() then return 0 end
local payload = redis.call('HGET', KEYS[1], 'payload') or ''
redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[5], 'job', payload, 'error', ARGV[6],
           'attempts', ARGV[4], 'worker', ARGV[3], 'failed_at', ARGV[7])
redis.call('HSET', KEYS[1], 'state', 'dead', 'error', ARGV[6], 'finished_at', ARGV[7])
done_with_entry()
return 1
"""
)

# Puts an interrupted job back at the end of the stream without spending an attempt.
_REQUEUE = (
    _OWNED
    + """
if not owned() then return 0 end
local payload = redis.call('HGET', KEYS[1], 'payload') or ''
local entry = redis.call('XADD', KEYS[2], '*', 'job', payload)
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry', entry)
done_with_entry()
return 1
"""
)


# A user's cancel. KEYS[1] record, KEYS[2] delayed set; ARGV[1] job id, ARGV[2] now.
# A job not yet running is cancelled for good (its entry, if taken, is dropped at take);
# a running one is flagged, and the runtime running it stops it. Returns the outcome.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown' end
if state == 'queued' or state == 'retrying' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[2])
  return 'running'
end
return state
"""


# Puts a dead-lettered job back: a fresh record (attempts from zero) and a new entry.
_RETRY_DEAD = """
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, 'entry', entry, 'payload', ARGV[1],
           'enqueued_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[2])
return entry
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with "equal jitter": between half and all of base * 2^(n-1)."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class _Taking:
    """A stream entry on its way to a delivery: parsed, its take script's input ready."""

    entry_id: str
    job_id: str
    job: Job | None
    error: str | None
    reclaimed: bool
    keys: list[str]
    args: list[str | int]


class RedisStreamsQueue:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "aitw",
        consumer: str = "worker",
        max_attempts: int = 3,
        heartbeat_ttl_s: int = 30,
        claim_min_idle_ms: int = 2_000,
        record_ttl_s: int = 7 * 86_400,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
    ) -> None:
        # Any: redis-py types replies as bytes | str; this client decodes them to str.
        self.redis: Any = redis
        self.prefix = prefix
        self.consumer = consumer
        self.max_attempts = max_attempts
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.claim_min_idle_ms = claim_min_idle_ms
        self.record_ttl_s = record_ttl_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stream = f"{prefix}:jobs"
        self.dead = f"{prefix}:dead"
        self.delayed = f"{prefix}:delayed"
        self.workers = f"{prefix}:workers"
        self._enqueue = redis.register_script(_ENQUEUE)
        self._take = redis.register_script(_TAKE)
        self._batch = ScriptBatch(redis)  # a moment's fenced calls and takes: one round trip
        self._promote = redis.register_script(_PROMOTE)
        self._owns = redis.register_script(_OWNS)
        self._set_serial = redis.register_script(_SET_SERIAL)
        self._progress = redis.register_script(_PROGRESS)
        self._complete = redis.register_script(_COMPLETE)
        self._retry = redis.register_script(_RETRY)
        self._dead_letter = redis.register_script(_DEAD_LETTER)
        self._requeue = redis.register_script(_REQUEUE)
        self._retry_dead = redis.register_script(_RETRY_DEAD)
        self._cancel = redis.register_script(_CANCEL)

    def record_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def worker_key(self, consumer: str) -> str:
        return f"{self.prefix}:worker:{consumer}"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- producing --------------------------------------------------------------------

    async def enqueue(self, job: Job) -> bool:
        """Add a job; False if a job with this id exists already (then nothing changes)."""
        keys = [self.record_key(job.id), self.stream, sessions_key(self.prefix)]
        args: list[str | int] = [
            job.to_json(),
            job.channel,
            now_ms(),
            self.record_ttl_s,
            self.prefix,
        ]
        # Through the batch: a producer's burst (enqueues gathered) costs one round trip.
        return bool(await self._batch(self._enqueue, keys, args))

    # -- consuming --------------------------------------------------------------------

    async def take(self, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` new jobs for this consumer, waiting up to `block_ms` for one."""
        if count <= 0:
            return []
        # As bytes: one entry that is not UTF-8 must not fail the read of the others.
        reply = await self.redis.execute_command(
            "XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", count, "BLOCK", block_ms,
            "STREAMS", self.stream, ">", **{NEVER_DECODE: True},
        )  # fmt: skip
        entries = reply[0][1] if reply else []
        return await self._accept_all(entries, reclaimed=False)

    async def reclaim(self, count: int = 100) -> list[Delivery]:
        """Take over (up to `count`) unacknowledged jobs of workers whose heartbeat expired."""
        pending = await self.redis.xpending_range(
            self.stream, GROUP, min="-", max="+", count=100, idle=self.claim_min_idle_ms
        )
        owners = {p["consumer"] for p in pending if p["consumer"] != self.consumer}
        dead = {c for c in owners if not await self.redis.exists(self.worker_key(c))}
        ids = [p["message_id"] for p in pending if p["consumer"] in dead][:count]
        if not ids:
            return []
        entries = await self._claim(ids)
        return await self._accept_all(entries, reclaimed=True)

    async def orphans(self, running: set[str], count: int = 100) -> list[Delivery]:
        """This worker's own unacknowledged entries that no task is running any more.

        They arise when a job's task could not reach Redis to finish it, or when a take was
        cancelled by a shutdown just as Redis delivered; nobody else would take them back
        while this worker's heartbeat lives.
        """
        mine = await self.redis.xpending_range(
            self.stream, GROUP, min="-", max="+", count=count + len(running),
            consumername=self.consumer, idle=self.claim_min_idle_ms,
        )  # fmt: skip
        ids = [p["message_id"] for p in mine if p["message_id"] not in running][:count]
        if not ids:
            return []
        # XCLAIM to ourselves resets the idle time, so one orphan is not taken twice.
        entries = await self._claim(ids)
        return await self._accept_all(entries, reclaimed=True)

    async def _claim(self, ids: list[str]) -> list[Any]:
        """XCLAIM these entries to this consumer (resetting their idle time), as bytes."""
        command = ("XCLAIM", self.stream, GROUP, self.consumer, self.claim_min_idle_ms, *ids)
        return list(await self.redis.execute_command(*command, **{NEVER_DECODE: True}))

    async def _accept_all(self, entries: list[Any], *, reclaimed: bool) -> list[Delivery]:
        """Entries as read (bytes) into deliveries; a job that cannot run is one too.

        Every entry's take script goes in one pipeline (`ScriptBatch`): one round trip for
        a take of 256 jobs, where one call each (even side by side) kept the first job
        waiting for the last one's (about 140 ms of the event loop at 256)."""
        taking = [
            self._taking(_text(raw_id)[0], raw_fields, reclaimed)
            for raw_id, raw_fields in entries
            if raw_fields is not None
        ]
        deleted = [_text(raw_id)[0] for raw_id, raw_fields in entries if raw_fields is None]
        replies = await asyncio.gather(*(self._batch(self._take, t.keys, t.args) for t in taking))
        accepted = [self._accepted(t, reply) for t, reply in zip(taking, replies, strict=True)]
        # Deleted while pending, a duplicate entry, a job already finished: nothing to run.
        dropped = [t.entry_id for t, d in zip(taking, accepted, strict=True) if d is None]
        for entry_id in deleted + dropped:
            await self._ack(entry_id)
        return [delivery for delivery in accepted if delivery is not None]

    def _taking(self, entry_id: str, raw_fields: dict[Any, Any], reclaimed: bool) -> _Taking:
        """The entry parsed, and its take script's keys and arguments."""
        fields = {_text(k)[0]: v for k, v in raw_fields.items()}
        payload, not_utf8 = _text(fields.get("job") or b"")
        job: Job | None = None
        error: str | None = None
        if "job" not in fields:
            error = "the stream entry has no `job` field"
        elif not_utf8 is not None:
            # Kept with U+FFFD in place of what is not text; the reason says where.
            error = f"job is not valid UTF-8: {not_utf8}"
        else:
            job, error = _parse(payload, entry_id)
        job_id = job.id if job else _raw_id(payload, entry_id)
        # A job that cannot run but names a valid channel: its user is told there.
        channel = job.channel if job else _raw_channel(payload)
        stored = job.to_json() if job else payload  # with its id, so a retry keeps it
        now, ttl = now_ms(), self.record_ttl_s
        session = job.channel if job is not None else ""
        args: list[str | int] = [entry_id, self.consumer, now, stored, channel, ttl,
                                 self.prefix, session, int(entry_id.split("-")[0])]  # fmt: skip
        keys = [self.record_key(job_id), sessions_key(self.prefix)]
        return _Taking(entry_id, job_id, job, error, reclaimed, keys, args)

    def _accepted(self, take: _Taking, reply: list[Any]) -> Delivery | None:
        attempts, serial = reply
        if int(attempts) < 0:  # duplicate entry, or a job already finished
            return None
        delivery = Delivery(
            entry_id=take.entry_id, job_id=take.job_id, attempt=int(attempts), job=take.job,
            error=take.error, response_serial=serial or None, reclaimed=take.reclaimed,
        )  # fmt: skip
        if take.job is not None and delivery.attempt > self.max_attempts:
            # Every attempt so far ended with its worker gone: a job that kills workers.
            reason = f"gave up after {self.max_attempts} attempts whose workers stopped mid-job"
            return dataclasses.replace(delivery, job=None, error=reason)
        return delivery

    # -- fenced transitions -------------------------------------------------------------
    # Each returns True when applied, False when refused because the job is no longer this
    # consumer's at this entry and attempt (reclaimed by another worker, or finished).

    async def _fenced(
        self, script: Any, delivery: Delivery, *args: str | int, keys: tuple[str, ...] = ()
    ) -> bool:
        fence: list[str | int] = [GROUP, delivery.entry_id, self.consumer, delivery.attempt]
        record = self.record_key(delivery.job_id)
        return bool(await self._batch(script, [record, self.stream, *keys], [*fence, *args]))

    async def owns(self, delivery: Delivery) -> bool:
        """Is this job still ours (checked before a message is closed)?"""
        return await self._fenced(self._owns, delivery)

    async def set_response_serial(self, delivery: Delivery, serial: str) -> bool:
        return await self._fenced(self._set_serial, delivery, serial)

    async def record_progress(
        self,
        delivery: Delivery,
        model_response_id: str | None,
        sequence: int = -1,
        chars: int = 0,
    ) -> bool:
        """Record (None: forget) the background model response whose text the channel
        message holds, up to event `sequence` and `chars` characters of text."""
        return await self._fenced(
            self._progress, delivery, model_response_id or "", sequence, chars
        )

    async def complete(
        self,
        delivery: Delivery,
        state: JobState = JobState.COMPLETED,
        figures: dict[str, Any] | None = None,
    ) -> bool:
        """Finish the job (completed or cancelled) and record its figures, in one step."""
        pairs: list[str | int] = []
        for name, value in (figures or {}).items():
            if value is not None:
                pairs += [name, value if isinstance(value, str) else json.dumps(value)]
        channel = delivery.job.channel if delivery.job is not None else ""
        return await self._fenced(
            self._complete, delivery, str(state), now_ms(), self.prefix, channel, *pairs,
            keys=(sessions_key(self.prefix),),
        )  # fmt: skip

    async def retry(self, delivery: Delivery, error: str) -> bool:
        """Schedule the next attempt after a backoff (the runner decided it is not the last)."""
        delay = backoff_seconds(delivery.attempt, self.backoff_base_s, self.backoff_cap_s)
        due = now_ms() + int(delay * 1000)
        return await self._fenced(
            self._retry, delivery, delivery.job_id, due, error, keys=(self.delayed,)
        )

    async def dead_letter(self, delivery: Delivery, error: str) -> bool:
        return await self._fenced(
            self._dead_letter, delivery, delivery.job_id, error, now_ms(), keys=(self.dead,)
        )

    async def requeue_interrupted(self, delivery: Delivery) -> bool:
        """Give a job this worker could not finish (shutdown) straight back to the queue."""
        return await self._fenced(self._requeue, delivery)

    async def cancel(self, job_id: str) -> str:
        """A user asked to stop this job: `cancelled` (it was not running: it never
        will), `running` (flagged: its worker stops it), or its finished state."""
        keys = [self.record_key(job_id), self.delayed]
        return str(await self._cancel(keys=keys, args=[job_id, now_ms()]))

    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        """Which of these running jobs a user has asked to stop (`cancel`)."""
        if not job_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.record_key(job_id), "cancel_requested")
            flags = await pipe.execute()
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag}

    async def promote_due(self) -> int:
        """Move retries whose backoff has passed back into the stream; returns how many."""
        prefix = f"{self.prefix}:job:"
        return int(await self._promote(keys=[self.delayed, self.stream], args=[now_ms(), prefix]))

    async def _ack(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as tx:
            tx.xack(self.stream, GROUP, entry_id)
            tx.xdel(self.stream, entry_id)
            await tx.execute()

    # -- liveness ---------------------------------------------------------------------

    async def heartbeat(self, info: dict[str, Any]) -> None:
        """Say this worker is alive; its jobs stay its own while this key lives."""
        body = json.dumps({**info, "consumer": self.consumer, "at": now_ms()})
        async with self.redis.pipeline(transaction=True) as tx:
            tx.set(self.worker_key(self.consumer), body, ex=self.heartbeat_ttl_s)
            tx.zadd(self.workers, {self.consumer: now_ms()})
            await tx.execute()

    async def leave(self) -> None:
        """Forget this worker: its remaining unacknowledged jobs are free to reclaim now."""
        async with self.redis.pipeline(transaction=True) as tx:
            tx.delete(self.worker_key(self.consumer))
            tx.zrem(self.workers, self.consumer)
            await tx.execute()
        mine = await self.redis.xpending_range(
            self.stream, GROUP, min="-", max="+", count=1, consumername=self.consumer
        )
        if not mine:
            await self.redis.xgroup_delconsumer(self.stream, GROUP, self.consumer)

    # -- reading ----------------------------------------------------------------------

    async def stats(self) -> QueueStats:
        await self.ensure_group()
        group = next(g for g in await self.redis.xinfo_groups(self.stream) if g["name"] == GROUP)
        pending = int(group["pending"])
        lag = group.get("lag")
        waiting = (
            int(lag) if lag is not None else max(0, await self.redis.xlen(self.stream) - pending)
        )
        return QueueStats(
            waiting=waiting,
            pending=pending,
            delayed=int(await self.redis.zcard(self.delayed)),
            dead=int(await self.redis.xlen(self.dead)),
            workers=await self.live_workers(),
            oldest_waiting_age_s=await self._oldest_waiting_age(group["last-delivered-id"]),
        )

    async def live_workers(self) -> list[dict[str, Any]]:
        since = now_ms() - self.heartbeat_ttl_s * 1000
        consumers = await self.redis.zrangebyscore(self.workers, since, "+inf")
        bodies = [await self.redis.get(self.worker_key(c)) for c in consumers]
        return [json.loads(b) for b in bodies if b]

    async def _oldest_waiting_age(self, last_delivered: str) -> float | None:
        after = await self.redis.xrange(self.stream, min=f"({last_delivered}", count=1)
        if not after:
            return None
        return max(0.0, (now_ms() - int(after[0][0].split("-")[0])) / 1000)

    async def status(self, job_id: str) -> dict[str, str] | None:
        record = await self.redis.hgetall(self.record_key(job_id))
        return dict(record) if record else None

    # -- dead letters -----------------------------------------------------------------

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        return [{"entry_id": i, **f} for i, f in await self.redis.xrange(self.dead, count=count)]

    async def retry_dead(self, entry_ids: list[str] | None = None) -> int:
        """Put dead-lettered jobs back in the queue with fresh attempts; returns how many."""
        letters = await self.dead_letters(count=10_000)
        chosen = [d for d in letters if entry_ids is None or d["entry_id"] in entry_ids]
        for letter in chosen:
            keys = [self.record_key(letter["job_id"]), self.stream, self.dead]
            args: list[str | int] = [letter["job"], letter["entry_id"], now_ms(), self.record_ttl_s]
            await self._retry_dead(keys=keys, args=args)
        return len(chosen)

    async def purge_dead(self) -> int:
        count = int(await self.redis.xlen(self.dead))
        await self.redis.delete(self.dead)
        return count


def _text(value: bytes | str) -> tuple[str, str | None]:
    """A value as read: its text, and where it is not UTF-8 (None when it is)."""
    if isinstance(value, str):
        return value, None
    try:
        return value.decode(), None
    except UnicodeDecodeError as exc:
        where = f"byte 0x{value[exc.start]:02x} at position {exc.start}"
        return value.decode(errors="replace"), where


def _parse(payload: str, entry_id: str) -> tuple[Job | None, str | None]:
    """Parse a stream payload; a job enqueued without an id gets one from its entry.
    Never raises: whatever the payload, the answer is a job or a reason."""
    try:
        data = _object(payload)
        if isinstance(data, dict) and "id" not in data:
            data = {**data, "id": f"x{entry_id}"}
        return parse_job(data if isinstance(data, dict) else payload), None
    except JobError as exc:
        return None, str(exc)
    except Exception as exc:  # a bug guard: one payload must never stop the take
        log.exception("queue.parse_failed", entry_id=entry_id)
        return None, f"job could not be read ({type(exc).__name__})"


def _object(payload: str) -> Any:
    """The payload's JSON value if it can be read within the limits, else None (then
    `parse_job` words the error)."""
    if len(payload) > default_limits().payload_chars:
        return None
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


def _raw_id(payload: str, entry_id: str) -> str:
    """An id for a job that does not parse: its own if it is a valid id, else the entry's."""
    data = _object(payload)
    candidate = data.get("id") if isinstance(data, dict) else None
    if isinstance(candidate, str) and valid_job_id(candidate):
        return candidate
    return f"x{entry_id}"


def _raw_channel(payload: str) -> str:
    """The channel a job that does not parse names, if it is a valid one; else ''."""
    data = _object(payload)
    candidate = data.get("channel") if isinstance(data, dict) else None
    return candidate if isinstance(candidate, str) and valid_channel(candidate) else ""
