"""The model call: an OpenAI stream turned into three events the runtime understands.

`TextDelta` for each piece of text, `Done` with usage at the end, `Failed` when the call
cannot give (the rest of) an answer. Retries on 429 and 5xx before the first token are the
`openai` SDK's own (`max_retries`, honouring `Retry-After`); a failure after text has
started is `Failed(retryable=True)` and the queue retries the whole job, reusing its
channel message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import openai
from openai import AsyncOpenAI

from worker.jobs import Job


@dataclass(frozen=True)
class TextDelta:
    text: str


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


ModelEvent = TextDelta | Done | Failed


def make_client(
    api_key: str, base_url: str | None, *, max_retries: int = 3, timeout_s: float = 60.0
) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout_s
    )


class Model:
    def __init__(
        self,
        client: AsyncOpenAI,
        default_model: str,
        api: Literal["responses", "chat"] = "responses",
    ) -> None:
        self.client = client
        self.default_model = default_model
        self.api = api

    def model_for(self, job: Job) -> str:
        return job.model or self.default_model

    async def stream(self, job: Job) -> AsyncIterator[ModelEvent]:
        """Yield the job's answer as events; never raises for a model-side failure."""
        source = self._responses(job) if self.api == "responses" else self._chat(job)
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

    async def _responses(self, job: Job) -> AsyncIterator[ModelEvent]:
        stream = await self.client.responses.create(**self._responses_args(job), stream=True)
        async with stream:  # closes the HTTP response however the loop ends
            async for event in stream:
                outcome = _responses_event(event)
                if outcome is not None:
                    yield outcome
                    if not isinstance(outcome, TextDelta):
                        return
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
        stream = await self.client.chat.completions.create(
            **self._chat_args(job), stream=True, stream_options={"include_usage": True}
        )
        finish: str | None = None
        usage = None
        async with stream:
            async for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield TextDelta(choice.delta.content)
                    finish = choice.finish_reason or finish
        if finish is None:
            yield Failed("model stream ended before the response was complete", retryable=True)
            return
        yield Done(
            input_tokens=usage.prompt_tokens if usage else None,
            output_tokens=usage.completion_tokens if usage else None,
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


def _responses_event(event: Any) -> ModelEvent | None:
    """The event that matters to the runtime, or None for the many that do not."""
    kind = event.type
    if kind == "response.output_text.delta":
        return TextDelta(event.delta)
    if kind in ("response.completed", "response.incomplete"):
        return _done(event.response)
    if kind == "response.failed":
        error = event.response.error
        return Failed(
            f"model failed: {error.message if error else 'unknown error'}", retryable=True
        )
    if kind == "error":
        return Failed(f"model error: {getattr(event, 'message', 'unknown')}", retryable=True)
    return None


def _done(response: Any) -> Done:
    usage = getattr(response, "usage", None)
    details = getattr(response, "incomplete_details", None)
    return Done(
        input_tokens=getattr(usage, "input_tokens", None),
        output_tokens=getattr(usage, "output_tokens", None),
        model_response_id=getattr(response, "id", None),
        incomplete_reason=getattr(details, "reason", None) if details else None,
    )


def _status_error(exc: openai.APIStatusError) -> str:
    return f"model API returned HTTP {exc.status_code}: {exc.message}"[:500]
