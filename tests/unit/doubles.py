"""Test doubles of our own seams, and nothing else (DESIGN.md, "Real services").

- `FakeQueue`: the `worker.queue.Queue` protocol, in memory, recording every call.
- `FakePublisher`: the `worker.transport.publisher.Publisher` protocol, and the runner's
  `Continuable` (continuing an earlier attempt's message as it stands).
- `FakeModel`: our `worker.model.Model` class (`model_for`, `stream`, `resume`, `cancel`),
  from scripts.
- `FakeRunner`: `JobRunner.run` as the runtime sees it, for the runtime's own tests.
- `ManualClock`: a clock for `ProcessLease` and `Budget`.

Never a double of Redis, the Ably SDK or the OpenAI SDK: where a test needs one of
those, it uses the real thing against the local servers.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from worker.job_runner import JobControl, StopReason
from worker.jobs import Job
from worker.model import Done, ModelEvent, Started, TextDelta
from worker.queue import Delivery, JobState, QueueStats
from worker.transport.contract import Status
from worker.transport.publisher import Abandoned, Alive, always_alive

# -- jobs and deliveries -----------------------------------------------------------------


def make_job(job_id: str = "job-1", channel: str = "unit:chan", **fields: Any) -> Job:
    return Job(id=job_id, channel=channel, input="Say hello", **fields)


_entry_seq = itertools.count()


def make_delivery(
    job_id: str = "job-1",
    attempt: int = 1,
    *,
    channel: str = "unit:chan",
    reclaimed: bool = False,
    response_serial: str | None = None,
    entry_id: str | None = None,
    **job_fields: Any,
) -> Delivery:
    return Delivery(
        entry_id=entry_id or f"1700000000000-{next(_entry_seq)}",
        job_id=job_id,
        attempt=attempt,
        job=make_job(job_id, channel, **job_fields),
        response_serial=response_serial,
        reclaimed=reclaimed,
    )


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Poll until `predicate()` holds; fail the test (not hang it) if it never does."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (state of several doubles, no one Event)
            await asyncio.sleep(0.01)


# -- the clock ---------------------------------------------------------------------------


class ManualClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- the queue ---------------------------------------------------------------------------


@dataclass
class Call:
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    at: float  # time.monotonic() when the call started


ENDING_TRANSITIONS = ("complete", "retry", "dead_letter", "requeue_interrupted")


class FakeQueue:
    """The `Queue` protocol in memory. Every call is recorded (name, arguments, start time)
    before any switch acts on it.

    Switches:
    - `refuse`: names of fenced transitions that return False, changing nothing, as
      Redis answers a stale owner (`complete`, `retry`, `dead_letter`,
      `requeue_interrupted`, `set_response_serial`, `record_progress`).
    - `records`: job id -> the job record `status` answers; `record_progress` writes its
      `model_response_id`, `model_sequence` and `model_chars` there.
    - `owns_result`: what `owns` answers.
    - `fail_once`: method name -> exception raised by its next call only.
    - `heartbeat_hangs_after`: heartbeats after this many hang until cancelled.
    - `takeable`, `reclaimable`, `orphaned`: deliveries handed out by `take`, `reclaim`
      and `orphans` (each once). `take` with nothing to hand out waits `block_ms`, or
      for `take_gate` when that is an Event (a take that blocks until cancelled).
    - `reclaim_gate`: when set to an Event, `reclaim` waits for it before answering
      (`reclaim_entered` is set when a reclaim starts).
    """

    def __init__(
        self, *, max_attempts: int = 3, heartbeat_ttl_s: int = 30, consumer: str = "unit:0001"
    ) -> None:
        self.max_attempts = max_attempts
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.consumer = consumer
        self.calls: list[Call] = []
        self.refuse: set[str] = set()
        self.owns_result = True
        self.fail_once: dict[str, BaseException] = {}
        self.heartbeat_hangs_after: int | None = None
        self.takeable: list[Delivery] = []
        self.reclaimable: list[Delivery] = []
        self.orphaned: list[Delivery] = []
        self.take_gate: asyncio.Event | None = None
        self.reclaim_gate: asyncio.Event | None = None
        self.reclaim_entered = asyncio.Event()
        self.records: dict[str, dict[str, str]] = {}

    # -- inspection --------------------------------------------------------------------

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def called(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def endings(self) -> list[Call]:
        """The transitions that end or hand back a job, in order."""
        return [c for c in self.calls if c.name in ENDING_TRANSITIONS]

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append(Call(name, args, kwargs, time.monotonic()))
        if name in self.fail_once:
            raise self.fail_once.pop(name)

    def _fenced(self, name: str, *args: Any) -> bool:
        self._record(name, *args)
        return name not in self.refuse

    # -- the protocol ------------------------------------------------------------------

    async def ensure_group(self) -> None:
        self._record("ensure_group")

    async def enqueue(self, job: Job) -> bool:
        self._record("enqueue", job)
        return True

    async def take(self, count: int, block_ms: int) -> list[Delivery]:
        self._record("take", count, block_ms)
        if not self.takeable:
            if self.take_gate is not None:
                await self.take_gate.wait()
            else:
                await asyncio.sleep(block_ms / 1000)
            return []
        handed, self.takeable = self.takeable[:count], self.takeable[count:]
        return handed

    async def owns(self, delivery: Delivery) -> bool:
        self._record("owns", delivery)
        return self.owns_result

    async def set_response_serial(self, delivery: Delivery, serial: str) -> bool:
        return self._fenced("set_response_serial", delivery, serial)

    async def record_progress(
        self,
        delivery: Delivery,
        model_response_id: str | None,
        sequence: int = -1,
        chars: int = 0,
    ) -> bool:
        if not self._fenced("record_progress", delivery, model_response_id, sequence, chars):
            return False
        record = self.records.setdefault(delivery.job_id, {})
        for name in ("model_response_id", "model_sequence", "model_chars"):
            record.pop(name, None)
        if model_response_id is not None:
            record.update(model_response_id=model_response_id, model_sequence=str(sequence),
                          model_chars=str(chars))  # fmt: skip
        return True

    def progress_writes(self) -> list[tuple[str | None, int, int]]:
        """Each `record_progress` call's (model_response_id, sequence, chars), in order."""
        return [c.args[1:] for c in self.called("record_progress")]

    async def complete(
        self,
        delivery: Delivery,
        state: JobState = JobState.COMPLETED,
        figures: dict[str, Any] | None = None,
    ) -> bool:
        return self._fenced("complete", delivery, state, figures)

    async def retry(self, delivery: Delivery, error: str) -> bool:
        return self._fenced("retry", delivery, error)

    async def dead_letter(self, delivery: Delivery, error: str) -> bool:
        return self._fenced("dead_letter", delivery, error)

    async def requeue_interrupted(self, delivery: Delivery) -> bool:
        return self._fenced("requeue_interrupted", delivery)

    async def heartbeat(self, info: dict[str, Any]) -> None:
        self._record("heartbeat", info)
        hangs_after = self.heartbeat_hangs_after
        if hangs_after is not None and len(self.called("heartbeat")) > hangs_after:
            await asyncio.Event().wait()  # a Redis call that never answers

    async def leave(self) -> None:
        self._record("leave")

    async def reclaim(self, count: int = 100) -> list[Delivery]:
        self._record("reclaim", count)
        self.reclaim_entered.set()
        if self.reclaim_gate is not None:
            await self.reclaim_gate.wait()
        handed, self.reclaimable = self.reclaimable[:count], self.reclaimable[count:]
        return handed

    async def orphans(self, running: set[str], count: int = 100) -> list[Delivery]:
        self._record("orphans", set(running), count)
        mine = [d for d in self.orphaned if d.entry_id not in running][:count]
        self.orphaned = [d for d in self.orphaned if d not in mine]
        return mine

    async def promote_due(self) -> int:
        self._record("promote_due")
        return 0

    async def stats(self) -> QueueStats:
        self._record("stats")
        return QueueStats(waiting=0, pending=0, delayed=0, dead=0)

    async def status(self, job_id: str) -> dict[str, str] | None:
        self._record("status", job_id)
        record = self.records.get(job_id)
        return dict(record) if record is not None else None


