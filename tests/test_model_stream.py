"""The model stream read raw (bytes, orjson: the worker's way) gives the same events as
the same stream read through the `openai` SDK's typed models, on the local server's
streams: answers, usage, incomplete answers, errors before and after the first token,
`response.failed`, a broken connection, a background response resumed, and Chat
Completions. Real parts: the unmodified SDK against the local OpenAI server."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest

from worker.devstack.openai_local import (
    FAIL,
    FAIL_AFTER,
    TOKENS,
    TOKENS_PER_SECOND,
    OpenAILocalServer,
    answer_text,
)
from worker.jobs import Job
from worker.model import Done, Failed, Model, ModelEvent, Started, TextDelta, make_client
from worker.sse import SseParser

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def server() -> Any:
    async with OpenAILocalServer(tokens_per_second=0, first_token_ms=0) as running:
        yield running


def job(metadata: dict[str, str]) -> Job:
    prompt = f"equivalence {uuid.uuid4().hex[:8]}"
    return Job(id=uuid.uuid4().hex, channel="c", input=prompt, metadata=metadata)


async def both(model_args: dict[str, Any], server: Any, run: Any) -> list[list[ModelEvent]]:
    """The events of `run(model)` read raw and through the SDK's types, each over both
    transports: the worker's (aiohttp, `make_client`) and the SDK's default (httpx)."""
    readings = []
    for raw, aiohttp in ((True, True), (False, True), (True, False), (False, False)):
        client = (
            make_client(server.api_key, server.base_url, max_retries=0)
            if aiohttp
            else server.client(max_retries=0)
        )
        model = Model(client, "local", raw_events=raw, **model_args)
        readings.append([without_ids(event) async for event in run(model)])
        await client.close()
    assert all(reading == readings[0] for reading in readings), readings
    return readings[:2]


def without_ids(event: ModelEvent) -> ModelEvent:
    """Each reading made its own request: the response ids differ, nothing else may."""
    if isinstance(event, Done) and event.model_response_id:
        assert event.model_response_id.startswith("resp_")
        return dataclasses.replace(event, model_response_id="resp_")
    return event


CASES = {
    "answer": {TOKENS: "40"},
    "incomplete": {TOKENS: "40", FAIL: "incomplete", FAIL_AFTER: "10"},
    "failed": {TOKENS: "40", FAIL: "failed", FAIL_AFTER: "10"},
    "broken": {TOKENS: "40", FAIL: "break", FAIL_AFTER: "10"},
    "http 500": {FAIL: "500"},
    "http 401": {FAIL: "401"},
}


@pytest.mark.parametrize("case", list(CASES))
async def test_raw_and_sdk_readings_give_the_same_events(server: Any, case: str) -> None:
    the_job = job(CASES[case])
    raw, sdk = await both({}, server, lambda model: model.stream(the_job))
    # Each reading made its own request of the same prompt: the same answer both times.
    assert raw == sdk
    assert raw, "the stream gave no event at all"
    texts = "".join(e.text for e in raw if isinstance(e, TextDelta))
    if case == "answer":
        assert texts == answer_text(str(the_job.input), 40)
        assert isinstance(raw[-1], Done) and raw[-1].output_tokens
    elif case == "incomplete":
        assert isinstance(raw[-1], Done) and raw[-1].incomplete_reason
    else:
        assert isinstance(raw[-1], Failed), raw[-1]


async def test_chat_completions_read_the_same(server: Any) -> None:
    # Chat requests carry no metadata (OpenAI takes it only with `store`), so the local
    # server's failure knobs do not reach them: an answer, and a refused key.
    the_job = job({})
    raw, sdk = await both({"api": "chat"}, server, lambda model: model.stream(the_job))
    assert raw == sdk
    assert "".join(e.text for e in raw if isinstance(e, TextDelta)) == answer_text(
        str(the_job.input)
    )
    assert isinstance(raw[-1], Done) and raw[-1].output_tokens
    async with OpenAILocalServer(api_key="sk-right") as keyed:
        refused = []
        for raw_events in (True, False):
            client = make_client("sk-wrong", keyed.base_url, max_retries=0)
            model = Model(client, "local", "chat", raw_events=raw_events)
            refused.append([event async for event in model.stream(the_job)])
            await client.close()
    assert refused[0] == refused[1]
    assert isinstance(refused[0][-1], Failed) and "401" in refused[0][-1].error


async def test_a_background_response_resumed_reads_the_same(server: Any) -> None:
    the_job = job({TOKENS: "30", TOKENS_PER_SECOND: "0"})
    model = Model(server.client(max_retries=0), "local", background=True)
    first = [event async for event in model.stream(the_job)]
    started = first[0]
    assert isinstance(started, Started)
    raw, sdk = await both(
        {"background": True}, server, lambda m: m.resume(started.model_response_id, 5)
    )
    assert raw == sdk
    assert "".join(e.text for e in raw if isinstance(e, TextDelta))
    assert isinstance(raw[-1], Done)


ONE = [("a", b'{"x": 1}')]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b'event: a\ndata: {"x": 1}\n\n'], ONE),
        ([b'event: a\r\ndata: {"x"', b": 1}\r", b"\n\r\n"], ONE),  # CRLF split across reads
        ([b': comment\revent: a\rdata: {"x": 1}\r\r'], ONE),  # CR line ends, a comment
        ([b'data: {"x":\ndata: 1}\n\n'], [(None, b'{"x":\n1}')]),  # data on two lines
        ([b'event: a\ndata: {"x": 1}'], ONE),  # the body ends without the empty line
        ([b"event: a\n\n", b"\n\n"], [("a", b"")]),  # empty events, blank lines
    ],
)
def test_the_sse_parser_reads_every_line_ending(
    chunks: list[bytes], expected: list[tuple[str | None, bytes]]
) -> None:
    parser = SseParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)] + parser.finish()
    assert events == expected


async def test_an_answer_is_asked_for_straight_over_aiohttp_and_an_error_the_sdks_way(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's client posts a streamed request on its aiohttp session without the
    SDK's request building (`worker.model_http`); a refused one is asked again through
    the SDK, whose typed error (and retries) then apply."""
    import httpx2

    built: list[str] = []
    original = httpx2.AsyncClient.build_request

    def build_request(self: Any, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        built.append(str(url))
        return original(self, method, url, *args, **kwargs)

    monkeypatch.setattr(httpx2.AsyncClient, "build_request", build_request)
    client = make_client(server.api_key, server.base_url, max_retries=0)
    try:
        answered = job({TOKENS: "20"})
        events = [e async for e in Model(client, "local").stream(answered)]
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer_text(
            str(answered.input), 20
        )
        assert built == []
        refused = [e async for e in Model(client, "local").stream(job({FAIL: "500"}))]
        assert isinstance(refused[-1], Failed) and "500" in refused[-1].error
        assert [url.rsplit("/", 1)[-1] for url in built] == ["responses"]
    finally:
        await client.close()
