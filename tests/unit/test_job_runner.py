"""The runner's outcomes through `JobRunner.run`: what the channel message is closed with,
which fenced queue transition runs with what error, and what the operator reads in the
log. Doubles of our own seams only (`tests.unit.doubles`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.exceptions
from structlog.testing import capture_logs

from tests.unit.doubles import (
    FakeModel,
    FakePublisher,
    FakeQueue,
    ManualClock,
    Pause,
    answer,
    background_answer,
    make_delivery,
    resumed_deltas,
)
from worker.job_runner import (
    INTERRUPTED_NOTE,
    JobControl,
    JobRunner,
    Outcome,
    Progress,
    StopReason,
)
from worker.model import Done, Failed, Gone, Started, TextDelta
from worker.queue import Delivery, JobState
from worker.transport.acks import AckTimeout
from worker.transport.contract import Status
from worker.transport.publisher import Abandoned

INF = float("inf")


def runner_for(
    queue: FakeQueue,
    model: FakeModel,
    publisher: FakePublisher,
    timeout_s: float = 300.0,
    progress_interval_s: float = 0.0,
) -> JobRunner:
    return JobRunner(
        queue,  # type: ignore[arg-type]
        model,  # type: ignore[arg-type]
        timeout_s=timeout_s,
        make_publisher=publisher.make,  # type: ignore[arg-type]
        progress_interval_s=progress_interval_s,
    )


async def run(
    queue: FakeQueue,
    model: FakeModel,
    publisher: FakePublisher,
    delivery: Delivery,
    control: JobControl | None = None,
    timeout_s: float = 300.0,
    progress_interval_s: float = 0.0,
) -> tuple[Outcome, list[dict[str, Any]]]:
    runner = runner_for(queue, model, publisher, timeout_s, progress_interval_s)
    with capture_logs() as logs:
        outcome = await runner.run(delivery, None, control or JobControl())  # type: ignore[arg-type]
    return outcome, logs


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def the_one(logs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = events(logs, name)
    assert len(found) == 1, f"expected one {name!r}, got {[e['event'] for e in logs]}"
    return found[0]


async def stop_mid_stream(
    reason: StopReason, model: FakeModel | None = None, publisher: FakePublisher | None = None
) -> tuple[Outcome, FakeQueue, FakePublisher, list[dict[str, Any]]]:
    """Run a job whose model streams a little then stalls; stop it as the runtime does
    (set `control.reason`, then cancel the task) once its first delta reached the message."""
    queue = FakeQueue()
    model = model or FakeModel(TextDelta("Partial "), TextDelta("answer"), Pause(INF))
    publisher = publisher or FakePublisher()
    control = JobControl()
    runner = runner_for(queue, model, publisher)
    with capture_logs() as logs:
        task = asyncio.create_task(runner.run(make_delivery(), None, control))  # type: ignore[arg-type]
        async with asyncio.timeout(3):
            await publisher.first_append.wait()
        control.reason = reason
        task.cancel()
        async with asyncio.timeout(3):
            outcome = await task
    assert not task.cancelled()
    return outcome, queue, publisher, logs


# -- the outcome matrix ------------------------------------------------------------------


async def test_answered_closes_complete_and_completes_with_figures() -> None:
    queue, publisher = FakeQueue(), FakePublisher()
    model = FakeModel(TextDelta("Hel"), TextDelta("lo!"), Done(input_tokens=7, output_tokens=2))
    delivery = make_delivery()

    outcome, logs = await run(queue, model, publisher, delivery)

    assert outcome is Outcome.COMPLETED
    assert publisher.text == "Hello!"
    assert publisher.opened == [(None, False)]  # a first attempt: a new message
    assert publisher.closed == [(Status.COMPLETE, None)]
    assert publisher.aborted == 0
    assert queue.called("set_response_serial")[0].args == (delivery, "serial-1")
    [complete] = queue.endings()
    assert complete.name == "complete"
    done, state, figures = complete.args
    assert done is delivery and state is JobState.COMPLETED
    assert figures["output_tokens"] == 2
    assert figures["input_tokens"] == 7
    assert figures["chars"] == len("Hello!")
    assert figures["deltas"] == 2
    line = the_one(logs, "job.completed")
    assert line["attempt"] == 1 and line["output_tokens"] == 2
    assert [e["event"] for e in logs] == [
        "job.received",
        "job.started",
        "job.first_token",
        "job.completed",
    ]


FAILURES = [
    # (attempt, retryable, closing status, transition, summary event)
    pytest.param(1, True, Status.INTERRUPTED, "retry", "job.retry_scheduled", id="retryable"),
    pytest.param(3, True, Status.FAILED, "dead_letter", "job.dead_lettered", id="last-attempt"),
    pytest.param(1, False, Status.FAILED, "dead_letter", "job.dead_lettered", id="not-retryable"),
]


@pytest.mark.parametrize(("attempt", "retryable", "status", "transition", "event"), FAILURES)
async def test_model_failure(
    attempt: int, retryable: bool, status: Status, transition: str, event: str
) -> None:
    error = "model API returned HTTP 500: upstream exploded"
    queue, publisher = FakeQueue(max_attempts=3), FakePublisher()
    model = FakeModel(TextDelta("Half an ans"), Failed(error, retryable=retryable))
    delivery = make_delivery(attempt=attempt)

    outcome, logs = await run(queue, model, publisher, delivery)

    assert outcome is (Outcome.RETRY if transition == "retry" else Outcome.DEAD)
    assert publisher.closed == [(status, error)]
    assert [(c.name, c.args) for c in queue.endings()] == [(transition, (delivery, error))]
    assert the_one(logs, event)["reason"] == error


async def test_model_stream_that_ends_without_a_result_is_retried() -> None:
    queue, publisher = FakeQueue(), FakePublisher()
    outcome, _ = await run(queue, FakeModel(TextDelta("cut")), publisher, make_delivery())
    assert outcome is Outcome.RETRY
    assert publisher.closed == [(Status.INTERRUPTED, "model stream ended without a result")]
    assert queue.endings()[0].args[1] == "model stream ended without a result"


async def test_malformed_delivery_is_dead_lettered_with_its_error_and_no_message() -> None:
    error = "invalid job: channel: Field required"
    queue, publisher, model = FakeQueue(), FakePublisher(), FakeModel(*answer("never"))
    delivery = Delivery(entry_id="1-0", job_id="raw-1", attempt=1, job=None, error=error)

    outcome, logs = await run(queue, model, publisher, delivery)

    assert outcome is Outcome.DEAD
    assert [(c.name, c.args) for c in queue.endings()] == [("dead_letter", (delivery, error))]
    assert publisher.made == [] and publisher.opened == [] and publisher.closed == []
    assert model.streamed == []
    assert the_one(logs, "job.dead_lettered")["reason"] == error


async def test_user_cancel_mid_stream_closes_cancelled_and_completes_as_cancelled() -> None:
    outcome, queue, publisher, logs = await stop_mid_stream(StopReason.USER_CANCEL)

    assert outcome is Outcome.CANCELLED
    assert publisher.text == "Partial answer"
    assert publisher.closed == [(Status.CANCELLED, None)]
    [complete] = queue.endings()
    assert complete.name == "complete" and complete.args[1] is JobState.CANCELLED
    the_one(logs, "job.cancelled")


async def test_shutdown_mid_stream_closes_interrupted_with_a_note_and_requeues() -> None:
    outcome, queue, publisher, logs = await stop_mid_stream(StopReason.SHUTDOWN)

    assert outcome is Outcome.INTERRUPTED
    assert publisher.closed == [(Status.INTERRUPTED, INTERRUPTED_NOTE)]
    assert [c.name for c in queue.endings()] == ["requeue_interrupted"]
    the_one(logs, "job.interrupted")


async def test_heartbeat_lost_mid_stream_aborts_without_close_or_transition() -> None:
    outcome, queue, publisher, logs = await stop_mid_stream(StopReason.HEARTBEAT_LOST)

    assert outcome is Outcome.ABANDONED
    assert publisher.aborted == 1
    assert publisher.closed == []
    assert queue.endings() == []
    the_one(logs, "job.abandoned")


async def test_a_cancel_without_a_reason_is_not_absorbed() -> None:
    """A cancel the runtime did not ask for (the loop shutting down) propagates: the
    runner neither closes the message nor moves the job."""
    queue, publisher = FakeQueue(), FakePublisher()
    runner = runner_for(queue, FakeModel(TextDelta("x"), Pause(INF)), publisher)
    task = asyncio.create_task(runner.run(make_delivery(), None, JobControl()))  # type: ignore[arg-type]
    async with asyncio.timeout(3):
        await publisher.first_append.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert publisher.closed == [] and queue.endings() == []


async def test_a_lapsed_lease_from_the_start_sends_nothing_and_moves_nothing() -> None:
    """`control.alive` false (this process's lease may have lapsed): the publisher, which
    the runner hands `alive`, refuses the create; the job is left to the fence."""
    queue, publisher, model = FakeQueue(), FakePublisher(), FakeModel(*answer("never"))
    control = JobControl(alive=lambda: False)

    outcome, logs = await run(queue, model, publisher, make_delivery(), control)

    assert outcome is Outcome.ABANDONED
    assert model.streamed == ["job-1"] and model.closed == ["job-1"]  # asked, then closed
    assert publisher.serial is None and publisher.closed == []
    assert queue.endings() == []
    the_one(logs, "job.abandoned")


# -- the faults from the issue -----------------------------------------------------------


async def test_redis_error_after_the_job_completed_does_not_turn_it_into_a_retry() -> None:
    """Fault: "A Redis error after a job completed turns it into a retry". The answer was
    streamed and its message closed `complete`; then `queue.complete` hit a Redis
    ConnectionError, which used to be read as a job failure: the message was reset to
    `interrupted` and the job retried (the model run again). Now the message stays
    `complete`, nothing else is asked of the queue, and the entry stays pending for the
    orphan check, whose next attempt finds the message finished."""
    queue, publisher, model = FakeQueue(), FakePublisher(), FakeModel(*answer("All ", "done"))
    queue.fail_once["complete"] = redis.exceptions.ConnectionError("Connection reset by peer")

    outcome, logs = await run(queue, model, publisher, make_delivery())

    assert publisher.closed == [(Status.COMPLETE, None)]  # never reset to interrupted
    assert [c.name for c in queue.endings()] == ["complete"]  # no retry, no dead letter
    assert model.streamed == ["job-1"]  # streamed once
    failed = the_one(logs, "job.transition_failed")
    assert failed["outcome"] == "completed"
    assert "Connection reset by peer" in failed["error"]
    assert not events(logs, "job.retry_scheduled") and not events(logs, "job.dead_lettered")
    assert outcome is Outcome.ABANDONED


async def test_redis_error_checking_ownership_leaves_the_job_pending() -> None:
    """Same fault, one step earlier: `owns` (before closing) raises. No close is sent
    without knowing the job is ours, and no transition either."""
    queue, publisher, model = FakeQueue(), FakePublisher(), FakeModel(*answer("All done"))
    queue.fail_once["owns"] = redis.exceptions.ConnectionError("Connection refused")

    _, logs = await run(queue, model, publisher, make_delivery())

    assert publisher.closed == []
    assert queue.endings() == []
    assert model.streamed == ["job-1"]
    the_one(logs, "job.transition_failed")


ACK_ERROR = "no acknowledgement from Ably for the create in 15 s"


@pytest.mark.parametrize("where", ["open", "close"])
async def test_an_ack_timeout_is_not_reported_as_the_job_timeout(where: str) -> None:
    """Fault: "An ack timeout is reported as the job timeout". Ably not acknowledging the
    create (or the closing update) in 15 s raised a TimeoutError, which the runner read as
    its own 300 s deadline: the job's error said "timed out after 300 s". Now the error
    names the missing acknowledgement."""
    queue = FakeQueue()
    publisher = (
        FakePublisher(open_raises=AckTimeout(ACK_ERROR))
        if where == "open"
        else FakePublisher(close_raises=AckTimeout(ACK_ERROR))
    )
    model = FakeModel(*answer("Hello"))

    outcome, logs = await run(queue, model, publisher, make_delivery(), timeout_s=300)

    assert outcome is Outcome.RETRY
    [retry] = queue.endings()
    assert retry.name == "retry"
    error = retry.args[1]
    assert "acknowledgement" in error
    assert "timed out after" not in error
    assert "acknowledgement" in the_one(logs, "job.retry_scheduled")["reason"]
    if where == "open":
        assert model.closed == model.streamed == ["job-1"]  # asked, then closed
        assert publisher.closed == []  # no message was made: nothing to close
    else:
        assert publisher.closed == [(Status.COMPLETE, None)]
        assert "acknowledgement" in the_one(logs, "job.close_failed")["error"]


async def test_a_model_that_stalls_past_the_job_timeout_reports_the_job_timeout() -> None:
    """The other side of the same fault: the job's own deadline says so, with its value."""
    queue, publisher = FakeQueue(), FakePublisher()
    model = FakeModel(TextDelta("Thinking"), Pause(INF))

    outcome, logs = await run(queue, model, publisher, make_delivery(), timeout_s=0.2)

    assert outcome is Outcome.RETRY
    assert publisher.closed == [(Status.INTERRUPTED, "timed out after 0.2 s")]
    assert [(c.name, c.args[1]) for c in queue.endings()] == [("retry", "timed out after 0.2 s")]
    assert the_one(logs, "job.retry_scheduled")["reason"] == "timed out after 0.2 s"


@pytest.mark.parametrize("where", ["open", "close"])
async def test_publisher_abandoned_means_no_transition(where: str) -> None:
    """The publisher refusing to send (the job is someone else's) abandons the job."""
    gone = Abandoned("the job is no longer this worker's")
    publisher = (
        FakePublisher(open_raises=gone) if where == "open" else FakePublisher(close_raises=gone)
    )
    queue = FakeQueue()

    outcome, logs = await run(queue, FakeModel(*answer("Hello")), publisher, make_delivery())

    assert outcome is Outcome.ABANDONED
    assert queue.endings() == []
    assert publisher.aborted == 1
    the_one(logs, "job.abandoned")


async def test_fenced_at_the_end_aborts_without_close_or_transition() -> None:
    """Fencing: the job is no longer this worker's when it comes to close the message."""
    queue, publisher = FakeQueue(), FakePublisher()
    queue.owns_result = False

    outcome, logs = await run(queue, FakeModel(*answer("Hello")), publisher, make_delivery())

    assert outcome is Outcome.ABANDONED
    assert publisher.aborted == 1
    assert publisher.closed == []
    assert queue.endings() == []
    assert the_one(logs, "job.fenced")["step"] == "close"
    assert not events(logs, "job.completed")


@pytest.mark.parametrize(
    ("script", "refused"),
    [
        pytest.param(answer("Hello"), "complete", id="complete"),
        pytest.param([Failed("boom", retryable=True)], "retry", id="retry"),
        pytest.param([Failed("boom", retryable=False)], "dead_letter", id="dead_letter"),
    ],
)
async def test_a_refused_transition_is_fenced_and_not_followed_by_another(
    script: list[Any], refused: str
) -> None:
    queue, publisher = FakeQueue(), FakePublisher()
    queue.refuse.add(refused)

    outcome, logs = await run(queue, FakeModel(*script), publisher, make_delivery())

    assert outcome is Outcome.ABANDONED
    assert [c.name for c in queue.endings()] == [refused]  # one attempt, no second transition
    the_one(logs, "job.fenced")
    assert publisher.aborted == 1


async def test_a_refused_serial_save_stops_the_answer_before_it_streams() -> None:
    queue, publisher, model = FakeQueue(), FakePublisher(), FakeModel(*answer("Hello"))
    queue.refuse.add("set_response_serial")

    outcome, logs = await run(queue, model, publisher, make_delivery())

    assert outcome is Outcome.ABANDONED
    assert model.streamed == ["job-1"] and model.closed == ["job-1"]  # asked, then closed
    assert publisher.closed == [] and queue.endings() == []
    assert the_one(logs, "job.fenced")["step"] == "set_response_serial"


@pytest.mark.parametrize(
    ("found", "state", "event"),
    [
        (Status.COMPLETE, JobState.COMPLETED, "job.completed"),
        (Status.CANCELLED, JobState.CANCELLED, "job.cancelled"),
    ],
)
async def test_already_finished_on_the_channel_is_acknowledged_not_rerun(
    found: Status, state: JobState, event: str
) -> None:
    """Fault: "Already finished on the channel". A worker closed the message and died
    before acknowledging; the reclaimed delivery must not run the model again (a second
    answer, or the first one overwritten): the job is acknowledged as it was."""
    queue, publisher = FakeQueue(), FakePublisher(finished=found)
    model = FakeModel(*answer("A second answer"))
    delivery = make_delivery(attempt=2, reclaimed=True)

    outcome, logs = await run(queue, model, publisher, delivery)

    assert publisher.opened == [(None, True)]  # it looked for the earlier attempt's message
    assert model.streamed == []
    assert publisher.closed == [] and publisher.text == ""
    [complete] = queue.endings()
    assert complete.name == "complete" and complete.args[1] is state
    assert the_one(logs, event)["found_finished"] is True
    assert outcome is (Outcome.COMPLETED if state is JobState.COMPLETED else Outcome.CANCELLED)


async def test_a_retry_reopens_the_saved_message() -> None:
    """A retry with the serial its first attempt saved reopens that message (no new one,
    no second save of the same serial) and closes it complete."""
    queue, publisher = FakeQueue(), FakePublisher()
    delivery = make_delivery(attempt=2, response_serial="serial-0")

    outcome, logs = await run(queue, FakeModel(*answer("Again")), publisher, delivery)

    assert outcome is Outcome.COMPLETED
    assert publisher.opened == [("serial-0", True)]
    assert queue.called("set_response_serial") == []
    assert publisher.closed == [(Status.COMPLETE, None)]
    assert the_one(logs, "job.started")["reopened"] is True


# -- continuing a background model response ----------------------------------------------
# MODEL_BACKGROUND: the record keeps the model response and how much of its text the
# message holds; a later attempt continues it into the same message, or regenerates.


def recorded(queue: FakeQueue, response_id: str, sequence: int, chars: int) -> None:
    """What an earlier attempt left in the job record."""
    queue.records["job-1"] = {
        "state": "running",
        "model_response_id": response_id,
        "model_sequence": str(sequence),
        "model_chars": str(chars),
    }


def resumed_delivery() -> Delivery:
    """A reclaimed delivery whose first attempt saved its message's serial."""
    return make_delivery(attempt=2, reclaimed=True, response_serial="serial-0")


async def test_a_background_answer_records_its_model_response_at_once_then_acked_progress() -> None:
    queue, publisher = FakeQueue(), FakePublisher()
    model = FakeModel(*background_answer("resp_1", "Hel", "lo", " world"))

    outcome, _ = await run(queue, model, publisher, make_delivery())

    assert outcome is Outcome.COMPLETED
    assert queue.progress_writes() == [
        ("resp_1", 0, 0),  # at `response.created`, before any of its text was sent
        ("resp_1", 5, 3),  # then (sequence, chars) of each delta acknowledged
        ("resp_1", 6, 5),
        ("resp_1", 7, 11),
    ]
    first_write = queue.called("record_progress")[0]
    assert first_write.at <= queue.called("complete")[0].at


async def test_progress_is_recorded_only_as_far_as_ably_has_acknowledged() -> None:
    queue, publisher = FakeQueue(), FakePublisher(acks_held=True)
    model = FakeModel(*background_answer("resp_1", "Hel", "lo"))

    await run(queue, model, publisher, make_delivery())

    assert queue.progress_writes() == [("resp_1", 0, 0)]  # no delta was acknowledged


async def test_progress_writes_are_throttled() -> None:
    """At most one write per interval, each as far as acknowledged at the time."""
    queue, publisher, clock = FakeQueue(), FakePublisher(), ManualClock()
    delivery = make_delivery()
    progress = Progress(queue, delivery, publisher, interval_s=0.5, clock=clock)  # type: ignore[arg-type]
    await publisher.open()
    assert await progress.started("resp_1", 0)
    for sequence, (delta, at) in enumerate([("a", 0.1), ("bb", 0.3), ("ccc", 0.6), ("d", 0.7)]):
        clock.now = at
        publisher.append(delta)
        assert await progress.delta(5 + sequence, len(publisher.text))
    assert queue.progress_writes() == [("resp_1", 0, 0), ("resp_1", 7, 6)]


async def test_a_foreground_answer_records_no_model_response() -> None:
    queue, publisher = FakeQueue(), FakePublisher()
    await run(queue, FakeModel(*answer("Hel", "lo")), publisher, make_delivery())
    assert queue.progress_writes() == []


async def test_a_reclaimed_job_continues_its_model_response_into_the_message_as_it_stands() -> None:
    """No reset, no second model call: the message keeps its text and the same model
    response goes on after the recorded sequence number."""
    queue, publisher = FakeQueue(), FakePublisher(holds="Hello")
    recorded(queue, "resp_1", 6, 5)
    model = FakeModel(*answer("A second answer"), resumed=resumed_deltas(" wor", "ld", after=6))

    outcome, logs = await run(queue, model, publisher, resumed_delivery())

    assert outcome is Outcome.COMPLETED
    assert model.streamed == []  # the model was not asked again
    assert model.resumes == [("resp_1", 6)]
    assert publisher.opened == []  # never reopened with a reset
    assert publisher.continued == [("serial-0", 5)]
    assert publisher.text == "Hello world"
    assert publisher.closed == [(Status.COMPLETE, None)]  # with the full text
    assert [c.name for c in queue.endings()] == ["complete"]
    started = the_one(logs, "job.started")
    assert started["continued"] is True and started["model_response_id"] == "resp_1"
    assert queue.progress_writes()[-1] == ("resp_1", 8, 11)


async def test_text_the_message_holds_past_the_record_is_not_sent_again() -> None:
    """Appends acknowledged after the last record: the message holds "Hello wo" where
    the record says 5 characters. The resumed " wor" is taken as shown, not repeated."""
    queue, publisher = FakeQueue(), FakePublisher(holds="Hello wo")
    recorded(queue, "resp_1", 6, 5)
    model = FakeModel(resumed=resumed_deltas(" wor", "ld", after=6))

    outcome, _ = await run(queue, model, publisher, resumed_delivery())

    assert outcome is Outcome.COMPLETED
    assert publisher.text == "Hello world"
    assert publisher.sent == "rld"  # only what the message did not hold
    assert publisher.replaced == 0


@pytest.mark.parametrize(
    "resumed",
    [
        pytest.param([Gone("model API returned HTTP 404: not found")], id="gone"),
        pytest.param(
            [TextDelta(" wor", 7), Gone("the model response failed upstream")],
            id="failed-after-some-text",
        ),
        pytest.param([Gone("the model response is cancelled")], id="cancelled"),
    ],
)
async def test_a_model_response_that_cannot_be_continued_is_regenerated(
    resumed: list[Any],
) -> None:
    """Gone, failed or cancelled upstream: the record forgets it first (before the
    message is reset), then the message is reset and the model asked again."""
    queue, publisher = FakeQueue(), FakePublisher(holds="Hello")
    recorded(queue, "resp_1", 6, 5)
    model = FakeModel(*background_answer("resp_2", "Fresh ", "answer"), resumed=resumed)
    opened_with_record: list[dict[str, str]] = []
    open_first = publisher.open

    async def open_checking(serial: str | None = None, *, resuming: bool = False) -> Any:
        opened_with_record.append(dict(queue.records["job-1"]))
        return await open_first(serial, resuming=resuming)

    publisher.open = open_checking  # type: ignore[method-assign]

    outcome, logs = await run(queue, model, publisher, resumed_delivery())

    assert outcome is Outcome.COMPLETED
    assert model.resumes == [("resp_1", 6)] and model.streamed == ["job-1"]
    assert "model_response_id" not in opened_with_record[0]  # forgotten before the reset
    assert publisher.opened == [("serial-0", True)]  # the reset, as without a record
    assert publisher.text == "Fresh answer"
    writes = queue.progress_writes()
    forgotten = writes.index((None, -1, 0))
    assert writes[forgotten + 1] == ("resp_2", 0, 0)
    assert all(w[0] == "resp_2" for w in writes[forgotten + 1 :])
    assert queue.records["job-1"]["model_response_id"] == "resp_2"
    assert the_one(logs, "job.continue_failed")["model_response_id"] == "resp_1"


async def test_a_message_missing_recorded_text_is_regenerated_not_continued() -> None:
    """The message holds less than the record says was acknowledged: continuing would
    lose text, so the answer is regenerated (and the model response not resumed)."""
    queue, publisher = FakeQueue(), FakePublisher(holds="Hel")
    recorded(queue, "resp_1", 6, 5)
    model = FakeModel(*background_answer("resp_2", "Fresh"), resumed=resumed_deltas("x", after=6))

    outcome, logs = await run(queue, model, publisher, resumed_delivery())

    assert outcome is Outcome.COMPLETED
    assert model.resumes == [] and model.streamed == ["job-1"]
    assert publisher.text == "Fresh"
    assert "recorded text" in the_one(logs, "job.continue_failed")["reason"]


async def test_a_continued_message_already_closed_complete_is_acknowledged() -> None:
    queue, publisher = FakeQueue(), FakePublisher(holds="Done.", finished=Status.COMPLETE)
    recorded(queue, "resp_1", 9, 5)
    model = FakeModel(*answer("again"), resumed=resumed_deltas("x", after=9))

    outcome, logs = await run(queue, model, publisher, resumed_delivery())

    assert outcome is Outcome.COMPLETED
    assert model.resumes == [] and model.streamed == []
    assert publisher.closed == []
    assert the_one(logs, "job.completed")["found_finished"] is True


async def test_a_resumed_stream_that_breaks_is_retried_and_keeps_its_record() -> None:
    """A connection cut while continuing: retried as any break, the record kept (and
    moved on) so that the next attempt continues further on."""
    queue, publisher = FakeQueue(), FakePublisher(holds="Hello")
    recorded(queue, "resp_1", 6, 5)
    cut = Failed("model connection failed: APIConnectionError", retryable=True)
    model = FakeModel(resumed=[*resumed_deltas(" wor", after=6, done=False), cut])

    outcome, _ = await run(queue, model, publisher, resumed_delivery())

    assert outcome is Outcome.RETRY
    assert publisher.closed == [(Status.INTERRUPTED, cut.error)]
    assert (None, -1, 0) not in queue.progress_writes()
    assert queue.records["job-1"]["model_sequence"] == "7"
    assert queue.records["job-1"]["model_chars"] == "9"


@pytest.mark.parametrize("when", ["started", "forget"])
async def test_a_refused_progress_write_is_fenced(when: str) -> None:
    queue, publisher = FakeQueue(), FakePublisher(holds="Hel")
    queue.refuse.add("record_progress")
    model = FakeModel(*background_answer("resp_2", "Fresh"))
    delivery = make_delivery()
    if when == "forget":  # the message lacks recorded text: the record is to be forgotten
        recorded(queue, "resp_1", 6, 5)
        delivery = resumed_delivery()

    outcome, logs = await run(queue, model, publisher, delivery)

    assert outcome is Outcome.ABANDONED
    assert the_one(logs, "job.fenced")["step"] == "record_progress"
    assert queue.endings() == [] and publisher.closed == []
    assert publisher.text == ""  # nothing of the answer was sent
    if when == "forget":
        assert publisher.opened == []  # the message was not reset either


async def test_a_user_cancel_cancels_the_background_response_upstream() -> None:
    model = FakeModel(Started("resp_1", 0), TextDelta("Partial ", 5), Pause(INF))
    outcome, _, publisher, logs = await stop_mid_stream(StopReason.USER_CANCEL, model)

    assert outcome is Outcome.CANCELLED
    assert publisher.closed == [(Status.CANCELLED, None)]
    assert model.cancelled == ["resp_1"]
    assert the_one(logs, "job.model_cancelled")["model_response_id"] == "resp_1"


async def test_an_upstream_cancel_that_fails_is_logged_and_changes_nothing() -> None:
    model = FakeModel(
        Started("resp_1", 0), TextDelta("Partial ", 5), Pause(INF),
        cancel_error="no answer in 3 s",
    )  # fmt: skip
    outcome, queue, _, logs = await stop_mid_stream(StopReason.USER_CANCEL, model)

    assert outcome is Outcome.CANCELLED
    assert [c.args[1] for c in queue.endings()] == [JobState.CANCELLED]
    assert the_one(logs, "job.model_cancel_failed")["error"] == "no answer in 3 s"


@pytest.mark.parametrize("reason", [StopReason.SHUTDOWN, StopReason.HEARTBEAT_LOST])
async def test_a_stop_that_is_not_a_users_cancel_leaves_the_response_running(
    reason: StopReason,
) -> None:
    """The next attempt (a successor, a reclaimer) continues it."""
    model = FakeModel(Started("resp_1", 0), TextDelta("Partial ", 5), Pause(INF))
    _, queue, _, _ = await stop_mid_stream(reason, model)

    assert model.cancelled == []
    assert queue.records["job-1"]["model_response_id"] == "resp_1"
