"""A fresh answer's model request goes out while its channel message is being created
(`worker.model.Prefetched`): the model's first-token delay overlaps the create's
acknowledgement and the serial's save. Only the first event is fetched ahead; nothing is
lost or reordered; a request whose answer is not streamed after all is closed. Resumed
deliveries and background responses ask the model after the message is open, as before.
Doubles of our own seams only (`tests.unit.doubles`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.unit.doubles import (
    FakeModel,
    FakePublisher,
    FakeQueue,
    Pause,
    answer,
    background_answer,
    make_delivery,
    wait_until,
)
from worker.job_runner import JobControl, JobRunner, Outcome, StopReason
from worker.model import Done, ModelEvent, Prefetched, TextDelta
from worker.queue import Delivery
from worker.transport.acks import AckTimeout
from worker.transport.contract import Status
from worker.transport.publisher import Abandoned

INF = float("inf")


def runner_for(queue: FakeQueue, model: FakeModel, publisher: FakePublisher) -> JobRunner:
    return JobRunner(
        queue,  # type: ignore[arg-type]
        model,  # type: ignore[arg-type]
        timeout_s=30.0,
        make_publisher=publisher.make,
        progress_interval_s=0.0,
    )


def start(
    queue: FakeQueue,
    model: FakeModel,
    publisher: FakePublisher,
    delivery: Delivery,
    control: JobControl | None = None,
) -> asyncio.Task[Outcome]:
    runner = runner_for(queue, model, publisher)
    return asyncio.create_task(runner.run(delivery, None, control or JobControl()))  # type: ignore[arg-type]


async def run(
    queue: FakeQueue, model: FakeModel, publisher: FakePublisher, delivery: Delivery
) -> tuple[Outcome, list[MutableMapping[str, Any]]]:
    with capture_logs() as logs:
        async with asyncio.timeout(5):
            outcome = await start(queue, model, publisher, delivery)
    return outcome, logs


def gated() -> tuple[FakePublisher, asyncio.Event]:
    """A publisher whose create is acknowledged only when the test sets the event."""
    publisher, gate = FakePublisher(), asyncio.Event()
    publisher.open_gate = gate
    return publisher, gate


# -- a fresh answer: the model first --------------------------------------------------


async def test_a_fresh_answer_asks_the_model_before_its_message_is_created() -> None:
    queue, (publisher, gate) = FakeQueue(), gated()
    model = FakeModel(*answer("Hel", "lo", " world"))

    with capture_logs() as logs:
        task = start(queue, model, publisher, make_delivery())
        async with asyncio.timeout(3):  # never set if the model waited for the create
            await model.stream_started.wait()
        assert publisher.opened == [(None, False)] and publisher.serial is None
        await wait_until(lambda: len(model.yielded) == 1)
        for _ in range(5):  # a few turns of the loop: nothing more is read meanwhile
            await asyncio.sleep(0)
        assert model.yielded == [TextDelta("Hel")]  # only the first event, held
        assert publisher.text == "" and publisher.deltas == 0
        gate.set()
        async with asyncio.timeout(3):
            outcome = await task

    assert outcome is Outcome.COMPLETED
    assert publisher.text == "Hello world"  # complete and in order: none dropped
    assert publisher.deltas == 3
    assert publisher.closed == [(Status.COMPLETE, None)]
    assert model.streamed == ["job-1"]  # asked once
    names = [entry["event"] for entry in logs]
    assert names == ["job.received", "job.started", "job.first_token", "job.completed"]


async def test_the_first_token_is_timed_when_consumed_not_when_prefetched() -> None:
    """`ttft_ms` measures the text reaching the message: a first token prefetched while
    the create waits counts from when the message could take it."""
    queue, (publisher, gate) = FakeQueue(), gated()
    model = FakeModel(*answer("Hi"))

    with capture_logs() as logs:
        task = start(queue, model, publisher, make_delivery())
        await wait_until(lambda: len(model.yielded) == 1)
        await asyncio.sleep(0.2)
        gate.set()
        async with asyncio.timeout(3):
            await task

    [first] = [entry for entry in logs if entry["event"] == "job.first_token"]
    assert first["ttft_ms"] >= 200


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([TextDelta("a"), TextDelta("b"), TextDelta("c"), Done()], id="deltas"),
        pytest.param([Pause(0.05), TextDelta("slow "), TextDelta("first"), Done()], id="slow"),
        pytest.param([Done(output_tokens=0)], id="done-first"),
    ],
)
async def test_every_event_arrives_once_and_in_order(script: list[Any]) -> None:
    queue, publisher, model = FakeQueue(), FakePublisher(), FakeModel(*script)

    outcome, _ = await run(queue, model, publisher, make_delivery())

    assert outcome is Outcome.COMPLETED
    expected = "".join(step.text for step in script if isinstance(step, TextDelta))
    assert publisher.text == expected
    assert publisher.deltas == sum(isinstance(step, TextDelta) for step in script)


async def test_a_model_stream_that_yields_nothing_is_retried_as_before() -> None:
    queue, publisher = FakeQueue(), FakePublisher()

    outcome, _ = await run(queue, FakeModel(), publisher, make_delivery())

    assert outcome is Outcome.RETRY
    assert publisher.closed == [(Status.INTERRUPTED, "model stream ended without a result")]


# -- an answer not streamed after all: the request is closed ---------------------------


@pytest.mark.parametrize("first", ["fetched", "in-flight"])
@pytest.mark.parametrize(
    ("case", "outcome", "transition"),
    [
        pytest.param("finished", Outcome.COMPLETED, "complete", id="found-finished"),
        pytest.param("ack-timeout", Outcome.RETRY, "retry", id="open-raises"),
        pytest.param("abandoned", Outcome.ABANDONED, None, id="open-abandoned"),
        pytest.param("fenced", Outcome.ABANDONED, None, id="serial-fenced"),
    ],
)
async def test_an_answer_not_streamed_closes_its_model_request(
    first: str, case: str, outcome: Outcome, transition: str | None
) -> None:
    """Open finds the message finished, open fails, or the serial's save is refused: the
    outcome is as it was, nothing of the answer is sent, and the model's stream is closed
    (whether its first event had arrived or was still awaited)."""
    queue = FakeQueue()
    publisher = {
        "finished": FakePublisher(finished=Status.COMPLETE),
        "ack-timeout": FakePublisher(open_raises=AckTimeout("no acknowledgement")),
        "abandoned": FakePublisher(open_raises=Abandoned("no longer ours")),
        "fenced": FakePublisher(),
    }[case]
    if case == "fenced":
        queue.refuse.add("set_response_serial")
    script = answer("Never ", "sent") if first == "fetched" else [Pause(INF), *answer("x")]
    model = FakeModel(*script)

    result, logs = await run(queue, model, publisher, make_delivery())

    assert result is outcome
    assert [c.name for c in queue.endings()] == ([transition] if transition else [])
    assert model.closed == ["job-1"]  # closed by the time the run returns
    assert model.yielded == ([TextDelta("Never ")] if first == "fetched" else [])
    assert publisher.text == "" and publisher.deltas == 0
    assert publisher.closed == []
    assert not [entry for entry in logs if entry["event"] == "job.first_token"]
    if case == "fenced":
        [fenced] = [entry for entry in logs if entry["event"] == "job.fenced"]
        assert fenced["step"] == "set_response_serial"


@pytest.mark.parametrize(
    ("reason", "outcome", "transition"),
    [
        (StopReason.USER_CANCEL, Outcome.CANCELLED, "complete"),
        (StopReason.SHUTDOWN, Outcome.INTERRUPTED, "requeue_interrupted"),
        (StopReason.HEARTBEAT_LOST, Outcome.ABANDONED, None),
    ],
)
async def test_a_job_stopped_while_its_message_is_created_closes_its_model_request(
    reason: StopReason, outcome: Outcome, transition: str | None
) -> None:
    queue, (publisher, _) = FakeQueue(), gated()
    model = FakeModel(Pause(INF), *answer("never"))
    control = JobControl()

    with capture_logs():
        task = start(queue, model, publisher, make_delivery(), control)
        async with asyncio.timeout(3):
            await model.stream_started.wait()
        await wait_until(lambda: bool(publisher.opened))
        control.reason = reason
        task.cancel()
        async with asyncio.timeout(3):
            result = await task

    assert result is outcome
    assert model.closed == ["job-1"]
    assert [c.name for c in queue.endings()] == ([transition] if transition else [])
    assert publisher.text == ""


async def test_a_foreign_cancel_closes_the_model_request_and_propagates() -> None:
    queue, (publisher, _) = FakeQueue(), gated()
    model = FakeModel(Pause(INF), *answer("never"))

    task = start(queue, model, publisher, make_delivery())
    async with asyncio.timeout(3):
        await model.stream_started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert model.closed == ["job-1"]
    assert queue.endings() == [] and publisher.closed == []


# -- resumed deliveries and background responses: unchanged ---------------------------


@pytest.mark.parametrize(
    ("delivery", "model"),
    [
        pytest.param(make_delivery(attempt=2), FakeModel(*answer("Again")), id="attempt-2"),
        pytest.param(make_delivery(reclaimed=True), FakeModel(*answer("Again")), id="reclaimed"),
        pytest.param(
            make_delivery(response_serial="serial-0"), FakeModel(*answer("Again")), id="serial"
        ),
        pytest.param(
            make_delivery(), FakeModel(*background_answer("resp_1", "Again")), id="background"
        ),
        pytest.param(
            make_delivery(), FakeModel(*answer("Again"), background=True), id="background-flag"
        ),
    ],
)
async def test_the_model_is_asked_after_the_message_is_open(
    delivery: Delivery, model: FakeModel
) -> None:
    queue, (publisher, gate) = FakeQueue(), gated()

    with capture_logs():
        task = start(queue, model, publisher, delivery)
        await wait_until(lambda: bool(publisher.opened))
        await asyncio.sleep(0.05)
        assert model.streamed == []  # not while the create is awaited
        gate.set()
        async with asyncio.timeout(3):
            outcome = await task

    assert outcome is Outcome.COMPLETED
    assert model.streamed == ["job-1"]
    assert publisher.text == "Again"


# -- Prefetched itself ----------------------------------------------------------------


async def events_of(*steps: ModelEvent | BaseException) -> AsyncIterator[ModelEvent]:
    for step in steps:
        await asyncio.sleep(0)
        if isinstance(step, BaseException):
            raise step
        yield step


@contextlib.contextmanager
def prefetch_loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What the loop reports about the prefetch's own task while the block runs (the
    loop is shared with other tests: their leftovers are not this test's)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    errors: list[dict[str, Any]] = []

    def handler(_: Any, context: dict[str, Any]) -> None:
        task = context.get("task") or context.get("future")
        if getattr(task, "get_name", lambda: "")() == "model-prefetch":
            errors.append(context)

    loop.set_exception_handler(handler)
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


async def test_an_exception_fetching_the_first_event_is_raised_at_iteration() -> None:
    with prefetch_loop_errors() as errors:
        prefetched = Prefetched(events_of(RuntimeError("the stream broke")))
        await asyncio.sleep(0.01)  # the fetch has failed by now

        with pytest.raises(RuntimeError, match="the stream broke"):
            async for _ in prefetched:
                pass
        await prefetched.aclose()
        del prefetched
        gc.collect()
        await asyncio.sleep(0)
    assert errors == []


async def test_an_exception_after_the_first_event_is_raised_in_order() -> None:
    prefetched = Prefetched(events_of(TextDelta("a"), RuntimeError("cut")))
    seen: list[ModelEvent] = []
    with pytest.raises(RuntimeError, match="cut"):
        async for event in prefetched:
            seen.append(event)
    assert seen == [TextDelta("a")]


async def test_a_failed_fetch_that_is_never_iterated_is_not_reported_unretrieved() -> None:
    with prefetch_loop_errors() as errors:
        prefetched = Prefetched(events_of(RuntimeError("the stream broke")))
        await asyncio.sleep(0.01)

        await prefetched.aclose()
        del prefetched
        gc.collect()
        await asyncio.sleep(0)
    assert errors == []


async def test_closing_before_the_fetch_ran_leaves_nothing_running() -> None:
    model = FakeModel(*answer("x"))
    prefetched = Prefetched(model.stream(make_delivery().job))  # type: ignore[arg-type]
    await prefetched.aclose()  # at once: the fetch never started
    assert model.streamed == [] and model.yielded == []
    assert [t for t in asyncio.all_tasks() if t.get_name() == "model-prefetch"] == []


async def test_closing_twice_and_after_the_end_is_harmless() -> None:
    model = FakeModel(*answer("a", "b"))
    prefetched = Prefetched(model.stream(make_delivery().job))  # type: ignore[arg-type]
    seen = [event async for event in prefetched]
    assert seen == answer("a", "b")
    await prefetched.aclose()
    await prefetched.aclose()
    assert model.closed == []  # it had played its whole script
