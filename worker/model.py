"""The model call: an OpenAI stream turned into a few events the runtime understands.

`TextDelta` for each piece of text, `Done` with usage at the end, `Failed` when the call
cannot give (the rest of) an answer. Retries on 429 and 5xx before the first token are the
`openai` SDK's own (`max_retries`, honouring `Retry-After`); a failure after text has
started is `Failed(retryable=True)` and the queue retries the whole job, reusing its
channel message.

With `background=True` (`MODEL_BACKGROUND`; the Responses API only, Chat Completions has
no such thing) the answer is an OpenAI background response, which goes on generating
upstream whoever listens. `Started` names it as soon as it exists, each `TextDelta`
carries its event's sequence number, and a later attempt `resume`s that same response
after a sequence number (`retrieve(id, stream=True, starting_after=N)`) instead of asking
the model again. `Gone` says it cannot be continued (not found, failed, cancelled): the
caller regenerates. `cancel` stops it upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import openai
from openai import AsyncOpenAI, DefaultAioHttpClient

from worker.jobs import Job
from worker.model_http import posted_stream
from worker.sse import json_events

Event = dict[str, Any]  # one streamed event's JSON: only the fields read below matter


@dataclass(frozen=True)
class Started:
    """A background response exists upstream: a later attempt can continue it by id."""

    model_response_id: str
    sequence: int  # the `response.created` event's sequence number


@dataclass(frozen=True)
class TextDelta:
    text: str
    sequence: int | None = None  # its event's sequence number (Responses API only)


@dataclass(frozen=True)
class Done:
    input_tokens: int | None = None
    output_tokens: int | None = None
    model_response_id: str | None = None
    incomplete_reason: str | None = None  # e.g. max_output_tokens: the text stops short


@dataclass(frozen=True)
class Failed:
    error: str
    retryable: bool


@dataclass(frozen=True)
class Gone:
    """The response to continue cannot be continued (not found, failed, cancelled):
    regenerate the answer instead. Only `Model.resume` says this."""

    reason: str


ModelEvent = Started | TextDelta | Done | Failed | Gone

# A user's cancel stops the background response upstream within this, or not at all.
CANCEL_TIMEOUT_S = 3.0
# A background response in one of these statuses will never end with an answer.
_LOST = ("failed", "cancelled")


def make_client(
    api_key: str,
    base_url: str | None,
    *,
    max_retries: int = 3,
    timeout_s: float = 60.0,
    aiohttp: bool = True,
) -> AsyncOpenAI:
    """The SDK's client, over aiohttp (`DefaultAioHttpClient`, the SDK's own supported
    transport): reading a stream costs about 40 % less CPU per event than over httpx,
    and every answer reads one. Its error mapping calls a refused connection a timeout,
    so a one-off check that must say which (`worker doctor`) takes httpx. Close it with
    `await client.close()`."""
    return AsyncOpenAI(
        api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout_s,
        http_client=DefaultAioHttpClient() if aiohttp else None,
    )  # fmt: skip


class Model:
    def __init__(
        self,
        client: AsyncOpenAI,
        default_model: str,
        api: Literal["responses", "chat"] = "responses",
        *,
        background: bool = False,
        raw_events: bool = True,
    ) -> None:
        self.client = client
        self.default_model = default_model
        self.api = api
        # Chat Completions has no background responses: the setting is the Responses API's.
        self.background = background and api == "responses"
        # Streamed events read from the response's bytes with orjson (`worker.sse`), not
        # validated into the SDK's pydantic models: a quarter of the CPU per token. False
        # reads them through the SDK's types (the equivalence test compares the two).
        self.raw_events = raw_events
        # The SDK imports each API's module on first use: a blocking import of about 0.4 s
        # on the event loop, paid by the first answers. Paid here, at the start, instead.
        _ = (client.responses.with_streaming_response, client.chat.completions)

    def model_for(self, job: Job) -> str:
        return job.model or self.default_model

    async def stream(self, job: Job) -> AsyncIterator[ModelEvent]:
        """Yield the job's answer as events; never raises for a model-side failure."""
        source = self._responses(job) if self.api == "responses" else self._chat(job)
        async for event in _guarded(source):
            yield event

    async def resume(self, model_response_id: str, after: int) -> AsyncIterator[ModelEvent]:
        """Continue a background response: its events after sequence number `after`.

        Yields what `stream` yields (but no `Started`), or `Gone` when the response cannot
        be continued: unknown (404) or refused (400) upstream, failed, or cancelled. A
        connection that breaks is `Failed(retryable=True)`, as in `stream`: the next
        attempt continues from further on. Never raises for a model-side failure."""
        async for event in _guarded(self._resumed(model_response_id, after)):
            yield event

    async def cancel(self, model_response_id: str) -> str | None:
        """Cancel a background response upstream, best effort, within `CANCEL_TIMEOUT_S`:
        None when done, else why not."""
        client = self.client.with_options(max_retries=0, timeout=CANCEL_TIMEOUT_S)
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await client.responses.cancel(model_response_id)
        except TimeoutError:
            return f"no answer in {CANCEL_TIMEOUT_S:g} s"
        except openai.APIStatusError as exc:
            return _status_error(exc)
        except openai.APIError as exc:
            return f"{type(exc).__name__}: {exc.message}"
        return None

    @contextlib.asynccontextmanager
    async def _events(
        self, resource: Any, method: str, *args: Any, **kwargs: Any
    ) -> AsyncIterator[AsyncIterator[Event]]:
        """A streamed call's events as plain JSON objects; the HTTP response is closed
        however the caller's loop ends. The SDK makes the request either way (auth,
        retries, an error status raised as its own exception)."""
        if self.raw_events:
            call = getattr(resource.with_streaming_response, method)
            async with call(*args, **kwargs) as response:
                yield json_events(response)
        else:
            stream = await getattr(resource, method)(*args, **kwargs)
            async with stream:
                yield (event.to_dict() async for event in stream)

    @contextlib.asynccontextmanager
    async def _created(
        self, resource: Any, path: str, body: dict[str, Any], **sdk_kwargs: Any
    ) -> AsyncIterator[AsyncIterator[Event]]:
        """A streamed `create`: `body` posted to `path` straight over the client's aiohttp
        session when it can (`worker.model_http`), else the SDK's call with `sdk_kwargs`."""
        if self.raw_events:
            async with posted_stream(self.client, path, body) as events:
                if events is not None:
                    yield events
                    return
        async with self._events(resource, "create", **sdk_kwargs) as events:
            yield events

    async def _responses(self, job: Job) -> AsyncIterator[ModelEvent]:
        args = self._responses_args(job)
        if self.background:
            args["background"] = True
        # The body as `extra_body`, which the SDK sends as it is: its typed parameters
        # go through a transform that hashes the API's large Union types key by key,
        # a fifth of the SDK's CPU per request, to change nothing in these plain values.
        async with self._created(
            self.client.responses, "responses", {**args, "stream": True},
            stream=True, extra_body=args,
        ) as events:  # fmt: skip
            async for event in events:
                if self.background and event.get("type") == "response.created":
                    yield Started(event["response"]["id"], event["sequence_number"])
                    continue
                outcome = _responses_event(event)
                if outcome is not None:
                    yield outcome
                    if not isinstance(outcome, TextDelta):
                        return
        yield Failed("model stream ended before the response was complete", retryable=True)

    async def _resumed(self, model_response_id: str, after: int) -> AsyncIterator[ModelEvent]:
        try:
            async with self._events(
                self.client.responses, "retrieve", model_response_id, stream=True,
                starting_after=after,
            ) as events:  # fmt: skip
                async for event in events:
                    if event.get("type") == "response.failed":
                        yield Gone("the model response failed upstream")
                        return
                    outcome = _responses_event(event)
                    if outcome is not None:
                        yield outcome
                        if not isinstance(outcome, TextDelta):
                            return
        except (openai.NotFoundError, openai.BadRequestError) as exc:  # only at the request
            yield Gone(_status_error(exc))
            return
        # Ended before the response did: it was cancelled upstream (the stream of a
        # cancelled response just stops), or the connection was cut (then the next
        # attempt continues, even a response that has completed meanwhile).
        try:
            status = (await self.client.responses.retrieve(model_response_id)).status
        except openai.NotFoundError as exc:
            yield Gone(_status_error(exc))
            return
        if status in _LOST:
            yield Gone(f"the model response is {status}")
        else:
            yield Failed("model stream ended before the response was complete", retryable=True)

    def _responses_args(self, job: Job) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": self.model_for(job),
            "input": job.input
            if isinstance(job.input, str)
            else [m.model_dump() for m in job.input],
        }
        optional = {
            "instructions": job.instructions,
            "previous_response_id": job.previous_response_id,
            "max_output_tokens": job.max_output_tokens,
            "temperature": job.temperature,
            "metadata": job.metadata or None,
        }
        args.update({k: v for k, v in optional.items() if v is not None})
        return args

    async def _chat(self, job: Job) -> AsyncIterator[ModelEvent]:
        args = self._chat_args(job)
        finish: str | None = None
        usage: Event = {}
        streaming = {"stream": True, "stream_options": {"include_usage": True}}
        async with self._created(
            self.client.chat.completions, "chat/completions", {**args, **streaming},
            **args, **streaming,
        ) as chunks:  # fmt: skip
            async for chunk in chunks:
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        yield TextDelta(content)
                    finish = choice.get("finish_reason") or finish
        if finish is None:
            yield Failed("model stream ended before the response was complete", retryable=True)
            return
        yield Done(
            input_tokens=usage.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens"),
            incomplete_reason="max_output_tokens" if finish == "length" else None,
        )

    def _chat_args(self, job: Job) -> dict[str, Any]:
        messages: list[dict[str, str]] = []
        if job.instructions:
            messages.append({"role": "system", "content": job.instructions})
        if isinstance(job.input, str):
            messages.append({"role": "user", "content": job.input})
        else:
            messages.extend(m.model_dump() for m in job.input)
        args: dict[str, Any] = {"model": self.model_for(job), "messages": messages}
        if job.max_output_tokens is not None:
            args["max_tokens"] = job.max_output_tokens
        if job.temperature is not None:
            args["temperature"] = job.temperature
        return args


