"""The local OpenAI-compatible server, always through the real `openai` SDK."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import DefaultAioHttpClient
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseQueuedEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from worker.devstack.openai_local import (
    DEFAULT_TOKENS,
    MODELS,
    OpenAILocalServer,
    answer_deltas,
    answer_text,
    answer_tokens,
)
from worker.devstack.openai_local.options import Pace
from worker.devstack.openai_local.pacing import paced_batches

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[OpenAILocalServer]:
    """No delays: tests here check what arrives, not when."""
    async with OpenAILocalServer(tokens_per_second=0, first_token_ms=0) as local:
        yield local


@pytest.fixture
async def client(server: OpenAILocalServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with server.client(max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def prompt() -> str:
    """A fresh prompt per test, so per-prompt failure counts never leak between tests."""
    return f"Explain consumer groups, take {uuid.uuid4().hex[:8]}"


async def collect(stream: Any) -> list[Any]:
    return [event async for event in stream]


def deltas_of(events: list[Any]) -> list[str]:
    return [e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)]


# --- the answer text -------------------------------------------------------------------


def test_answer_is_a_function_of_prompt_and_length() -> None:
    text = answer_text("What is a stream?", 200)
    assert text == answer_text("What is a stream?", 200)
    assert text != answer_text("What is a queue?", 200)
    assert len(answer_text("What is a stream?", 400)) > len(text) > 400
    assert text.count(" ") > 80 and text.rstrip()[-1] in ".!?"  # sentences of words
    # about as many tokens as asked: it ends at the nearest sentence end
    assert abs(len(answer_tokens("What is a stream?")) - DEFAULT_TOKENS) <= DEFAULT_TOKENS // 4


def test_deltas_are_small_and_join_to_the_text() -> None:
    deltas = answer_deltas("What is a stream?", 300)
    assert "".join(deltas) == answer_text("What is a stream?", 300)
    assert max(len(d) for d in deltas) <= 12 and sum(map(len, deltas)) / len(deltas) < 8
    assert any(not d.isascii() for d in deltas)  # accents, CJK or emoji reach the stream


def test_capped_answer_is_a_prefix_of_the_natural_one() -> None:
    natural = answer_text("Tell me more", 100)
    capped = answer_text("Tell me more", 100, max_output_tokens=30)
    assert natural.startswith(capped) and len(capped) < len(natural)
    assert (
        answer_deltas("Tell me more", 100, max_output_tokens=30)[:3]
        == (answer_deltas("Tell me more", 100)[:3])
    )


# --- Responses API: streaming and whole -----------------------------------------------


async def test_stream_has_openai_event_order_ids_and_sequence(
    client: openai.AsyncOpenAI, prompt: str
) -> None:
    events = await collect(await client.responses.create(model="local", input=prompt, stream=True))

    head, tail = events[:4], events[-5:]
    assert [type(e) for e in head] == [
        ResponseCreatedEvent,
        ResponseInProgressEvent,
        ResponseOutputItemAddedEvent,
        ResponseContentPartAddedEvent,
    ]
    assert all(isinstance(e, ResponseTextDeltaEvent) for e in events[4:-4])
    assert [type(e) for e in tail[1:]] == [
        ResponseTextDoneEvent,
        ResponseContentPartDoneEvent,
        ResponseOutputItemDoneEvent,
        ResponseCompletedEvent,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    response_id = events[0].response.id
    item_id = events[2].item.id
    assert response_id.startswith("resp_") and item_id.startswith("msg_")
    deltas = [e for e in events if isinstance(e, ResponseTextDeltaEvent)]
    assert {(d.item_id, d.output_index, d.content_index) for d in deltas} == {(item_id, 0, 0)}

    done = events[-1].response
    text = answer_text(prompt)
    assert "".join(d.delta for d in deltas) == text == events[-4].text == done.output_text
    assert done.id == response_id and done.status == "completed"
    assert done.usage is not None and done.usage.output_tokens == len(answer_tokens(prompt))
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens


async def test_stream_deltas_are_answer_deltas(client: openai.AsyncOpenAI, prompt: str) -> None:
    stream = await client.responses.create(
        model="local", input=prompt, stream=True, metadata={"local_tokens": "400"}
    )
    assert deltas_of(await collect(stream)) == answer_deltas(prompt, 400)


async def test_whole_response(client: openai.AsyncOpenAI, prompt: str) -> None:
    response = await client.responses.create(model="local", input=prompt)
    assert response.status == "completed" and response.id.startswith("resp_")
    assert response.output_text == answer_text(prompt)


async def test_prompt_is_the_last_user_input_text(client: openai.AsyncOpenAI, prompt: str) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "an earlier question"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "input_text", "text": prompt}]},
    ]
    response = await client.responses.create(model="local", input=messages)
    assert response.output_text == answer_text(prompt)
    messages[-1] = {"role": "user", "content": prompt}
    response = await client.responses.create(model="local", input=messages)
    assert response.output_text == answer_text(prompt)


async def test_length_from_server_default_and_metadata(prompt: str) -> None:
    async with (
        OpenAILocalServer(tokens=30, tokens_per_second=0, first_token_ms=0) as short,
        short.client(max_retries=0) as client,
    ):
        response = await client.responses.create(model="local", input=prompt)
        assert response.output_text == answer_text(prompt, 30)
        response = await client.responses.create(
            model="local", input=prompt, metadata={"local_tokens": "500"}
        )
        assert response.output_text == answer_text(prompt, 500)
        assert response.usage is not None
        assert response.usage.output_tokens == len(answer_tokens(prompt, 500))


async def test_max_output_tokens_ends_incomplete(client: openai.AsyncOpenAI, prompt: str) -> None:
    stream = await client.responses.create(
        model="local", input=prompt, stream=True, max_output_tokens=40
    )
    events = await collect(stream)
    last = events[-1]
    assert isinstance(last, ResponseIncompleteEvent)
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert "".join(deltas_of(events)) == answer_text(prompt, max_output_tokens=40)
    assert last.response.usage is not None and last.response.usage.output_tokens == 40


# --- pace -------------------------------------------------------------------------------


async def test_pace_per_request_and_per_model(client: openai.AsyncOpenAI, prompt: str) -> None:
    started = time.monotonic()
    stream = await client.responses.create(
        model="local",
        input=prompt,
        stream=True,
        metadata={
            "local_tokens": "20",
            "local_tokens_per_second": "200",
            "local_first_token_ms": "50",
        },
    )
    first_delta_at = None
    async for event in stream:
        if first_delta_at is None and isinstance(event, ResponseTextDeltaEvent):
            first_delta_at = time.monotonic() - started
    assert first_delta_at is not None and first_delta_at >= 0.04  # loose sanity only
    assert time.monotonic() - started >= 0.1

    started = time.monotonic()
    slow = await client.responses.create(
        model="local-slow", input=prompt, metadata={"local_tokens": "5"}
    )
    assert slow.output_text == answer_text(prompt, 5)
    assert time.monotonic() - started >= 0.3  # ~15 tokens/s after a first-token wait


async def test_high_rates_are_sent_in_batches() -> None:
    # 300 one-token deltas at 2,000 tokens/s: far fewer wake-ups than deltas.
    batches = [b async for b in paced_batches([1] * 300, Pace.of(0, 2000), 0.01)]
    assert [i for b in batches for i in b] == list(range(300))
    assert len(batches) < 60


# --- failures on demand -------------------------------------------------------------------


async def test_429_is_a_rate_limit_error_with_retry_after(
    client: openai.AsyncOpenAI, prompt: str
) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await client.responses.create(
            model="local", input=prompt, metadata={"local_fail": "429", "local_retry_after": "3"}
        )
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.code == "rate_limit_exceeded"


async def test_500_and_401_on_request(client: openai.AsyncOpenAI, prompt: str) -> None:
    with pytest.raises(openai.InternalServerError):
        await client.responses.create(model="local", input=prompt, metadata={"local_fail": "500"})
    with pytest.raises(openai.AuthenticationError):
        await client.responses.create(
            model="local", input=prompt, stream=True, metadata={"local_fail": "401"}
        )


async def test_wrong_key_gets_openai_error_shape(prompt: str) -> None:
    async with OpenAILocalServer(api_key="sk-right", tokens_per_second=0) as keyed:
        wrong = openai.AsyncOpenAI(base_url=keyed.base_url, api_key="sk-wrong-key", max_retries=0)
        async with wrong, keyed.client(max_retries=0) as right:
            with pytest.raises(openai.AuthenticationError) as caught:
                await wrong.responses.create(model="local", input=prompt)
            assert caught.value.code == "invalid_api_key"
            assert (await right.responses.create(model="local-fast", input=prompt)).output_text
        async with aiohttp.ClientSession() as http:
            url = f"{keyed.base_url}/responses"
            async with http.post(url, json={"model": "local"}) as reply:
                assert reply.status == 401
                body = await reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


async def test_break_cuts_the_stream_after_some_deltas(
    client: openai.AsyncOpenAI, prompt: str
) -> None:
    stream = await client.responses.create(
        model="local",
        input=prompt,
        stream=True,
        metadata={"local_fail": "break", "local_fail_after": "5"},
    )
    received: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        async for event in stream:
            received.append(event)
    assert deltas_of(received) == answer_deltas(prompt)[:5]
    assert not isinstance(received[-1], ResponseCompletedEvent)


async def test_failed_emits_response_failed(client: openai.AsyncOpenAI, prompt: str) -> None:
    stream = await client.responses.create(
        model="local",
        input=prompt,
        stream=True,
        metadata={"local_fail": "failed", "local_fail_after": "3"},
    )
    events = await collect(stream)
    assert deltas_of(events) == answer_deltas(prompt)[:3]
    last = events[-1]
    assert isinstance(last, ResponseFailedEvent) and last.response.status == "failed"
    assert last.response.error is not None and last.response.error.code == "server_error"


async def test_incomplete_on_request(client: openai.AsyncOpenAI, prompt: str) -> None:
    response = await client.responses.create(
        model="local", input=prompt, metadata={"local_fail": "incomplete", "local_fail_after": "4"}
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "content_filter"
    assert response.output_text == "".join(answer_deltas(prompt)[:4])


async def test_fail_times_lets_a_retrying_client_succeed(
    server: OpenAILocalServer, client: openai.AsyncOpenAI, prompt: str
) -> None:
    meta = {"local_fail": "429", "local_fail_times": "2", "local_retry_after": "0.01"}
    async with server.client(max_retries=3) as retrying:
        response = await retrying.responses.create(model="local", input=prompt, metadata=meta)
    assert response.output_text == answer_text(prompt)
    assert server.attempts(prompt) == 3

    once = {"local_fail": "break", "local_fail_times": "1", "local_fail_after": "2"}
    with pytest.raises(openai.APIConnectionError):
        await collect(
            await client.responses.create(model="local", input=prompt, stream=True, metadata=once)
        )
    again = await client.responses.create(model="local", input=prompt, stream=True, metadata=once)
    assert "".join(deltas_of(await collect(again))) == answer_text(prompt)


# --- background responses ------------------------------------------------------------------


async def test_background_survives_a_break_and_resumes(prompt: str) -> None:
    async with (
        OpenAILocalServer(tokens_per_second=2000, first_token_ms=0) as paced,
        paced.client(max_retries=0) as client,
    ):
        meta = {"local_tokens": "300", "local_fail": "break", "local_fail_after": "10"}
        stream = await client.responses.create(
            model="local", input=prompt, stream=True, background=True, metadata=meta
        )
        first: list[Any] = []
        with pytest.raises(openai.APIConnectionError):
            async for event in stream:
                first.append(event)
        assert isinstance(first[0], ResponseCreatedEvent) and first[0].response.background
        assert isinstance(first[1], ResponseQueuedEvent)
        response_id, last_seq = first[0].response.id, first[-1].sequence_number

        await asyncio.sleep(0.05)  # generation carries on without a client
        resumed = await collect(
            await client.responses.retrieve(response_id, stream=True, starting_after=last_seq)
        )
        assert resumed[0].sequence_number == last_seq + 1
        assert isinstance(resumed[-1], ResponseCompletedEvent)
        assert "".join(deltas_of(first + resumed)) == answer_text(prompt, 300)

        replayed = await collect(await client.responses.retrieve(response_id, stream=True))
        assert [e.sequence_number for e in replayed] == list(range(len(replayed)))
        stored = await client.responses.retrieve(response_id)
        assert stored.status == "completed" and stored.output_text == answer_text(prompt, 300)


async def test_background_without_stream_is_polled(prompt: str) -> None:
    async with (
        OpenAILocalServer(tokens_per_second=1000, first_token_ms=0) as paced,
        paced.client(max_retries=0) as client,
    ):
        created = await client.responses.create(model="local", input=prompt, background=True)
        assert created.status == "queued" and created.background
        for _ in range(200):
            polled = await client.responses.retrieve(created.id)
            if polled.status == "completed":
                break
            assert polled.status in ("queued", "in_progress")
            await asyncio.sleep(0.02)
        assert polled.status == "completed" and polled.output_text == answer_text(prompt)


async def test_cancel_ends_a_background_stream(prompt: str) -> None:
    async with (
        OpenAILocalServer(tokens_per_second=100, first_token_ms=0) as paced,
        paced.client(max_retries=0) as client,
    ):
        stream = await client.responses.create(
            model="local", input=prompt, stream=True, background=True
        )
        events: list[Any] = []
        async for event in stream:  # ends cleanly once the response is cancelled
            events.append(event)
            if len(deltas_of(events)) == 3:
                cancelled = await client.responses.cancel(events[0].response.id)
                assert cancelled.status == "cancelled"
        assert not any(isinstance(e, ResponseCompletedEvent) for e in events)
        assert len(deltas_of(events)) < len(answer_deltas(prompt))
        stored = await client.responses.retrieve(events[0].response.id)
        assert stored.status == "cancelled"


async def test_unknown_response_is_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_unknown")


async def test_delete_and_a_bounded_store(prompt: str) -> None:
    async with (
        OpenAILocalServer(store_size=2, tokens_per_second=0, first_token_ms=0) as small,
        small.client(max_retries=0) as client,
    ):
        ids = [(await client.responses.create(model="local", input=prompt)).id for _ in range(3)]
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(ids[0])  # the oldest is forgotten
        assert (await client.responses.retrieve(ids[2])).output_text == answer_text(prompt)
        await client.responses.delete(ids[2])
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(ids[2])


# --- chat completions and models --------------------------------------------------------------


async def test_chat_completion_stream_with_usage(client: openai.AsyncOpenAI, prompt: str) -> None:
    stream = await client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks: list[ChatCompletionChunk] = await collect(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_text(prompt)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(answer_tokens(prompt))


async def test_chat_completion_whole_and_capped(client: openai.AsyncOpenAI, prompt: str) -> None:
    messages: Any = [{"role": "user", "content": prompt}]
    whole = await client.chat.completions.create(model="local", messages=messages)
    assert whole.choices[0].message.content == answer_text(prompt)
    assert whole.choices[0].finish_reason == "stop"
    capped = await client.chat.completions.create(model="local", messages=messages, max_tokens=10)
    assert capped.choices[0].message.content == answer_text(prompt, max_output_tokens=10)
    assert capped.choices[0].finish_reason == "length"


async def test_chat_failure_mid_stream_raises(client: openai.AsyncOpenAI, prompt: str) -> None:
    stream = await client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        metadata={"local_fail": "failed", "local_fail_after": "2"},
    )
    with pytest.raises(openai.APIError):
        await collect(stream)


async def test_models_lists_the_local_models(client: openai.AsyncOpenAI) -> None:
    names = [model.id async for model in client.models.list()]
    assert names == list(MODELS) == ["local", "local-fast", "local-slow"]
    with pytest.raises(openai.NotFoundError) as caught:
        await client.embeddings.create(model="local", input="no such endpoint here")
    assert isinstance(caught.value.body, dict) and "Invalid URL" in caught.value.body["message"]


# --- load and the command line ------------------------------------------------------------------


async def test_many_concurrent_streams_each_get_their_answer(client: openai.AsyncOpenAI) -> None:
    prompts = [f"question {i} {uuid.uuid4().hex[:6]}" for i in range(100)]

    async def ask(p: str) -> str:
        stream = await client.responses.create(model="local", input=p, stream=True)
        return "".join(deltas_of(await collect(stream)))

    texts = await asyncio.gather(*(ask(p) for p in prompts))
    assert texts == [answer_text(p) for p in prompts]


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listener's queue was full."""
    lines = [line.split() for line in open("/proc/net/netstat") if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["ListenOverflows"])


async def test_a_burst_of_new_connections_is_accepted_without_drops(
    server: OpenAILocalServer,
) -> None:
    """A worker taking 300 jobs at once opens 300 connections in one go; a listen queue
    of 128 (aiohttp's default) dropped the rest and they came back a second later."""
    before = listen_overflows()
    async with server.client(max_retries=0, http_client=DefaultAioHttpClient()) as sdk:
        answers = await asyncio.gather(
            *(sdk.responses.create(model="local", input=f"burst {i}") for i in range(300))
        )
    assert [a.output_text for a in answers] == [answer_text(f"burst {i}") for i in range(300)]
    assert listen_overflows() == before


async def test_command_line_prints_base_url_and_stops_on_sigterm(prompt: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.devstack.openai_local",
        "--port",
        "0",
        "--tokens-per-second",
        "0",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        base_url = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        async with openai.AsyncOpenAI(base_url=base_url, api_key="any", max_retries=0) as client:
            response = await client.responses.create(model="local-fast", input=prompt)
        assert response.output_text == answer_text(prompt)
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
