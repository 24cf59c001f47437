"""The AI Transport wire (`worker.transport.ait`, through `contract`): the exact shapes the
@ably/ai-transport 0.8.0 client reads and Sockudo accepts, what users' `ai-input` and
`ai-cancel` read as, when the runner starts and ends a run, and how the runtime applies an
`ai-cancel`. Doubles of our own seams only (`tests.unit.doubles`, and the run lifecycle
here); the runtime's cancel listener uses the real local Ably, as `test_runtime` does."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from ably.types.message import Message
from structlog.testing import capture_logs

from tests.unit import test_runtime
from tests.unit.doubles import (
    FakeModel,
    FakePublisher,
    FakeQueue,
    FakeRunner,
    answer,
    make_delivery,
    wait_until,
)
from worker.devstack.ably import LocalAbly
from worker.job_runner import JobControl, JobRunner, Outcome, StopReason
from worker.model import Failed, TextDelta
from worker.runtime import Worker
from worker.transport import ait, contract
from worker.transport.client import realtime_client
from worker.transport.contract import Headers, Status
from worker.transport.pool import ConnectionPool

# What Sockudo 5.2.0 accepts in `extras.ai.transport` (validate_transport_key_domain).
SOCKUDO_TRANSPORT_KEYS = {
    "run-id", "input-client-id", "input-codec-message-id", "codec-message-id", "parent",
    "fork-of", "stream-id", "invocation-id", "event-id", "step-id", "step-start-serial",
    "steer-codec-message-ids", "msg-regenerate", "supersedes", "error-code", "model",
    "run-client-id", "step-client-id", "run-reason", "step-reason", "stream", "discrete",
    "status", "role", "error-message",
}  # fmt: skip
NON_EMPTY = SOCKUDO_TRANSPORT_KEYS - {"run-client-id", "step-client-id", "error-message"}

RUN = ait.AitRun("job-7", input_codec_message_id="u-1", client_id="alice")


def assert_sockudo_accepts(transport: dict[str, str]) -> None:
    assert set(transport) <= SOCKUDO_TRANSPORT_KEYS
    for key, value in transport.items():
        assert isinstance(value, str) and len(value.encode()) <= ait.MAX_VALUE_BYTES
        assert value or key not in NON_EMPTY, key
    assert transport.get("status", "streaming") in ("streaming", "complete", "cancelled")
    assert transport.get("run-reason", "complete") in ("complete", "cancelled", "error")


def test_the_answer_message_carries_the_full_extras_ai_beside_our_headers() -> None:
    headers = Headers(response_id="job-7", model="m", metadata={"k": "v"}, ait=RUN)
    create = contract.response_create(headers)
    assert create.name == "ai-output" and create.id == "job-7:response" and create.data == ""
    assert create.extras["headers"] == {"k": "v", "responseId": "job-7", "status": "streaming",
                                        "model": "m"}  # fmt: skip
    assert create.extras["ai"] == {
        "transport": {
            "role": "assistant", "codec-message-id": "job-7:answer", "run-id": "run:job-7",
            "run-client-id": "alice", "input-codec-message-id": "u-1",
            "input-client-id": "alice", "parent": "u-1", "stream": "true",
            "status": "streaming", "stream-id": "job-7:text",
        },
        "codec": {"kind": "text", "id": "job-7:text", "messageId": "job-7:answer"},
    }  # fmt: skip
    append = contract.response_append("s1", "delta", headers)
    assert append.extras == create.extras  # every append resends all of it
    assert_sockudo_accepts(create.extras["ai"]["transport"])


@pytest.mark.parametrize(
    ("status", "spelled"),
    [
        (Status.STREAMING, "streaming"),
        (Status.COMPLETE, "complete"),
        (Status.CANCELLED, "cancelled"),
        (Status.FAILED, "cancelled"),  # closed, the text kept; the run ends `error`
        (Status.INTERRUPTED, "streaming"),  # not a close: the retry finishes the message
    ],
)
def test_each_status_has_its_transport_spelling(status: Status, spelled: str) -> None:
    headers = Headers(response_id="job-7", model="m", ait=RUN).with_status(status, "why")
    closing = contract.response_replace("s1", "whole text", headers)
    assert closing.extras["ai"]["transport"]["status"] == spelled
    assert closing.extras["headers"]["status"] == str(status)  # ours: unchanged
    assert closing.data == "whole text"


def test_the_seed_contract_is_unchanged_without_ait() -> None:
    headers = Headers(response_id="job-7", model="m")
    create = contract.response_create(headers)
    assert create.name == "response" and set(create.extras) == {"headers"}


def test_run_start_and_run_end() -> None:
    start = RUN.run_start("job-7")
    assert start.name == "ai-run-start" and start.id == "job-7:ai-run-start"
    assert start.extras["ai"]["transport"] == {
        "run-id": "run:job-7", "run-client-id": "alice", "parent": "u-1",
        "input-codec-message-id": "u-1", "input-client-id": "alice",
    }  # fmt: skip
    end = RUN.run_end("job-7", "error", "model failed: " + "é" * 300)
    transport = end.extras["ai"]["transport"]
    assert end.name == "ai-run-end" and transport["run-reason"] == "error"
    assert transport["error-code"] == "104008" and int(transport["error-code"])
    assert transport["error-message"].startswith("model failed: ")
    assert "parent" not in transport
    for message in (start, end, RUN.run_end("job-7", "complete")):
        assert_sockudo_accepts(message.extras["ai"]["transport"])
    assert "error-code" not in RUN.run_end("job-7", "cancelled").extras["ai"]["transport"]


def test_a_run_without_a_known_input_or_user_leaves_those_ids_off() -> None:
    run = ait.AitRun("job-8")
    transport = run.output_extras("streaming")["transport"]
    assert transport["run-client-id"] == ""
    assert not {"parent", "input-codec-message-id", "input-client-id"} & set(transport)
    assert_sockudo_accepts(transport)
    too_long = ait.AitRun("job-9", client_id="x" * 300)
    assert "input-client-id" not in too_long.output_extras("streaming")["transport"]


# -- what users send --------------------------------------------------------------------


@dataclass
class Wire:
    """An inbound channel message, as ably-python hands it over."""

    name: str
    data: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    serial: str = "01"
    client_id: str | None = "alice"
    id: str = "msg-1"
    timestamp: int = 1


def ai_input(text: Any = "hello", part: str = "text", **transport: str) -> Wire:
    headers = {"role": "user", "codec-message-id": "u-1", "event-id": "e-1",
               "stream": "false", "discrete": "true", **transport}  # fmt: skip
    codec = {"kind": "user-message", "partType": part, "messageId": "ui-1"}
    return Wire("ai-input", text, {"ai": {"transport": headers, "codec": codec}})


def test_an_ai_input_text_part_reads_as_a_prompt_on_the_ait_wire() -> None:
    user = contract.user_message(ai_input("hello"))
    assert user is not None and user.kind == "prompt" and user.wire == "ait"
    assert (user.text, user.input_codec_message_id, user.input_event_id) == ("hello", "u-1", "e-1")
    assert user.client_id == "alice"  # Ably's, never a header
    file_part = contract.user_message(ai_input("https://x/y.png", part="file"))
    assert file_part is not None and file_part.text is None


def test_inputs_that_are_not_new_user_messages_are_not_prompts() -> None:
    assert contract.user_message(ai_input(**{"run-id": "run:j"})) is None  # a continuation
    assert contract.user_message(ai_input(role="assistant")) is None  # a tool-result fork
    tool = Wire("ai-input", "{}", {"ai": {"transport": {"codec-message-id": "a"},
                                          "codec": {"kind": "tool-result"}}})  # fmt: skip
    assert contract.user_message(tool) is None


def test_an_ai_cancel_names_a_run_or_an_input() -> None:
    by_input = Wire("ai-cancel", extras={"ai": {"transport": {"input-codec-message-id": "u-1",
                                                              "event-id": "e"}}})  # fmt: skip
    user = contract.user_message(by_input)
    assert user is not None and user.kind == "cancel" and user.wire == "ait"
    assert (user.input_codec_message_id, user.run_id) == ("u-1", None)
    by_run = Wire("ai-cancel", extras={"ai": {"transport": {"run-id": "run:job-7"}}})
    user = contract.user_message(by_run)
    assert user is not None and ait.job_id_of_run(user.run_id or "") == "job-7"
    assert contract.user_message(Wire("ai-cancel", extras={"ai": {"transport": {}}})) is None
    assert ait.job_id_of_run("someone-elses-run") is None


# -- the runner: when a run starts and ends ----------------------------------------------


class FakeLifecycle:
    """`RunLifecycle`, recording the events the runner publishes."""

    def __init__(self) -> None:
        self.started = False
        self.events: list[tuple[str, str | None]] = []

    def make(self, job: Any, lease: Any, alive: Any) -> FakeLifecycle:
        return self

    async def start(self) -> None:
        self.started = True
        self.events.append(("start", None))

    async def end(self, reason: str, error: str | None = None) -> None:
        self.events.append((reason, error))


async def run_ait(model: FakeModel, delivery: Any, queue: FakeQueue | None = None) -> tuple[
    Outcome, FakeLifecycle, FakePublisher
]:  # fmt: skip
    lifecycle, publisher = FakeLifecycle(), FakePublisher()
    runner = JobRunner(
        queue or FakeQueue(),  # type: ignore[arg-type]
        model,  # type: ignore[arg-type]
        timeout_s=30,
        make_publisher=publisher.make,
        make_lifecycle=lifecycle.make,  # type: ignore[arg-type]
        progress_interval_s=0,
    )
    outcome = await runner.run(delivery, None, JobControl())  # type: ignore[arg-type]
    return outcome, lifecycle, publisher


async def test_a_completed_run_starts_before_the_answer_and_ends_after_its_close() -> None:
    outcome, lifecycle, publisher = await run_ait(FakeModel(*answer("Hi", "!")), make_delivery())
    assert outcome is Outcome.COMPLETED
    assert lifecycle.events == [("start", None), ("complete", None)]
    assert publisher.closed == [(Status.COMPLETE, None)]


async def test_a_dead_job_ends_its_run_in_error_and_a_retry_ends_none() -> None:
    failing = Failed("model refused: 401", retryable=False)
    outcome, lifecycle, _ = await run_ait(FakeModel(TextDelta("x"), failing), make_delivery())
    assert outcome is Outcome.DEAD
    assert lifecycle.events == [("start", None), ("error", "model refused: 401")]

    again = Failed("model stream broke", retryable=True)
    outcome, lifecycle, _ = await run_ait(FakeModel(TextDelta("x"), again), make_delivery())
    assert outcome is Outcome.RETRY and lifecycle.events == [("start", None)]


async def test_a_later_attempt_does_not_start_the_run_again() -> None:
    delivery = make_delivery(attempt=2, response_serial="serial-1")
    outcome, lifecycle, _ = await run_ait(FakeModel(*answer("Hi")), delivery)
    assert outcome is Outcome.COMPLETED and lifecycle.events == [("complete", None)]


def test_the_runner_shapes_ait_answers_only_for_ait_jobs() -> None:
    runner = JobRunner(FakeQueue(), FakeModel(), timeout_s=1)  # type: ignore[arg-type]
    seed_job = make_delivery().job
    ait_job = make_delivery(wire="ait", input_codec_message_id="u-1", user_client_id="bob").job
    assert seed_job is not None and ait_job is not None
    assert runner.ait_run(seed_job) is None
    assert runner.ait_run(ait_job) == ait.AitRun(ait_job.id, "u-1", "bob")
    default_ait = JobRunner(FakeQueue(), FakeModel(), timeout_s=1, wire_protocol="ait")  # type: ignore[arg-type]
    assert default_ait.ait_run(seed_job) is not None
    assert default_ait.ait_run(seed_job.model_copy(update={"wire": "seed"})) is None


# -- the runtime: `ai-cancel` over the real local Ably -----------------------------------

pool = test_runtime.pool  # the runtime tests' pool fixture: one real connection


async def publish_ai_cancel(local_ably: LocalAbly, client_id: str, channel: str,
                            **target: str) -> None:  # fmt: skip
    user = realtime_client(local_ably.key, local_ably.endpoint, client_id=client_id)
    try:
        transport = {"event-id": uuid.uuid4().hex, **target}
        cancel = Message(name="ai-cancel", extras={"ai": {"transport": transport}})
        await user.channels.get(channel).publish(cancel)
    finally:
        await user.close()


async def test_an_ai_cancel_stops_the_run_it_names_and_one_held_stops_a_later_start(
    pool: ConnectionPool, local_ably: LocalAbly
) -> None:
    """By input codec-message-id (useChat's stop) or run-id, from the job's user only; a
    cancel naming an input whose run has not started here is held and applied at start."""
    here = f"unit:{uuid.uuid4().hex[:10]}"
    queue, runner = FakeQueue(), FakeRunner()
    queue.takeable = [
        make_delivery("by-input", channel=here, user_client_id="alice", wire="ait",
                      input_codec_message_id="u-1"),
        make_delivery("by-run", channel=here, user_client_id="alice", wire="ait"),
        make_delivery("keeps-listening", channel=here, user_client_id="bob", wire="ait"),
    ]  # fmt: skip
    worker = Worker(queue, runner, pool, test_runtime.options())  # type: ignore[arg-type]
    stop = asyncio.Event()
    with capture_logs() as logs:
        run = asyncio.create_task(worker.run(stop))
        await wait_until(lambda: len(runner.started) == 3)
        await test_runtime.listening(pool, here)
        await publish_ai_cancel(local_ably, "mallory", here, **{"run-id": "run:by-run"})
        await publish_ai_cancel(local_ably, "alice", here, **{"input-codec-message-id": "u-1"})
        await wait_until(lambda: "by-input" in runner.stopped)
        assert "by-run" not in runner.stopped  # mallory's was refused
        await publish_ai_cancel(local_ably, "alice", here, **{"run-id": "run:by-run"})
        await wait_until(lambda: "by-run" in runner.stopped)
        # Not running yet (heard while another job of the channel runs): held, then
        # applied when it starts.
        await publish_ai_cancel(local_ably, "alice", here, **{"input-codec-message-id": "u-9"})
        await wait_until(lambda: any(e["event"] == "ait.cancel_held" for e in logs))
        queue.takeable.append(make_delivery("later", channel=here, user_client_id="alice",
                                            wire="ait", input_codec_message_id="u-9"))  # fmt: skip
        await wait_until(lambda: "later" in runner.stopped)
        await test_runtime.stop_and_wait(stop, run)
    assert runner.stopped == {
        "by-input": StopReason.USER_CANCEL,
        "by-run": StopReason.USER_CANCEL,
        "later": StopReason.USER_CANCEL,
        "keeps-listening": StopReason.SHUTDOWN,
    }
    refused = [e for e in logs if e["event"] == "job.cancel_refused"]
    assert [(e["job_id"], e["by"]) for e in refused] == [("by-run", "mallory")]