class Prefetched:
    """A model stream whose first event is asked for at once, in a task of its own.

    Why: a fresh answer's request can then be on its way while the answer's channel
    message is created and its serial saved (two round trips), so the model's own delay
    to its first token overlaps them instead of following them. Only the first event is
    fetched ahead: the rest is read when iterated (a publisher drops text sent before its
    message exists). Iterating yields that event, then the rest, in order; an exception
    from the fetch is raised there. `aclose()` cancels the fetch and closes the stream
    (and with it the HTTP response), for an answer not streamed after all."""

    def __init__(self, events: AsyncIterator[ModelEvent]) -> None:
        self._events = events
        self._first: asyncio.Task[ModelEvent | None] | None = asyncio.create_task(
            self._fetch_first(), name="model-prefetch"
        )

    async def _fetch_first(self) -> ModelEvent | None:
        try:
            return await anext(self._events)
        except StopAsyncIteration:  # not to be set on a task: None says the stream was empty
            return None

    def __aiter__(self) -> Prefetched:
        return self

    async def __anext__(self) -> ModelEvent:
        first, self._first = self._first, None
        if first is None:
            return await anext(self._events)
        event = await first  # its exception, if the fetch raised
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        first, self._first = self._first, None
        if first is not None:
            first.cancel()
            await asyncio.wait([first])  # a generator mid-step cannot be closed: let it end
            if not first.cancelled():
                first.exception()  # retrieved: the answer is not streamed, its failure moot
        if isinstance(self._events, AsyncGenerator):
            with contextlib.suppress(Exception):  # an answer's outcome stands whatever this says
                await self._events.aclose()


