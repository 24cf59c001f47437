"""Continuing an in-flight answer instead of regenerating it (`MODEL_BACKGROUND=true`):
the model's background response goes on upstream while its worker is dead, and the next
attempt continues that same response into the same channel message. Real services only:
Redis, the local Ably (Sockudo), the local OpenAI server, real worker processes."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from typing import Any

import pytest
from ably.types.message import MessageAction

from tests.ably_helpers import TextView, wait_for
from tests.worker_harness import Stack, start_worker_process, subscriber
from worker.devstack.openai_local import OpenAILocalServer, answer_text
from worker.jobs import Job
from worker.model import Done, Failed, Gone, Model, ModelEvent, Started, TextDelta
from worker.transport.contract import Headers, Status
from worker.transport.response_stream import ResponseStream

pytestmark = pytest.mark.timeout(120)

TOKENS = 400
SLOW = {"local_tokens": str(TOKENS), "local_tokens_per_second": "40"}  # 10 s an answer


def prompt(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


def log_events(stderr: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]


async def stop(proc: asyncio.subprocess.Process) -> bytes:
    """SIGTERM, then the worker's logs once it has drained and exited."""
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), 40)
    return stderr


def resets(live: TextView, serial: str) -> list[Any]:
    """Updates that emptied the message: a regenerating retry's reset."""
    return [
        m
        for m in live.messages
        if m.serial == serial and m.action == MessageAction.MESSAGE_UPDATE and not m.data
    ]


