"""`/v1/chat/completions`, streamed (chunks, then `[DONE]`) or whole."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from worker.devstack.openai_local.chat_events import ChatBuilder
from worker.devstack.openai_local.errors import error_body
from worker.devstack.openai_local.inputs import chat_prompt
from worker.devstack.openai_local.intake import admit
from worker.devstack.openai_local.pacing import paced_batches
from worker.devstack.openai_local.plan import Plan
from worker.devstack.openai_local.request_body import flag, model_of, read_json, token_cap
from worker.devstack.openai_local.sse import break_connection, encode, open_stream, pump
from worker.devstack.openai_local.state import ServerState

FAILED_MESSAGE = "The server had an error while processing your request. Sorry about that!"


def routes(state: ServerState) -> list[web.RouteDef]:
    api = _ChatAPI(state)
    return [web.post("/v1/chat/completions", api.create)]


def finish_reason(plan: Plan) -> str:
    if plan.fail == "incomplete":
        return "content_filter"
    return "length" if plan.capped else "stop"


async def generate(
    plan: Plan, builder: ChatBuilder, batch_interval_s: float
) -> AsyncGenerator[list[bytes], None]:
    yield [builder.first()]
    deltas, tokens = plan.streamed
    async for due in paced_batches(tokens, plan.options.pace, batch_interval_s):
        yield builder.deltas(deltas[due.start : due.stop])
    if plan.fail == "failed":  # a mid-stream error, which the SDK raises as APIError
        yield [encode(error_body(FAILED_MESSAGE, "server_error"))]
    else:
        yield builder.last(finish_reason(plan), sum(tokens))


class _ChatAPI:
    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model, prompt = model_of(body), chat_prompt(body)
        cap = token_cap(body, "max_completion_tokens", "max_tokens")
        plan = admit(self._state, body, model, prompt, cap)
        if isinstance(plan, web.Response):
            return plan
        builder = ChatBuilder(model, plan.input_tokens, _include_usage(body))
        if flag(body, "stream"):
            return await self._stream(request, plan, builder)
        return await self._whole(request, plan, builder)

    async def _stream(
        self, request: web.Request, plan: Plan, builder: ChatBuilder
    ) -> web.StreamResponse:
        breaks_at = 1 + plan.fail_after if plan.fail == "break" else None
        response = await open_stream(request)
        batches = generate(plan, builder, self._state.batch_interval_s)
        try:
            await pump(request, response, batches, break_before_seq=breaks_at)
        except ConnectionResetError:
            pass  # the client went away
        return response

    async def _whole(self, request: web.Request, plan: Plan, builder: ChatBuilder) -> web.Response:
        if plan.fail == "break":
            break_connection(request)
            return web.Response(status=500)  # never reaches the client
        async for _ in generate(plan, builder, self._state.batch_interval_s):
            pass  # the whole answer takes as long as the stream would
        if plan.fail == "failed":
            return web.json_response(error_body(FAILED_MESSAGE, "server_error"), status=500)
        deltas, tokens = plan.streamed
        return web.json_response(builder.whole("".join(deltas), finish_reason(plan), sum(tokens)))


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
