"""The queue seam: what the runtime needs from a job queue, whatever stores it.

`RedisStreamsQueue` is the one implementation; tests and the runtime use this interface.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.jobs import Job


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"  # waiting out its backoff in the delayed set
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    DEAD = "dead"  # failed its last attempt, or can never run: in the dead-letter stream


@dataclass(frozen=True)
class Delivery:
    """One job handed to this worker: a parsed job, or a raw payload that failed to parse."""

    entry_id: str
    job_id: str
    attempt: int
    job: Job | None = None
    error: str | None = None  # why `job` is None: the reason it goes to the dead letters
    response_serial: str | None = None  # the channel message an earlier attempt opened
    reclaimed: bool = False  # taken back from a worker whose heartbeat expired


@dataclass(frozen=True)
class QueueStats:
    waiting: int  # in the stream, not yet delivered to any worker
    pending: int  # delivered, not yet acknowledged (running, or held by a dead worker)
    delayed: int  # retries waiting out their backoff
    dead: int  # in the dead-letter stream
    workers: list[dict[str, Any]] = field(default_factory=list)  # live, with heartbeat info
    oldest_waiting_age_s: float | None = None  # lag: how long the oldest waiting job has waited


class Queue(Protocol):
    """What the runtime and the runner need from a job queue.

    The transitions that end or hand back a job (`complete`, `retry`, `dead_letter`,
    `requeue_interrupted`), and the writes a running job makes to its record
    (`set_response_serial`, `record_progress`), are fenced: each is one atomic step
    that first checks the job is still this consumer's at the delivery's entry and
    attempt, and returns False, changing nothing, when it is not.
    """

    max_attempts: int
    heartbeat_ttl_s: int
    consumer: str

    async def ensure_group(self) -> None: ...
    async def enqueue(self, job: Job) -> bool: ...
    async def take(self, count: int, block_ms: int) -> list[Delivery]: ...
    async def owns(self, delivery: Delivery) -> bool: ...
    async def set_response_serial(self, delivery: Delivery, serial: str) -> bool: ...
    # The background model response whose text the message holds (None: forget it), up to
    # its event `sequence`, `chars` characters: the record's `model_response_id`, ...
    async def record_progress(
        self, delivery: Delivery, model_response_id: str | None, sequence: int = -1, chars: int = 0
    ) -> bool: ...
    async def complete(
        self,
        delivery: Delivery,
        state: JobState = JobState.COMPLETED,
        figures: dict[str, Any] | None = None,
    ) -> bool: ...
    async def retry(self, delivery: Delivery, error: str) -> bool: ...
    async def dead_letter(self, delivery: Delivery, error: str) -> bool: ...
    async def requeue_interrupted(self, delivery: Delivery) -> bool: ...
    async def heartbeat(self, info: dict[str, Any]) -> None: ...
    async def leave(self) -> None: ...
    async def reclaim(self, count: int = 100) -> list[Delivery]: ...
    async def orphans(self, running: set[str], count: int = 100) -> list[Delivery]: ...
    async def cancel(self, job_id: str) -> str: ...
    async def cancel_requested(self, job_ids: list[str]) -> set[str]: ...
    async def promote_due(self) -> int: ...
    async def stats(self) -> QueueStats: ...
    async def live_workers(self) -> list[dict[str, Any]]: ...
    async def status(self, job_id: str) -> dict[str, str] | None: ...
