"""One job, start to finish: model stream in, channel message out, queue told the outcome.

A run has two halves. The attempt (`_attempt`) streams the model's answer into the
channel message and says how it ended (an `Ending`: answered, failed, stopped, found
finished by an earlier attempt, fenced), never raising. Then one function, `decide`,
turns that ending into the job's `Outcome`, and `_conclude` carries it out outside the
streaming code: close the message with its status, then one fenced queue transition
(complete, retry, dead-letter, requeue) that Redis refuses if the job is no longer this
worker's. One summary line per job (`job.completed`, `job.retry_scheduled`, ...) carries
the figures.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from worker.jobs import Job, Pattern
from worker.logs import get_logger
from worker.model import Done, Failed, Model, TextDelta
from worker.queue import Delivery, JobState, Queue
from worker.transport.contract import Headers, Status
from worker.transport.pool import Lease
from worker.transport.publisher import Abandoned, Alive, Publisher, always_alive
from worker.transport.response_stream import ResponseStream
from worker.transport.token_stream import TokenStream

log = get_logger("worker.job")


class StopReason(enum.Enum):
    USER_CANCEL = "cancel"  # a user published `cancel` for this response
    SHUTDOWN = "shutdown"  # the worker drains and this job cannot finish in time
    # The worker's lease lapsed (its heartbeat was not renewed in time): another worker
    # may have taken the job already, so this one stops touching it (no close, no
    # transition) and the fence, reclaim or the orphan check decide who finishes it.
    HEARTBEAT_LOST = "heartbeat_lost"


@dataclass
class JobControl:
    """How the runtime stops a running job: set `reason`, then cancel the job's task."""

    reason: StopReason | None = None
    finishing: bool = False  # the outcome is decided and being written: do not stop it now
    alive: Alive = always_alive  # False once this process's lease on its jobs may have lapsed


# -- how an attempt ended --------------------------------------------------------------


@dataclass(frozen=True)
class Answered:
    incomplete_reason: str | None = None


@dataclass(frozen=True)
class Failure:
    error: str
    retryable: bool = True


@dataclass(frozen=True)
class Stopped:
    reason: StopReason


@dataclass(frozen=True)
class FoundFinished:
    """An earlier attempt closed the message (the worker died before acknowledging)."""

    status: Status


@dataclass(frozen=True)
class Fenced:
    """The queue refused a transition: the job is another worker's now."""

    step: str


Ending = Answered | Failure | Stopped | FoundFinished | Fenced


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    RETRY = "retry"
    DEAD = "dead"
    INTERRUPTED = "interrupted"  # shutdown: requeued without spending an attempt
    ABANDONED = "abandoned"  # no longer ours: nothing written, nothing closed


def decide(ending: Ending, attempt: int, max_attempts: int) -> Outcome:
    """The one place that turns how an attempt ended into what becomes of the job."""
    match ending:
        case Answered():
            return Outcome.COMPLETED
        case FoundFinished(status=status):
            return Outcome.CANCELLED if status is Status.CANCELLED else Outcome.COMPLETED
        case Failure(retryable=retryable):
            last = not retryable or attempt >= max_attempts
            return Outcome.DEAD if last else Outcome.RETRY
        case Stopped(reason=StopReason.USER_CANCEL):
            return Outcome.CANCELLED
        case Stopped(reason=StopReason.SHUTDOWN):
            return Outcome.INTERRUPTED
    return Outcome.ABANDONED  # Stopped(HEARTBEAT_LOST), Fenced


# The status the channel message is closed with, per outcome (a retry reopens the same
# message, so until then it says `interrupted`, not `failed`).
CLOSING_STATUS = {
    Outcome.COMPLETED: Status.COMPLETE,
    Outcome.CANCELLED: Status.CANCELLED,
    Outcome.RETRY: Status.INTERRUPTED,
    Outcome.DEAD: Status.FAILED,
    Outcome.INTERRUPTED: Status.INTERRUPTED,
}
INTERRUPTED_NOTE = "worker shutting down; the job will resume"

