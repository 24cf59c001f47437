"""`/v1/responses`: create (whole, streamed, background), retrieve and resume, cancel, delete."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from aiohttp import web

from worker.devstack.openai_local.errors import bad_request, not_found
from worker.devstack.openai_local.inputs import responses_prompt
from worker.devstack.openai_local.intake import admit
from worker.devstack.openai_local.pacing import paced_batches
from worker.devstack.openai_local.plan import Plan
from worker.devstack.openai_local.request_body import flag, model_of, read_json, token_cap
from worker.devstack.openai_local.response_events import ResponseBuilder
from worker.devstack.openai_local.sse import break_connection, open_stream, pump
from worker.devstack.openai_local.state import ServerState
from worker.devstack.openai_local.store import StoredResponse

FAILED_MESSAGE = "The model failed while generating (local server, on request)."


def routes(state: ServerState) -> list[web.RouteDef]:
    api = _ResponsesAPI(state)
    return [
        web.post("/v1/responses", api.create),
        web.get("/v1/responses/{id}", api.retrieve),
        web.post("/v1/responses/{id}/cancel", api.cancel),
        web.delete("/v1/responses/{id}", api.delete),
    ]


async def generate(
    plan: Plan, builder: ResponseBuilder, batch_interval_s: float
) -> AsyncGenerator[list[bytes], None]:
    """Every event of one response, in batches, paced as the plan asks."""
    yield builder.opening()
    deltas, tokens = plan.streamed
    async for due in paced_batches(tokens, plan.options.pace, batch_interval_s):
        yield builder.deltas(deltas[due.start : due.stop], sum(tokens[due.start : due.stop]))
    if plan.fail == "failed":
        yield builder.fail(FAILED_MESSAGE)
    elif plan.fail == "incomplete":
        yield builder.finish("content_filter")
    else:
        yield builder.finish("max_output_tokens" if plan.capped else None)


class _ResponsesAPI:
    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        stream, background = flag(body, "stream"), flag(body, "background")
        model, prompt = model_of(body), responses_prompt(body)
        plan = admit(self._state, body, model, prompt, token_cap(body, "max_output_tokens"))
        if isinstance(plan, web.Response):
            return plan
        builder = ResponseBuilder(body, model, plan.input_tokens)
        stored = self._state.store.add(builder)
        if background:
            self._state.store.run(stored, self._run_background(plan, stored))
            if not stream:
                return web.json_response(builder.snapshot())
            return await self._stream(request, plan, stored, stored.follow(-1))
        if not stream:
            return await self._whole(request, plan, stored)
        batches = generate(plan, builder, self._state.batch_interval_s)
        return await self._stream(request, plan, stored, batches)

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        stored = self._state.store.get(request.match_info["id"])
        if stored is None:
            return not_found(request.match_info["id"])
        if request.query.get("stream", "false").lower() != "true":
            return web.json_response(stored.builder.snapshot())
        if not stored.builder.background:
            return bad_request(
                "Only responses created with background=true can be streamed.", "stream"
            )
        after = _starting_after(request)
        if isinstance(after, web.Response):
            return after
        response = await open_stream(request)
        with contextlib.suppress(ConnectionResetError):
            await pump(request, response, stored.follow(after), first_seq=after + 1)
        return response

    async def cancel(self, request: web.Request) -> web.Response:
        stored = self._state.store.get(request.match_info["id"])
        if stored is None:
            return not_found(request.match_info["id"])
        if not stored.builder.background:
            return bad_request("Only responses created with background=true can be cancelled.")
        stored.cancel()  # idempotent: a finished response is returned as it is
        return web.json_response(stored.builder.snapshot())

    async def delete(self, request: web.Request) -> web.Response:
        response_id = request.match_info["id"]
        stored = self._state.store.get(response_id)
        if stored is None:
            return not_found(response_id)
        stored.cancel()
        self._state.store.forget(response_id)
        return web.json_response({"id": response_id, "object": "response", "deleted": True})

    async def _run_background(self, plan: Plan, stored: StoredResponse) -> None:
        try:
            async for batch in generate(plan, stored.builder, self._state.batch_interval_s):
                stored.append(batch)
        finally:
            stored.close()

    async def _whole(
        self, request: web.Request, plan: Plan, stored: StoredResponse
    ) -> web.Response:
        if plan.fail == "break":
            break_connection(request)
            stored.cancel()
            return web.Response(status=500)  # never reaches the client
        try:
            async for _ in generate(plan, stored.builder, self._state.batch_interval_s):
                pass  # the whole answer takes as long as the stream would
        finally:
            stored.close()
        return web.json_response(stored.builder.snapshot())

    async def _stream(
        self,
        request: web.Request,
        plan: Plan,
        stored: StoredResponse,
        batches: AsyncGenerator[list[bytes], None],
    ) -> web.StreamResponse:
        """Stream to this client; a foreground response ends with its stream."""
        breaks_at = None
        if plan.fail == "break":
            breaks_at = stored.builder.opening_events + plan.fail_after
        response = await open_stream(request)
        try:
            await pump(request, response, batches, break_before_seq=breaks_at)
        except ConnectionResetError:
            pass  # the client went away
        finally:
            if not stored.builder.background:
                stored.cancel()  # no-op when finished; a dropped stream stops generating
        return response


def _starting_after(request: web.Request) -> int | web.Response:
    raw = request.query.get("starting_after")
    if raw is None:
        return -1
    try:
        return int(raw)
    except ValueError:
        return bad_request("Invalid 'starting_after': expected an integer.", "starting_after")