# -- the publisher -----------------------------------------------------------------------


class FakePublisher:
    """The `Publisher` protocol, recording what the runner asked of the message.

    Like the real ones, it refuses to send (raises `Abandoned` from `open`/`close`, drops
    appends) once `alive()` is false or after `abort()`; the runner hands it `alive`
    through `make`, the `make_publisher` factory.

    Switches:
    - `finished`: what `open` returns (an earlier attempt's message already closed
      `complete` or `cancelled`); None opens a streaming message.
    - `open_raises`, `close_raises`: an exception for `open` / `close` to raise
      (e.g. `AckTimeout`, `Abandoned`).
    - `holds`: the text an earlier attempt's message holds, for `continue_message`
      (None: no such message). Like `ResponseStream`, a continuation keeps its first
      `chars` characters as `text`, takes resumed deltas that repeat the rest as sent,
      and cannot continue a message holding less than `chars`.
    - `acks_held`: appends are not acknowledged (`acked_chars` stays); by default each
      is acknowledged at once.
    - `open_gate`: when an Event, `open` waits for it before it answers (a create whose
      acknowledgement is on its way).
    """

    def __init__(
        self,
        *,
        new_serial: str = "serial-1",
        finished: Status | None = None,
        open_raises: BaseException | None = None,
        close_raises: BaseException | None = None,
        holds: str | None = None,
        acks_held: bool = False,
    ) -> None:
        self.new_serial = new_serial
        self.finished = finished
        self.open_raises = open_raises
        self.close_raises = close_raises
        self.holds = holds
        self.acks_held = acks_held
        self.open_gate: asyncio.Event | None = None
        self.serial: str | None = None
        self.text = ""
        self.acked_chars = 0
        self.sent = ""  # what reached the message by appends (not the text taken as shown)
        self._shown = ""
        self.continued: list[tuple[str, int]] = []  # (serial, chars)
        self.replaced = 0  # sends that replaced a continued message's text (it held other text)
        self.deltas = 0
        self.appends = 0
        self.alive: Alive = always_alive
        self.made: list[tuple[Job, Delivery]] = []
        self.opened: list[tuple[str | None, bool]] = []  # (serial, resuming)
        self.closed: list[tuple[Status, str | None]] = []  # (status, error)
        self.aborted = 0
        self.first_append = asyncio.Event()

    def make(self, job: Job, delivery: Delivery, lease: Any, alive: Alive) -> FakePublisher:
        """The runner's `make_publisher`: this publisher, for that job."""
        self.made.append((job, delivery))
        self.alive = alive
        return self

    def _may_send(self) -> bool:
        return not self.aborted and self.alive()

    async def open(self, serial: str | None = None, *, resuming: bool = False) -> Status | None:
        self.opened.append((serial, resuming))
        await asyncio.sleep(0)
        if self.open_gate is not None:
            await self.open_gate.wait()
        if self.open_raises is not None:
            raise self.open_raises
        if not self._may_send():
            raise Abandoned("not sending the create: the job is no longer this worker's")
        self.serial = serial or self.new_serial
        self.text, self.sent, self._shown, self.acked_chars = "", "", "", 0  # reset
        return self.finished

    async def continue_message(self, serial: str, chars: int) -> Status | None:
        self.continued.append((serial, chars))
        await asyncio.sleep(0)
        if self.finished is not None:
            self.serial = serial
            return self.finished
        if self.holds is None or len(self.holds) < chars:
            return None
        self.serial = serial
        self.text, self._shown = self.holds[:chars], self.holds[chars:]
        self.acked_chars = chars
        return None

    def append(self, delta: str) -> None:
        if not delta or self.serial is None or not self._may_send():
            return
        self.deltas += 1
        self.first_append.set()
        if self._shown:
            n = min(len(delta), len(self._shown))
            if delta[:n] != self._shown[:n]:
                self._shown = ""  # ResponseStream's next send replaces the whole text
                self.replaced += 1
            else:
                self.text += delta[:n]
                self._shown, delta = self._shown[n:], delta[n:]
                if not delta:
                    return
        self.text += delta
        self.sent += delta
        self.appends += 1
        if not self.acks_held:
            self.acked_chars = len(self.text)

    async def close(self, status: Status, error: str | None = None) -> int:
        self.closed.append((status, error))
        await asyncio.sleep(0)
        if self.close_raises is not None:
            raise self.close_raises
        if not self._may_send():
            raise Abandoned("not sending the closing update: the job is no longer ours")
        return 0

    def abort(self) -> None:
        self.aborted += 1


