"""One job, start to finish: model stream in, channel message out, queue told the outcome.

Every way a job can end closes its channel message with a status and leaves the queue
consistent: complete (acknowledged), failed (retried with backoff, or dead-lettered after
the last attempt), cancelled by the user, or interrupted by shutdown (requeued without
spending an attempt). One summary line per job (`job.completed`, `job.failed`, ...)
carries the figures.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from worker.jobs import Job, Pattern
from worker.logs import get_logger
from worker.model import Done, Failed, Model, TextDelta
from worker.queue import Delivery, JobState, Queue
from worker.transport.contract import Headers, Status
from worker.transport.pool import Lease
from worker.transport.response_stream import ResponseStream
from worker.transport.token_stream import TokenStream

log = get_logger("worker.job")


class StopReason(enum.Enum):
    USER_CANCEL = "cancel"  # a user published `cancel` for this response
    SHUTDOWN = "shutdown"  # the worker drains and this job cannot finish in time
    # The worker could not renew its heartbeat in time: another worker may have taken the
    # job already, so this one stops touching it (no close, no requeue) and the queue's
    # reclaim (or this worker's own orphan check) decides who finishes it.
    HEARTBEAT_LOST = "heartbeat_lost"


@dataclass
class JobControl:
    """How the runtime stops a running job: set `reason`, then cancel the job's task."""

    reason: StopReason | None = None
    finishing: bool = False  # the outcome is decided and being written: do not stop it now


@dataclass
class Figures:
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    output_tokens: int | None = None
    input_tokens: int | None = None

    def ttft_ms(self) -> int | None:
        return (
            None
            if self.first_token_at is None
            else round((self.first_token_at - self.started) * 1000)
        )

    def summary(self, stream: ResponseStream | TokenStream) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        tokens = self.output_tokens if self.output_tokens is not None else stream.deltas
        streaming_s = elapsed - ((self.first_token_at or self.started) - self.started)
        return {
            "ttft_ms": self.ttft_ms(),
            "duration_ms": round(elapsed * 1000),
            "output_tokens": tokens,
            "input_tokens": self.input_tokens,
            "tokens_per_s": round(tokens / streaming_s, 1) if streaming_s > 0 else None,
            "chars": len(stream.text),
            "deltas": stream.deltas,
            "appends": stream.appends,
        }


class JobRunner:
    def __init__(self, queue: Queue, model: Model, *, timeout_s: float) -> None:
        self.queue = queue
        self.model = model
        self.timeout_s = timeout_s

    async def run(
        self, delivery: Delivery, lease: Lease, control: JobControl | None = None
    ) -> JobState:
        """Run one delivery on the connection (and message budget) that `lease` lends it."""
        control = control or JobControl()
        if delivery.job is None:
            await self.queue.dead_letter(delivery, delivery.error or "invalid job")
            log.error("job.dead_lettered", reason=delivery.error, attempt=delivery.attempt)
            return JobState.DEAD
        job = delivery.job
        log.info("job.received", attempt=delivery.attempt, reclaimed=delivery.reclaimed,
                 pattern=str(job.pattern), model=self.model.model_for(job))  # fmt: skip
        headers = Headers(
            response_id=job.id, model=self.model.model_for(job), metadata=job.metadata
        )
        channel = lease.client.channels.get(job.channel)
        stream: ResponseStream | TokenStream = (
            TokenStream(channel, headers, delivery.attempt, lease)
            if job.pattern == Pattern.MESSAGE_PER_TOKEN
            else ResponseStream(channel, headers, lease)
        )
        figures = Figures()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._stream(delivery, job, stream, figures, control)
        except TimeoutError:
            return await self._fail(
                delivery, stream, figures, f"timed out after {self.timeout_s:g} s", True
            )
        except asyncio.CancelledError:
            if control.reason is None:
                raise  # not ours to absorb
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            return await self._stopped(delivery, stream, figures, control.reason)
        except Exception as exc:  # an Ably or Redis failure: retry the whole job
            log.exception("job.error", error=str(exc))
            return await self._fail(delivery, stream, figures, f"{type(exc).__name__}: {exc}", True)

    async def _stopped(
        self,
        delivery: Delivery,
        stream: ResponseStream | TokenStream,
        figures: Figures,
        reason: StopReason,
    ) -> JobState:
        if reason is StopReason.HEARTBEAT_LOST:
            log.warning("job.abandoned", **figures.summary(stream))
            return JobState.RUNNING
        if reason is StopReason.USER_CANCEL:
            await self._close(stream, Status.CANCELLED)
            await self.queue.complete(delivery, JobState.CANCELLED)
            log.info("job.cancelled", **figures.summary(stream))
            return JobState.CANCELLED
        await self._close(stream, Status.INTERRUPTED, "worker shutting down; the job will resume")
        await self.queue.requeue_interrupted(delivery)
        log.warning("job.interrupted", **figures.summary(stream))
        return JobState.QUEUED

    async def _stream(
        self,
        delivery: Delivery,
        job: Job,
        stream: ResponseStream | TokenStream,
        figures: Figures,
        control: JobControl,
    ) -> JobState:
        serial = await stream.open(delivery.response_serial)
        if serial != delivery.response_serial:
            await self.queue.set_response_serial(job.id, serial)
        log.info("job.started", response_serial=serial, reopened=serial == delivery.response_serial)
        async for event in self.model.stream(job):
            if isinstance(event, TextDelta):
                if figures.first_token_at is None:
                    figures.first_token_at = time.monotonic()
                    log.info("job.first_token", ttft_ms=figures.ttft_ms())
                stream.append(event.text)
            elif isinstance(event, Done):
                control.finishing = True
                figures.output_tokens, figures.input_tokens = (
                    event.output_tokens,
                    event.input_tokens,
                )
                failed_appends = await stream.close(Status.COMPLETE)
                await self.queue.complete(delivery)
                summary = figures.summary(stream)
                await self.queue.record(
                    job.id, **{k: v for k, v in summary.items() if v is not None}
                )
                log.info("job.completed", failed_appends=failed_appends,
                         incomplete_reason=event.incomplete_reason, **summary)  # fmt: skip
                return JobState.COMPLETED
            elif isinstance(event, Failed):
                control.finishing = True
                return await self._fail(delivery, stream, figures, event.error, event.retryable)
        return await self._fail(
            delivery, stream, figures, "model stream ended without a result", True
        )

    async def _fail(
        self,
        delivery: Delivery,
        stream: ResponseStream | TokenStream,
        figures: Figures,
        error: str,
        retryable: bool,
    ) -> JobState:
        last = not retryable or delivery.attempt >= self.queue.max_attempts
        # A retry reopens this message: until then it says `interrupted`, not `failed`.
        await self._close(stream, Status.FAILED if last else Status.INTERRUPTED, error)
        if last:
            await self.queue.dead_letter(delivery, error)
            log.error(
                "job.dead_lettered",
                reason=error,
                attempt=delivery.attempt,
                **figures.summary(stream),
            )
            return JobState.DEAD
        state = await self.queue.retry_or_dead_letter(delivery, error)
        log.warning(
            "job.retry_scheduled", reason=error, attempt=delivery.attempt, **figures.summary(stream)
        )
        return state

    async def _close(
        self, stream: ResponseStream | TokenStream, status: Status, error: str | None = None
    ) -> None:
        """Close the channel message if one was opened; a failure here is logged, not raised."""
        if stream.serial is None:
            return
        try:
            await asyncio.shield(stream.close(status, error))  # bounded: see transport.acks
        except Exception as exc:
            log.warning("job.close_failed", status=str(status), error=str(exc))