async def kill_mid_answer(
    stack: Stack, live: TextView, job: Job, env: dict[str, str]
) -> tuple[str, str]:
    """A worker streams the job's answer and is SIGKILLed a third of the way in, once its
    record names the model response; returns the message serial and the response id."""
    proc = await start_worker_process(env)
    expected = answer_text(str(job.input), TOKENS)
    record: dict[str, str] = {}

    def shown() -> str:
        return live.texts.get(live.by_response(job.id) or "", "")

    try:
        await wait_for(lambda: len(shown()) > len(expected) // 3, 30, "a third of the answer")
        record = await stack.status(job.id)
    finally:
        proc.kill()  # no drain, no goodbye: only the heartbeat's expiry tells
        await proc.wait()
    assert len(shown()) < len(expected), "the kill must land mid-answer"
    assert record.get("model_response_id", "").startswith("resp_"), record
    serial = live.by_response(job.id)
    assert serial is not None
    return serial, record["model_response_id"]


async def test_a_killed_workers_answer_is_continued_not_regenerated(
    stack: Stack, channel_name: str
) -> None:
    """SIGKILL the worker mid-answer, start another: the subscriber's final text is the
    model's, no reset or `interrupted` was ever published for it, and the model was
    called once (the second worker continued the same background response)."""
    text = prompt("continue me")
    job = Job(channel=channel_name, input=text, metadata=SLOW)
    settings: dict[str, Any] = {"model_background": True, "job_visibility_timeout_seconds": 2}
    async with subscriber(stack, channel_name) as live:
        await stack.enqueue(job)
        serial, response_id = await kill_mid_answer(stack, live, job, stack.env(**settings))
        successor = await start_worker_process(stack.env(**settings))
        try:
            record = await stack.wait_state(job.id, "completed", "dead", timeout=60)
            await wait_for(lambda: live.status(job.id) == "complete", 10, "complete")
        finally:
            stderr = await stop(successor)

    expected = answer_text(text, TOKENS)
    assert record["state"] == "completed" and record["attempts"] == "2"
    assert live.texts[serial] == expected
    assert "interrupted" not in live.statuses[serial]
    assert live.statuses[serial] == ["streaming", "complete"]
    assert resets(live, serial) == []
    assert stack.openai.attempts(text) == 1  # continued, not asked again
    [message] = await stack.history(channel_name)
    assert (message.serial, message.data) == (serial, expected)
    assert message.extras["headers"]["status"] == "complete"
    [started] = [e for e in log_events(stderr) if e["event"] == "job.started"]
    assert started["continued"] is True and started["model_response_id"] == response_id


async def test_a_model_response_gone_upstream_is_regenerated_into_the_same_message(
    stack: Stack, channel_name: str
) -> None:
    """The fallback: the background response the record names is gone (the server
    forgot it) when the next worker comes: the message is reset and the answer
    regenerated, as without `MODEL_BACKGROUND`; one message, the model's text."""
    text = prompt("gone upstream")
    job = Job(channel=channel_name, input=text, metadata=SLOW)
    settings: dict[str, Any] = {"model_background": True, "job_visibility_timeout_seconds": 2}
    async with subscriber(stack, channel_name) as live:
        await stack.enqueue(job)
        serial, response_id = await kill_mid_answer(stack, live, job, stack.env(**settings))
        stack.openai.state.store.forget(response_id)
        successor = await start_worker_process(stack.env(**settings))
        try:
            record = await stack.wait_state(job.id, "completed", "dead", timeout=60)
            await wait_for(lambda: live.status(job.id) == "complete", 10, "complete")
        finally:
            stderr = await stop(successor)

    assert record["state"] == "completed" and record["attempts"] == "2"
    assert record["model_response_id"] != response_id  # the new response's
    assert stack.openai.attempts(text) == 2
    assert live.texts[serial] == answer_text(text, TOKENS)
    assert len(resets(live, serial)) == 1
    [message] = await stack.history(channel_name)
    assert (message.serial, message.data) == (serial, answer_text(text, TOKENS))
    [failed] = [e for e in log_events(stderr) if e["event"] == "job.continue_failed"]
    assert "404" in failed["reason"]


# -- the publisher: continuing a message as it stands ------------------------------------


async def continued_stream(
    stack: Stack, channel_name: str, held: str
) -> tuple[ResponseStream, str, Any]:
    """A message an earlier attempt left holding `held`, and a new attempt's stream."""
    client = stack.realtime()
    channel = client.channels.get(channel_name)
    headers = Headers(response_id=f"r-{uuid.uuid4().hex[:6]}", model="local")
    earlier = ResponseStream(channel, headers)
    await earlier.open()
    earlier.append(held)
    assert await earlier.flush() == []
    assert earlier.acked_chars == len(held)  # acknowledged in order
    assert earlier.serial is not None
    return ResponseStream(channel, headers), earlier.serial, client


async def test_a_continued_message_is_not_emptied_and_what_it_holds_is_not_repeated(
    stack: Stack, channel_name: str
) -> None:
    """The record says 5 characters ("Hello"); the message holds "Hello wo" (appends
    acknowledged after the record). The resumed " wor" is not sent again, and the
    subscriber's text ends exact, never emptied."""
    async with subscriber(stack, channel_name) as live:
        stream, serial, client = await continued_stream(stack, channel_name, "Hello wo")
        try:
            assert await stream.continue_message(serial, 5) is None
            assert (stream.serial, stream.text, stream.acked_chars) == (serial, "Hello", 5)
            stream.append(" wor")
            stream.append("ld")
            assert await stream.flush() == []
            await wait_for(lambda: live.texts.get(serial) == "Hello world", what="the text")
            assert stream.acked_chars == len("Hello world")
            await stream.close(Status.COMPLETE)
            await wait_for(lambda: live.statuses.get(serial, [])[-1:] == ["complete"])
        finally:
            await client.close()
    fragments = [m.data for m in live.messages if m.action == MessageAction.MESSAGE_APPEND]
    assert "".join(fragments) == "Hello world"  # " wo" was not sent again
    assert resets(live, serial) == []
    assert live.texts[serial] == "Hello world"


async def test_a_continued_message_holding_other_text_is_repaired_at_once(
    stack: Stack, channel_name: str
) -> None:
    """The message holds text the resumed response did not write there (an append lost
    mid-answer before the crash): the first send replaces the whole text."""
    async with subscriber(stack, channel_name) as live:
        stream, serial, client = await continued_stream(stack, channel_name, "Hello XYZ")
        try:
            assert await stream.continue_message(serial, 5) is None
            stream.append(" world")
            assert await stream.flush() == []
            await wait_for(lambda: live.texts.get(serial) == "Hello world", what="repaired")
        finally:
            await client.close()


async def test_a_message_missing_recorded_text_cannot_be_continued(
    stack: Stack, channel_name: str
) -> None:
    stream, serial, client = await continued_stream(stack, channel_name, "Hel")
    try:
        assert await stream.continue_message(serial, 5) is None
        assert stream.serial is None  # the caller regenerates
        assert await stream.continue_message("no-such-serial", 0) is None
        assert stream.serial is None
    finally:
        await client.close()


# -- the model: background responses, resumed and cancelled ------------------------------


async def collect(events: Any) -> list[ModelEvent]:
    return [event async for event in events]


def deltas(events: list[ModelEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_a_background_response_is_resumed_after_a_sequence_number() -> None:
    text = prompt("resume")
    job = Job(channel="c", input=text, metadata={"local_tokens": "200"})
    async with OpenAILocalServer(tokens_per_second=400, first_token_ms=0) as server:
        model = Model(server.client(max_retries=0), "local", background=True)
        first: list[ModelEvent] = []
        async for event in model.stream(job):
            first.append(event)
            if len(first) == 6:
                break  # the worker dies here
        started = first[0]
        assert isinstance(started, Started) and started.sequence == 0
        last = first[-1]
        assert isinstance(last, TextDelta) and last.sequence is not None
        resumed = await collect(model.resume(started.model_response_id, last.sequence))
        assert isinstance(resumed[-1], Done)
        assert deltas(first) + deltas(resumed) == answer_text(text, 200)
        assert server.attempts(text) == 1


async def test_a_response_that_cannot_be_resumed_is_gone() -> None:
    async with OpenAILocalServer(tokens_per_second=50, first_token_ms=0) as server:
        model = Model(server.client(max_retries=0), "local", background=True)
        [gone] = await collect(model.resume("resp_unknown", 5))
        assert isinstance(gone, Gone) and "404" in gone.reason

        job = Job(channel="c", input=prompt("cancelled"))
        events = model.stream(job)
        started = await anext(events)
        assert isinstance(started, Started)
        await anext(events)
        assert await model.cancel(started.model_response_id) is None  # upstream
        await events.aclose()
        status = await server.client().responses.retrieve(started.model_response_id)
        assert status.status == "cancelled"
        [*_, cancelled] = await collect(model.resume(started.model_response_id, 0))
        assert isinstance(cancelled, Gone) and "cancelled" in cancelled.reason

        failing = Job(channel="c", input=prompt("failing"), metadata={"local_fail": "failed"})
        failed_id = ""
        async for event in model.stream(failing):
            if isinstance(event, Started):
                failed_id = event.model_response_id
            if isinstance(event, Failed):
                break
        [*_, failed] = await collect(model.resume(failed_id, 0))
        assert isinstance(failed, Gone) and "failed" in failed.reason


async def test_cancelling_an_unknown_response_says_why_and_does_not_raise() -> None:
    async with OpenAILocalServer() as server:
        model = Model(server.client(max_retries=0), "local", background=True)
        error = await model.cancel("resp_unknown")
        assert error is not None and "404" in error


async def test_background_is_a_responses_api_setting_only() -> None:
    async with OpenAILocalServer(tokens_per_second=0, first_token_ms=0) as server:
        chat = Model(server.client(), "local", "chat", background=True)
        assert chat.background is False
        foreground = Model(server.client(), "local")
        events = await collect(foreground.stream(Job(channel="c", input=prompt("fg"))))
        assert not any(isinstance(e, Started) for e in events)
        assert isinstance(events[-1], Done)


# -- the local server: what each request carried -----------------------------------------


async def test_the_local_server_keeps_the_last_request_per_prompt() -> None:
    async with (
        OpenAILocalServer(tokens_per_second=0, first_token_ms=0) as server,
        server.client(max_retries=0) as client,
    ):
        text = prompt("conversation")
        conversation = [
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": text},
        ]
        assert server.last_request(text) is None
        await client.responses.create(
            model="local", input=conversation, previous_response_id="resp_before"
        )
        seen = server.last_request(text)
        assert seen is not None
        assert seen["previous_response_id"] == "resp_before"
        assert seen["input"] == conversation and seen["messages"] is None

        await client.chat.completions.create(model="local", messages=conversation)  # type: ignore[arg-type]
        seen = server.last_request(text)
        assert seen is not None
        assert seen["messages"] == conversation and seen["previous_response_id"] is None
        server.reset()
        assert server.last_request(text) is None
