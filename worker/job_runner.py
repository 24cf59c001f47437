"""One job, start to finish: model stream in, channel message out, queue told the outcome.

A run has two halves. The attempt (`_attempt`) streams the model's answer into the
channel message and says how it ended (an `Ending`: answered, failed, stopped, found
finished by an earlier attempt, fenced), never raising. Then one function, `decide`,
turns that ending into the job's `Outcome`, and `_conclude` carries it out outside the
streaming code: close the message with its status, then one fenced queue transition
(complete, retry, dead-letter, requeue) that Redis refuses if the job is no longer this
worker's. One summary line per job (`job.completed`, `job.retry_scheduled`, ...) carries
the figures.

Continuing instead of regenerating (`MODEL_BACKGROUND`, the model's background
responses): while an attempt streams, the job record keeps the model response's id (at
once, before any of its text is sent) and, at most every `progress_interval_s`, the
sequence number of its last delta whose text Ably has acknowledged on the message, with
the length of the message's text up to there (`Queue.record_progress`, fenced). A later
attempt (a retry, a reclaim after a crash, a requeue after a drain) finds that record,
takes the message as it stands (no reset) and continues the same model response after
that sequence number (`Model.resume`); the message may hold more than the record says,
which the publisher skips rather than repeats. When the response cannot be continued
(gone, failed, cancelled upstream) or the message lacks recorded text, the record is
forgotten first, then the message is reset and the model asked again, as without it.
A user's cancel also cancels the background response upstream.

On Ably AI Transport's wire (`WIRE_PROTOCOL=ait`, or the job's `wire`) the answer is the
same message in that contract's shape (`transport.ait`), and the run's lifecycle events
go around it: `ai-run-start` before the first attempt creates the message, `ai-run-end`
once the job's outcome is final (completed, cancelled, dead), after the closing update.
A retried or interrupted attempt ends no run: the next attempt finishes it.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from redis.exceptions import RedisError

from worker.jobs import Job, JobError, Pattern, parse_job, valid_channel, valid_job_id
from worker.logs import get_logger
from worker.model import Done, Failed, Gone, Model, ModelEvent, Prefetched, Started, TextDelta
from worker.queue import Delivery, JobState, Queue
from worker.transport.ait import AitRun, RunReason
from worker.transport.ait_lifecycle import RunLifecycle, find_input
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

# How an AI Transport run ends, per outcome; a retry or an interrupted job ends none (the
# run goes on in the next attempt).
RUN_REASON: dict[Outcome, RunReason] = {
    Outcome.COMPLETED: "complete",
    Outcome.CANCELLED: "cancelled",
    Outcome.DEAD: "error",
}

WireProtocol = Literal["seed", "ait"]

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
    # The model's response id: recorded with the outcome, so a session can chain the
    # conversation's next prompt to it (`previous_response_id`).
    model_response_id: str | None = None

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
            "model_response_id": self.model_response_id,
        }


MakePublisher = Callable[[Job, Delivery, Lease, Alive], Publisher]
# The run's lifecycle events on the AI Transport wire; None for a seed-contract job.
MakeLifecycle = Callable[[Job, Lease, Alive], RunLifecycle | None]

# How often, at most, a running job writes its model progress to its record.
PROGRESS_INTERVAL_S = 0.5


@runtime_checkable
class Continuable(Protocol):
    """A publisher that can continue an earlier attempt's message as it stands
    (`ResponseStream`). A `TokenStream` cannot: its jobs regenerate."""

    acked_chars: int  # the prefix of `text` Ably has acknowledged on the message

    async def continue_message(self, serial: str, chars: int) -> Status | None: ...


@dataclass(frozen=True)
class Recorded:
    """What the job record says of the background model response its message holds."""

    model_response_id: str
    sequence: int  # its last event whose text the message holds
    chars: int  # the message's text up to there

    @classmethod
    def of(cls, record: dict[str, str] | None) -> Recorded | None:
        if not record or not record.get("model_response_id"):
            return None
        try:
            sequence, chars = int(record["model_sequence"]), int(record["model_chars"])
        except (KeyError, ValueError):
            return None
        return cls(record["model_response_id"], sequence, chars)


class Progress:
    """The background model response this attempt streams, and how much of its text the
    message holds: written to the job record (fenced) at once when the response starts,
    then at most every `interval_s`, only as far as Ably has acknowledged. Each write
    returns False when the job is no longer this worker's."""

    def __init__(
        self,
        queue: Queue,
        delivery: Delivery,
        publisher: Publisher,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.delivery = delivery
        self.publisher = publisher if isinstance(publisher, Continuable) else None
        self.interval_s = interval_s
        self.clock = clock
        self.model_response_id: str | None = None
        self.recorded: tuple[int, int] | None = None  # (sequence, chars) last written
        self._ends: deque[tuple[int, int]] = deque()  # (text end, sequence) of each delta
        self._last = -math.inf

    async def started(self, model_response_id: str, sequence: int) -> bool:
        """A new response, whose text starts the (new or reset) message."""
        self.model_response_id = model_response_id
        self._ends.clear()
        return await self._write(sequence, 0)

    def continuing(self, recorded: Recorded) -> None:
        self.model_response_id = recorded.model_response_id
        self.recorded = (recorded.sequence, recorded.chars)
        self._last = self.clock()

    @property
    def tracking(self) -> bool:
        """Whether deltas are recorded at all: a background response continued into a
        message that can be continued (checked per delta, so no await for the others)."""
        return self.publisher is not None and self.model_response_id is not None

    async def delta(self, sequence: int | None, text_end: int) -> bool:
        """A delta of the response reached the message's text, which now ends at
        `text_end`; writes what Ably has acknowledged if the last write is old enough."""
        if self.publisher is None or self.model_response_id is None or sequence is None:
            return True
        self._ends.append((text_end, sequence))
        if self.clock() - self._last < self.interval_s:
            return True
        acked, newest = self.publisher.acked_chars, None
        while self._ends and self._ends[0][0] <= acked:
            newest = self._ends.popleft()
        if newest is None:
            return True
        end, sequence = newest
        return await self._write(sequence, end)

    async def _write(self, sequence: int, chars: int) -> bool:
        self._last = self.clock()
        if self.publisher is None or self.model_response_id is None:
            return True  # nothing can continue this message: no need to remember
        self.recorded = (sequence, chars)
        return await self.queue.record_progress(
            self.delivery, self.model_response_id, sequence, chars
        )


def _resuming(delivery: Delivery) -> bool:
    """An attempt that may find its answer's message (or model response) already begun."""
    return delivery.attempt > 1 or delivery.reclaimed or delivery.response_serial is not None


class JobRunner:
    def __init__(
        self,
        queue: Queue,
        model: Model,
        *,
        timeout_s: float,
        make_publisher: MakePublisher | None = None,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        wire_protocol: WireProtocol = "seed",
        make_lifecycle: MakeLifecycle | None = None,
    ) -> None:
        self.queue = queue
        self.model = model
        self.timeout_s = timeout_s
        self.make_publisher = make_publisher or self.channel_publisher
        self.progress_interval_s = progress_interval_s
        self.wire_protocol = wire_protocol  # for jobs that name no `wire`
        self.make_lifecycle = make_lifecycle or self.channel_lifecycle

    async def run(
        self, delivery: Delivery, lease: Lease, control: JobControl | None = None
    ) -> Outcome:
        """Run one delivery on the connection (and message budget) that `lease` lends it."""
        control = control or JobControl()
        figures = Figures()
        if delivery.job is None:
            return await self._refuse(delivery, lease, control, figures)
        job = delivery.job
        log.info("job.received", attempt=delivery.attempt, reclaimed=delivery.reclaimed,
                 pattern=str(job.pattern), model=self.model.model_for(job))  # fmt: skip

        def alive() -> bool:
            return control.reason is not StopReason.HEARTBEAT_LOST and control.alive()

        job = await self._located(job, lease)
        publisher = self.make_publisher(job, delivery, lease, alive)
        lifecycle = self._lifecycle(job, delivery, lease, alive)
        progress = Progress(self.queue, delivery, publisher, self.progress_interval_s)
        ending = await self._attempt(delivery, job, publisher, figures, control, progress,
                                     lifecycle)  # fmt: skip
        outcome = await self._conclude(delivery, publisher, figures, ending, control, lifecycle)
        if outcome is Outcome.CANCELLED and isinstance(ending, Stopped):
            await self._cancel_upstream(progress.model_response_id)
        return outcome

    # -- a job that can never run ----------------------------------------------------------

    async def _refuse(
        self, delivery: Delivery, lease: Lease, control: JobControl, figures: Figures
    ) -> Outcome:
        """A job that can never run (malformed, over a limit, or one whose workers keep
        dying) goes to the dead letters with its reason; if it names a valid channel, its
        user sees a message there too, closed `failed` with the same reason (the usual
        message id, so a redelivery makes no second message)."""
        ending: Ending = Failure(delivery.error or "invalid job", retryable=False)
        job, parsed = await self._stand_in(delivery)
        if job is None:
            return await self._conclude(delivery, None, figures, ending, control)

        def alive() -> bool:
            return control.reason is not StopReason.HEARTBEAT_LOST and control.alive()

        opened: Publisher | None = None
        publisher = self.make_publisher(job, delivery, lease, alive)
        lifecycle = self._lifecycle(job, delivery, lease, alive)
        resuming = _resuming(delivery)
        try:
            async with asyncio.timeout(self.timeout_s):
                if lifecycle is not None and not lifecycle.started:
                    await lifecycle.start()
                finished = await publisher.open(delivery.response_serial, resuming=resuming)
            if finished is None:
                opened = publisher
            elif parsed:  # a job answered before its worker died: it is finished
                ending = FoundFinished(finished)
            # else an earlier message with this id is closed: it is left as it is
        except asyncio.CancelledError:
            if control.reason is None:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            ending, opened = Stopped(control.reason), publisher
        except Abandoned:
            ending = Stopped(StopReason.HEARTBEAT_LOST)
        except Exception as exc:  # the dead letter holds the reason all the same
            log.warning("job.refusal_not_published", error=f"{type(exc).__name__}: {exc}")
            publisher.abort()
        return await self._conclude(delivery, opened, figures, ending, control, lifecycle)

    async def _stand_in(self, delivery: Delivery) -> tuple[Job | None, bool]:
        """The job to tell the user about, when the payload names a valid channel (the
        queue keeps it in the record) and a usable id: the job itself if it parses (its
        workers kept dying; then True), else a stand-in with just its id and channel."""
        try:
            record = await self.queue.status(delivery.job_id) or {}
        except RedisError:
            return None, False
        channel = record.get("channel", "")
        if not (valid_channel(channel) and valid_job_id(delivery.job_id)):
            return None, False
        try:
            job = parse_job(record.get("payload", ""))
        except JobError:
            job = None
        if job is not None and job.id == delivery.job_id and job.channel == channel:
            return job, True
        stand_in = Job.model_construct(id=delivery.job_id, channel=channel, input="")
        return stand_in, False

    def ait_run(self, job: Job) -> AitRun | None:
        """The job's run on the AI Transport wire, or None for the seed contract."""
        if (job.wire or self.wire_protocol) != "ait":
            return None
        return AitRun(job.id, job.input_codec_message_id, job.user_client_id)

    def channel_publisher(
        self, job: Job, delivery: Delivery, lease: Lease, alive: Alive
    ) -> Publisher:
        """The job's pattern's publisher on its Ably channel, paced by the lease. The AI
        Transport wire has no message per token: its answers are one message."""
        headers = Headers(
            response_id=job.id, model=self.model.model_for(job), metadata=job.metadata,
            ait=self.ait_run(job),
        )  # fmt: skip
        channel = lease.client.channels.get(job.channel)
        if job.pattern == Pattern.MESSAGE_PER_TOKEN and headers.ait is None:
            return TokenStream(channel, headers, delivery.attempt, lease, alive)
        return ResponseStream(channel, headers, lease, alive)

    def channel_lifecycle(self, job: Job, lease: Lease, alive: Alive) -> RunLifecycle | None:
        run = self.ait_run(job)
        if run is None:
            return None
        return RunLifecycle(lease.client.channels.get(job.channel), run, job.id, lease, alive)

    async def _located(self, job: Job, lease: Lease) -> Job:
        """An AI Transport job a backend enqueued may name its input by event-id alone
        (the invocation's `inputEventId`): found on the channel, the input gives the run
        its parent (codec-message-id) and its user (the sender's Ably clientId)."""
        if self.ait_run(job) is None or not job.input_event_id or job.input_codec_message_id:
            return job
        try:
            async with asyncio.timeout(10):
                channel = lease.client.channels.get(job.channel)
                found = await find_input(channel, event_id=job.input_event_id)
        except Exception as exc:  # the answer goes out all the same, as a run of its own
            log.warning("ait.input_lookup_failed", error=f"{type(exc).__name__}: {exc}")
            return job
        if found is None:
            log.warning("ait.input_not_found", event_id=job.input_event_id)
            return job
        log.info("ait.input_located", event_id=job.input_event_id,
                 input_codec_message_id=found.codec_message_id)  # fmt: skip
        user = found.client_id or job.user_client_id
        return job.model_copy(
            update={"input_codec_message_id": found.codec_message_id, "user_client_id": user}
        )

    def _lifecycle(
        self, job: Job, delivery: Delivery, lease: Lease, alive: Alive
    ) -> RunLifecycle | None:
        lifecycle = self.make_lifecycle(job, lease, alive)
        if lifecycle is not None and delivery.response_serial is not None:
            # An earlier attempt created the answer's message, so it started the run
            # first: a second `ai-run-start` (Ably dedupes its id for only 2 minutes)
            # would be a second start of the same run.
            lifecycle.started = True
        return lifecycle

    # -- the attempt ---------------------------------------------------------------------

    async def _attempt(
        self,
        delivery: Delivery,
        job: Job,
        publisher: Publisher,
        figures: Figures,
        control: JobControl,
        progress: Progress,
        lifecycle: RunLifecycle | None = None,
    ) -> Ending:
        """Stream the answer; says how it ended and never raises (but a foreign cancel)."""
        deadline = asyncio.timeout(self.timeout_s)
        # A fresh answer asks the model first: the request is on its way while the run
        # starts and the message is created and its serial saved. Not a resumed one (it
        # may continue a recorded response instead), nor a background response, which
        # would live on upstream if abandoned here.
        prefetched = (
            None
            if _resuming(delivery) or self.model.background
            else Prefetched(self.model.stream(job))
        )
        try:
            async with deadline:
                if lifecycle is not None and not lifecycle.started:
                    await lifecycle.start()  # before the answer's message exists
                return await self._stream(delivery, job, publisher, figures, progress,
                                          prefetched)  # fmt: skip
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
            if prefetched is not None:  # however the attempt ends: no request left open
                await prefetched.aclose()

    async def _stream(
        self,
        delivery: Delivery,
        job: Job,
        publisher: Publisher,
        figures: Figures,
        progress: Progress,
        prefetched: Prefetched | None,
    ) -> Ending:
        resuming = _resuming(delivery)
        recorded = Recorded.of(await self.queue.status(delivery.job_id)) if resuming else None
        if recorded is not None:
            serial = delivery.response_serial
            if serial is not None:
                continued = await self._continue(serial, publisher, figures, progress, recorded)
                if continued is not None:
                    return continued
            # Forget the response before the message is reset: a record never names a
            # response whose text the message does not hold.
            if not await self.queue.record_progress(delivery, None):
                return Fenced("record_progress")
        finished = await publisher.open(delivery.response_serial, resuming=resuming)
        if finished is not None:
            return FoundFinished(finished)
        serial = publisher.serial
        if serial is not None and serial != delivery.response_serial:
            if not await self.queue.set_response_serial(delivery, serial):
                return Fenced("set_response_serial")
        log.info("job.started", response_serial=serial,
                 reopened=serial == delivery.response_serial)  # fmt: skip
        events = prefetched if prefetched is not None else self.model.stream(job)
        ending = await self._consume(events, publisher, figures, progress)
        return Failure(ending.reason) if isinstance(ending, Gone) else ending

    async def _continue(
        self,
        serial: str,
        publisher: Publisher,
        figures: Figures,
        progress: Progress,
        recorded: Recorded,
    ) -> Ending | None:
        """Continue the recorded background response into the message as it stands; None
        when it cannot be (the caller regenerates)."""
        if not isinstance(publisher, Continuable):
            return None
        finished = await publisher.continue_message(serial, recorded.chars)
        if finished is not None:
            return FoundFinished(finished)
        model_response_id = recorded.model_response_id
        if publisher.serial is None:
            log.warning("job.continue_failed", model_response_id=model_response_id,
                        reason="the message does not hold the recorded text")  # fmt: skip
            return None
        progress.continuing(recorded)
        log.info("job.started", response_serial=serial, reopened=True, continued=True,
                 model_response_id=model_response_id, after_sequence=recorded.sequence)  # fmt: skip
        events = self.model.resume(model_response_id, recorded.sequence)
        ending = await self._consume(events, publisher, figures, progress)
        if isinstance(ending, Gone):
            log.warning("job.continue_failed", model_response_id=model_response_id,
                        reason=ending.reason)  # fmt: skip
            progress.model_response_id = None
            return None
        return ending

    async def _consume(
        self,
        events: AsyncIterator[ModelEvent],
        publisher: Publisher,
        figures: Figures,
        progress: Progress,
    ) -> Ending | Gone:
        """The model's events into the message, until the answer ends one way or another."""
        async for event in events:
            if isinstance(event, TextDelta):
                if figures.first_token_at is None:
                    figures.first_token_at = time.monotonic()
                    log.info("job.first_token", ttft_ms=figures.ttft_ms())
                publisher.append(event.text)
                if progress.tracking and not await progress.delta(
                    event.sequence, len(publisher.text)
                ):
                    return Fenced("record_progress")
            elif isinstance(event, Started):
                if not await progress.started(event.model_response_id, event.sequence):
                    return Fenced("record_progress")
            elif isinstance(event, Done):
                figures.output_tokens = event.output_tokens
                figures.input_tokens = event.input_tokens
                figures.model_response_id = event.model_response_id
                return Answered(event.incomplete_reason)
            elif isinstance(event, Failed):
                return Failure(event.error, event.retryable)
            elif isinstance(event, Gone):
                return event
        return Failure("model stream ended without a result")

    async def _cancel_upstream(self, model_response_id: str | None) -> None:
        """A user's cancel stops the background response upstream too (best effort)."""
        if model_response_id is None:
            return
        error = await self.model.cancel(model_response_id)
        if error is None:
            log.info("job.model_cancelled", model_response_id=model_response_id)
        else:
            log.warning("job.model_cancel_failed", model_response_id=model_response_id,
                        error=error)  # fmt: skip

    # -- the outcome ---------------------------------------------------------------------

    async def _conclude(
        self,
        delivery: Delivery,
        publisher: Publisher | None,
        figures: Figures,
        ending: Ending,
        control: JobControl,
        lifecycle: RunLifecycle | None = None,
    ) -> Outcome:
        control.finishing = True
        outcome = decide(ending, delivery.attempt, self.queue.max_attempts)
        try:
            if outcome is not Outcome.ABANDONED and not isinstance(ending, FoundFinished):
                outcome, ending = await self._close_message(delivery, publisher, outcome, ending)
            if outcome is Outcome.ABANDONED:
                return self._abandon(publisher, figures, ending)
            if lifecycle is not None and lifecycle.started and outcome in RUN_REASON:
                await self._end_run(lifecycle, outcome, ending)
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

    @staticmethod
    async def _end_run(lifecycle: RunLifecycle, outcome: Outcome, ending: Ending) -> None:
        """`ai-run-end`, after the close: else the client shows the run active for ever.
        Best effort: the message is closed already, and the outcome stands."""
        error = ending.error if isinstance(ending, Failure) else None
        try:
            await asyncio.shield(lifecycle.end(RUN_REASON[outcome], error))
        except Exception as exc:
            log.warning("ait.run_end_failed", reason=RUN_REASON[outcome],
                        error=f"{type(exc).__name__}: {exc}")  # fmt: skip

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