# -- the model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pause:
    """A script step: the model says nothing for `seconds` (math.inf: until cancelled)."""

    seconds: float


class FakeModel:
    """Our `worker.model.Model` from a script of `TextDelta`/`Done`/`Failed` events and
    `Pause` steps; records each job it streamed.

    `background` is the model's setting (`MODEL_BACKGROUND`); by default, as the real
    model, it is background when its script names a response (`Started`). A stream's
    events are recorded as they are yielded (`yielded`), and a stream closed or cancelled
    before it played its whole script is recorded in `closed` (its `finally`: the real
    model's HTTP response is closed there)."""

    def __init__(
        self,
        *script: ModelEvent | Pause,
        default_model: str = "fake-model",
        resumed: list[ModelEvent | Pause] | None = None,
        cancel_error: str | None = None,
        background: bool | None = None,
    ) -> None:
        self.script = list(script)
        self.default_model = default_model
        self.resume_script = list(resumed or [])
        self.cancel_error = cancel_error
        if background is None:
            background = any(isinstance(step, Started) for step in self.script)
        self.background = background
        self.streamed: list[str] = []  # job ids, one per stream() call (its request sent)
        self.stream_started = asyncio.Event()  # set when a stream() call starts
        self.yielded: list[ModelEvent] = []  # the events stream() calls yielded, in order
        self.closed: list[str] = []  # job ids whose stream ended before its script did
        self.resumes: list[tuple[str, int]] = []  # (model_response_id, after), per resume()
        self.cancelled: list[str] = []  # model response ids, per cancel()

    def model_for(self, job: Job) -> str:
        return job.model or self.default_model

    async def stream(self, job: Job) -> AsyncIterator[ModelEvent]:
        self.streamed.append(job.id)
        self.stream_started.set()
        played = False
        try:
            async for event in self._play(self.script):
                self.yielded.append(event)
                yield event
            played = True
        finally:
            if not played:
                self.closed.append(job.id)

    async def resume(self, model_response_id: str, after: int) -> AsyncIterator[ModelEvent]:
        self.resumes.append((model_response_id, after))
        async for event in self._play(self.resume_script):
            yield event

    async def cancel(self, model_response_id: str) -> str | None:
        self.cancelled.append(model_response_id)
        return self.cancel_error

    async def _play(self, script: list[ModelEvent | Pause]) -> AsyncIterator[ModelEvent]:
        for step in script:
            if isinstance(step, Pause):
                if math.isinf(step.seconds):
                    await asyncio.Event().wait()
                else:
                    await asyncio.sleep(step.seconds)
            else:
                yield step


