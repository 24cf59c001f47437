"""The aiohttp application and `OpenAILocalServer`, the async context manager tests use."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web
from openai import AsyncOpenAI

from worker.devstack.openai_local import chat_api, responses_api
from worker.devstack.openai_local.errors import bad_request, error_response, invalid_api_key
from worker.devstack.openai_local.options import MODELS, BadRequest, ServerConfig
from worker.devstack.openai_local.state import ServerState
from worker.devstack.ports import LISTEN_BACKLOG
from worker.devstack.processes import InProcessServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STARTED = int(time.time())


def make_app(state: ServerState, handlers: set[asyncio.Task[Any]] | None = None) -> web.Application:
    """The whole API; `handlers` collects running request tasks so a stop can end them."""
    app = web.Application(middlewares=[_guard(state.config.api_key, handlers)])
    app.add_routes(responses_api.routes(state))
    app.add_routes(chat_api.routes(state))
    app.add_routes([web.get("/v1/models", _models), web.get("/v1/models/{id}", _model)])
    return app


def _guard(api_key: str | None, handlers: set[asyncio.Task[Any]] | None) -> Any:
    """Check the key, answer errors in OpenAI's shape, and track running handlers."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = _check_key(request, api_key)
        if refusal is not None:
            return refusal
        task = asyncio.current_task()
        if handlers is not None and task is not None:
            handlers.add(task)
        try:
            return await handler(request)
        except BadRequest as error:
            return bad_request(str(error), error.param)
        except web.HTTPException as error:  # no such route or method: say so as OpenAI does
            if error.status < 400:
                raise
            message = f"Invalid URL ({request.method} {request.path})"
            return error_response(error.status, message, "invalid_request_error")
        finally:
            if handlers is not None and task is not None:
                handlers.discard(task)

    return guard


def _check_key(request: web.Request, api_key: str | None) -> web.Response | None:
    if api_key is None:
        return None
    header = request.headers.get("Authorization", "")
    given = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
    if hmac.compare_digest(given.encode(), api_key.encode()):
        return None
    if not given:
        return error_response(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
        )
    return invalid_api_key(given)


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "openai-local"}


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_object(m) for m in MODELS]})


async def _model(request: web.Request) -> web.Response:
    name = request.match_info["id"]
    if name not in MODELS:
        return error_response(
            404,
            f"The model '{name}' does not exist or you do not have access to it.",
            "invalid_request_error",
            code="model_not_found",
        )
    return web.json_response(_model_object(name))


class OpenAILocalServer(InProcessServer):
    """The local OpenAI-compatible server on 127.0.0.1 (port 0: a free one).

    async with OpenAILocalServer(tokens_per_second=0) as server:
        client = server.client()  # or AsyncOpenAI(base_url=server.base_url, ...)
    """

    def __init__(self, config: ServerConfig | None = None, **overrides: Any) -> None:
        self.config = replace(config or ServerConfig(), **overrides)
        self.state = ServerState.of(self.config)
        self._handlers: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self.port = self.config.port

    @property
    def base_url(self) -> str:
        """What `AsyncOpenAI(base_url=...)` and OPENAI_BASE_URL take."""
        return f"http://{self.config.host}:{self.port}/v1"

    @property
    def api_key(self) -> str:
        return self.config.api_key or "sk-local"

    def client(self, **options: Any) -> AsyncOpenAI:
        """An AsyncOpenAI client for this server; options (max_retries...) go to it."""
        return AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, **options)

    def attempts(self, prompt: str) -> int:
        """How many create requests carried this prompt (retries included)."""
        return self.state.ledger.attempts(prompt)

    def last_request(self, prompt: str) -> dict[str, Any] | None:
        """What the last create request with this prompt (its last user text) carried:
        `model`, `previous_response_id`, `instructions`, and `input` (Responses) or
        `messages` (Chat Completions), None where absent; None if there was none. The
        server remembers the last 1,000 prompts."""
        return self.state.ledger.last_request(prompt)

    def reset(self) -> None:
        """Forget attempts, the failures handed out (`local_fail_times`) and requests."""
        self.state.ledger.clear()

    async def start(self) -> None:
        app = make_app(self.state, self._handlers)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=LISTEN_BACKLOG)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """End background runs and open streams, then close the listener."""
        await self.state.store.close()
        for task in list(self._handlers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