EVENTS = {
    Outcome.COMPLETED: "job.completed",
    Outcome.CANCELLED: "job.cancelled",
    Outcome.RETRY: "job.retry_scheduled",
    Outcome.DEAD: "job.dead_lettered",
    Outcome.INTERRUPTED: "job.interrupted",
    Outcome.ABANDONED: "job.abandoned",
}


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

    def summary(self, publisher: Publisher | None) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        deltas = publisher.deltas if publisher else 0
        tokens = self.output_tokens if self.output_tokens is not None else deltas
        streaming_s = elapsed - ((self.first_token_at or self.started) - self.started)
        return {
            "ttft_ms": self.ttft_ms(),
            "duration_ms": round(elapsed * 1000),
            "output_tokens": tokens,
            "input_tokens": self.input_tokens,
            "tokens_per_s": round(tokens / streaming_s, 1) if streaming_s > 0 else None,
            "chars": len(publisher.text) if publisher else 0,
            "deltas": deltas,
            "appends": publisher.appends if publisher else 0,
        }


MakePublisher = Callable[[Job, Delivery, Lease, Alive], Publisher]


class JobRunner:
    def __init__(
        self,
        queue: Queue,
        model: Model,
        *,
        timeout_s: float,
        make_publisher: MakePublisher | None = None,
    ) -> None:
        self.queue = queue
        self.model = model
        self.timeout_s = timeout_s
        self.make_publisher = make_publisher or self.channel_publisher

    async def run(
        self, delivery: Delivery, lease: Lease, control: JobControl | None = None
    ) -> Outcome:
        """Run one delivery on the connection (and message budget) that `lease` lends it."""
        control = control or JobControl()
        figures = Figures()
        if delivery.job is None:
            ending: Ending = Failure(delivery.error or "invalid job", retryable=False)
            return await self._conclude(delivery, None, figures, ending, control)
        job = delivery.job
        log.info("job.received", attempt=delivery.attempt, reclaimed=delivery.reclaimed,
                 pattern=str(job.pattern), model=self.model.model_for(job))  # fmt: skip

        def alive() -> bool:
            return control.reason is not StopReason.HEARTBEAT_LOST and control.alive()

        publisher = self.make_publisher(job, delivery, lease, alive)
        ending = await self._attempt(delivery, job, publisher, figures, control)
        return await self._conclude(delivery, publisher, figures, ending, control)

    def channel_publisher(
        self, job: Job, delivery: Delivery, lease: Lease, alive: Alive
    ) -> Publisher:
        """The job's pattern's publisher on its Ably channel, paced by the lease."""
        headers = Headers(
            response_id=job.id, model=self.model.model_for(job), metadata=job.metadata
        )
        channel = lease.client.channels.get(job.channel)
        if job.pattern == Pattern.MESSAGE_PER_TOKEN:
            return TokenStream(channel, headers, delivery.attempt, lease, alive)
        return ResponseStream(channel, headers, lease, alive)

    # -- the attempt ---------------------------------------------------------------------

    async def _attempt(
        self,
        delivery: Delivery,
        job: Job,
        publisher: Publisher,
        figures: Figures,
        control: JobControl,
    ) -> Ending:
        """Stream the answer; says how it ended and never raises (but a foreign cancel)."""
        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                return await self._stream(delivery, job, publisher, figures)
        except asyncio.CancelledError:
            if control.reason is None:
                raise  # not ours to absorb
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            return Stopped(control.reason)
        except Abandoned:
            return Stopped(StopReason.HEARTBEAT_LOST)
        except Exception as exc:  # an Ably or Redis failure: retry the whole job
            if isinstance(exc, TimeoutError) and deadline.expired():
                return Failure(f"timed out after {self.timeout_s:g} s")
            log.warning("job.error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            return Failure(f"{type(exc).__name__}: {exc}")
        finally:
            control.finishing = True

    async def _stream(
        self, delivery: Delivery, job: Job, publisher: Publisher, figures: Figures
    ) -> Ending:
        resuming = (
            delivery.attempt > 1 or delivery.reclaimed or delivery.response_serial is not None
        )
        finished = await publisher.open(delivery.response_serial, resuming=resuming)
        if finished is not None:
            return FoundFinished(finished)
        serial = publisher.serial
        if serial is not None and serial != delivery.response_serial:
            if not await self.queue.set_response_serial(delivery, serial):
                return Fenced("set_response_serial")
        log.info("job.started", response_serial=serial, reopened=serial == delivery.response_serial)
        async for event in self.model.stream(job):
            if isinstance(event, TextDelta):
                if figures.first_token_at is None:
                    figures.first_token_at = time.monotonic()
                    log.info("job.first_token", ttft_ms=figures.ttft_ms())
                publisher.append(event.text)
            elif isinstance(event, Done):
                figures.output_tokens = event.output_tokens
                figures.input_tokens = event.input_tokens
                return Answered(event.incomplete_reason)
            elif isinstance(event, Failed):
                return Failure(event.error, event.retryable)
        return Failure("model stream ended without a result")

    # -- the outcome ---------------------------------------------------------------------

    async def _conclude(
        self,
        delivery: Delivery,
        publisher: Publisher | None,
        figures: Figures,
        ending: Ending,
        control: JobControl,
    ) -> Outcome:
        control.finishing = True
        outcome = decide(ending, delivery.attempt, self.queue.max_attempts)
        try:
            if outcome is not Outcome.ABANDONED and not isinstance(ending, FoundFinished):
                outcome, ending = await self._close_message(delivery, publisher, outcome, ending)
            if outcome is Outcome.ABANDONED:
                return self._abandon(publisher, figures, ending)
            if not await self._transition(delivery, outcome, ending, figures, publisher):
                return self._abandon(publisher, figures, Fenced(str(outcome)))
        except RedisError as exc:
            # The entry stays pending under this worker: its orphan check (or, if this
            # worker dies, a reclaim) runs the job again, and that attempt finds the
            # message as this one left it.
            log.error("job.transition_failed", outcome=str(outcome), error=str(exc))
            return self._abandon(publisher, figures, Fenced("redis"), quiet=True)
        self._log_outcome(outcome, ending, delivery, figures, publisher)
        return outcome

    async def _close_message(
        self, delivery: Delivery, publisher: Publisher | None, outcome: Outcome, ending: Ending
    ) -> tuple[Outcome, Ending]:
        """Close the channel message with the outcome's status, if this job is still ours.
        A completed answer whose close was not acknowledged is retried instead."""
        if publisher is None or publisher.serial is None:
            return outcome, ending
        if not await self.queue.owns(delivery):
            return Outcome.ABANDONED, Fenced("close")
        error = ending.error if isinstance(ending, Failure) else None
        if outcome is Outcome.INTERRUPTED:
            error = INTERRUPTED_NOTE
        try:
            await asyncio.shield(publisher.close(CLOSING_STATUS[outcome], error))
        except Abandoned:
            return Outcome.ABANDONED, Stopped(StopReason.HEARTBEAT_LOST)
        except Exception as exc:  # bounded (transport.acks); the message may stay open
            log.warning("job.close_failed", status=str(CLOSING_STATUS[outcome]), error=str(exc))
            if outcome is Outcome.COMPLETED:
                ending = Failure(f"closing the message failed: {exc}")
                return decide(ending, delivery.attempt, self.queue.max_attempts), ending
        return outcome, ending

    async def _transition(
        self,
        delivery: Delivery,
        outcome: Outcome,
        ending: Ending,
        figures: Figures,
        publisher: Publisher | None,
    ) -> bool:
        """The one fenced queue step for this outcome; False if Redis refused it."""
        if outcome is Outcome.COMPLETED or outcome is Outcome.CANCELLED:
            state = JobState.COMPLETED if outcome is Outcome.COMPLETED else JobState.CANCELLED
            return await self.queue.complete(delivery, state, figures.summary(publisher))
        if outcome is Outcome.INTERRUPTED:
            return await self.queue.requeue_interrupted(delivery)
        error = ending.error if isinstance(ending, Failure) else str(outcome)
        if outcome is Outcome.RETRY:
            return await self.queue.retry(delivery, error)
        return await self.queue.dead_letter(delivery, error)

    def _abandon(
        self, publisher: Publisher | None, figures: Figures, ending: Ending, *, quiet: bool = False
    ) -> Outcome:
        if publisher is not None:
            publisher.abort()
        if isinstance(ending, Fenced) and not quiet:
            log.warning("job.fenced", step=ending.step)
        elif not quiet:
            log.warning("job.abandoned", **figures.summary(publisher))
        return Outcome.ABANDONED

    def _log_outcome(
        self,
        outcome: Outcome,
        ending: Ending,
        delivery: Delivery,
        figures: Figures,
        publisher: Publisher | None,
    ) -> None:
        fields: dict[str, Any] = {"attempt": delivery.attempt, **figures.summary(publisher)}
        if isinstance(ending, Failure):
            fields["reason"] = ending.error
        if isinstance(ending, Answered):
            fields["incomplete_reason"] = ending.incomplete_reason
        if isinstance(ending, FoundFinished):
            fields["found_finished"] = True  # an earlier attempt's message was closed already
        if outcome is Outcome.DEAD:
            log.error(EVENTS[outcome], **fields)
        elif outcome in (Outcome.RETRY, Outcome.INTERRUPTED):
            log.warning(EVENTS[outcome], **fields)
        else:
            log.info(EVENTS[outcome], **fields)