def answer(*pieces: str, output_tokens: int | None = None) -> list[ModelEvent]:
    """A model script: the pieces as deltas, then Done."""
    events: list[ModelEvent] = [TextDelta(p) for p in pieces]
    events.append(Done(input_tokens=5, output_tokens=output_tokens or len(pieces)))
    return events


def background_answer(
    model_response_id: str, *pieces: str, first_sequence: int = 5, done: bool = True
) -> list[ModelEvent]:
    """A background response's script: `Started`, the pieces as deltas numbered from
    `first_sequence` (where the local server's first delta is), then Done."""
    events: list[ModelEvent] = [Started(model_response_id, 0)]
    events += [TextDelta(p, first_sequence + i) for i, p in enumerate(pieces)]
    if done:
        events.append(Done(input_tokens=5, output_tokens=len(pieces)))
    return events


def resumed_deltas(*pieces: str, after: int, done: bool = True) -> list[ModelEvent]:
    """A resumed background response's script: the pieces numbered after `after`."""
    events: list[ModelEvent] = [TextDelta(p, after + 1 + i) for i, p in enumerate(pieces)]
    if done:
        events.append(Done(input_tokens=5, output_tokens=len(pieces)))
    return events


# -- the runner, as the runtime sees it --------------------------------------------------


@dataclass
class FakeRunner:
    """`JobRunner.run` for the runtime's tests: each job "streams" for its duration
    (`durations[job_id]`, absent: until stopped), then spends `finishing_s` closing its
    message with `control.finishing` set. Like the real runner it absorbs a stop that
    carries a `control.reason` and re-raises a cancel that does not."""

    durations: dict[str, float] = field(default_factory=dict)
    finishing_s: dict[str, float] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    stopped: dict[str, StopReason] = field(default_factory=dict)
    leases: list[Any] = field(default_factory=list)

    async def run(self, delivery: Delivery, lease: Any, control: JobControl) -> None:
        self.started.append(delivery.job_id)
        self.leases.append(lease)
        duration = self.durations.get(delivery.job_id)
        try:
            if duration is None:
                await asyncio.Event().wait()
            else:
                await asyncio.sleep(duration)
        except asyncio.CancelledError:
            if control.reason is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.stopped[delivery.job_id] = control.reason
            return
        finally:
            control.finishing = True
        await asyncio.sleep(self.finishing_s.get(delivery.job_id, 0))
        self.finished.append(delivery.job_id)