async def _guarded(source: AsyncIterator[ModelEvent]) -> AsyncIterator[ModelEvent]:
    """The events of `source`, its SDK errors turned into a last `Failed`."""
    try:
        async for event in source:
            yield event
    except openai.APIStatusError as exc:
        yield Failed(
            _status_error(exc),
            retryable=exc.status_code in (408, 409, 429) or exc.status_code >= 500,
        )
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        yield Failed(f"model connection failed: {exc.__class__.__name__}", retryable=True)
    except openai.APIError as exc:  # e.g. the stream broke off mid-answer
        yield Failed(f"model stream failed: {exc.message}", retryable=True)


def _responses_event(event: Event) -> ModelEvent | None:
    """The event that matters to the runtime, or None for the many that do not."""
    kind = event.get("type")
    if kind == "response.output_text.delta":
        return TextDelta(event["delta"], event.get("sequence_number"))
    if kind in ("response.completed", "response.incomplete"):
        return _done(event.get("response") or {})
    if kind == "response.failed":
        error = (event.get("response") or {}).get("error")
        message = error.get("message") if error else None
        return Failed(f"model failed: {message or 'unknown error'}", retryable=True)
    if kind == "error":
        return Failed(f"model error: {event.get('message') or 'unknown'}", retryable=True)
    return None


def _done(response: Event) -> Done:
    usage = response.get("usage") or {}
    details = response.get("incomplete_details") or {}
    return Done(
        input_tokens=usage.get("input_tokens"),
        output_tokens=usage.get("output_tokens"),
        model_response_id=response.get("id"),
        incomplete_reason=details.get("reason"),
    )


def _status_error(exc: openai.APIStatusError) -> str:
    return f"model API returned HTTP {exc.status_code}: {exc.message}"[:500]
