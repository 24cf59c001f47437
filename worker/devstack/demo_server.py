"""The demo page's server: the backend a chat front end needs beside this worker.

`worker dev` starts it and prints `DEMO_URL`; the page itself is `web/` (one HTML file,
one JavaScript module, one style sheet). Everything live goes between the browser and
Ably directly; this server only does what a product's backend does:

- `GET /` (and `/app.js`, `/style.css`): the page;
- `GET /vendor/ably.min.js`: ably-js's browser bundle from the local npm install
  (`web/node_modules`, `npm ci` in the set-up): no CDN;
- `GET /config`: what the page needs to connect: its user, the Ably endpoint, the
  agents' presence channel and the agents' ids;
- `GET /auth?user=ID`: the user's Ably token (a JWT, as `authUrl` wants it): their own
  conversations with `worker.tokens.user_token`'s operations, and the agents channel with
  `subscribe` only (to see who is online, never to enter);
- `GET /conversations?user=ID`: the user's conversations, newest first;
- `POST /conversations?user=ID` `{prompt, model?}`: a new conversation: a channel of its
  own, recorded for the user, and its first prompt enqueued with one `worker.enqueue`
  call (which also makes the worker serve the channel); answers `{channel, promptId}`.

Sign-in is a demo's: `?user=` names the user (default `demo-user`), and anyone may be
anyone. A real backend reads its own session instead, in one place (`_user`).

The first prompt is enqueued here, under a job id the server picks; the page then
publishes that prompt on the channel as a `prompt` message with that same id, so the
transcript holds it. The worker's session turns a `prompt` into the job whose id is the
message id, which already exists: one answer, and the session knows it is the
conversation's current one (a follow-up waits for it and is chained to it). Follow-ups
go on the channel only.
"""

from __future__ import annotations

import json
import re
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from aiohttp import web

import worker
from worker.jobs import JobError, one_line
from worker.logs import get_logger
from worker.redis_client import connect_redis
from worker.settings import Settings
from worker.tokens import JWT_CONTENT_TYPE, user_capability, user_claims

log = get_logger("worker.demo")

ROOT = Path(__file__).resolve().parents[2]
WEB_DIR = ROOT / "web"
ABLY_BUNDLE = WEB_DIR / "node_modules" / "ably" / "build" / "ably.min.js"
PAGE_FILES = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}

DEFAULT_USER = "demo-user"
CHANNEL_NAMESPACE = "conversation"
TOKEN_TTL_S = 3600
MAX_PROMPT_CHARS = 8000
TITLE_CHARS = 60
_USER_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
NO_STORE = {"Cache-Control": "no-store"}


class DemoServer:
    """The demo page's backend on `host:port` (0: a free port); `url` once started."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        agent_ids: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.agent_ids = list(agent_ids) or [settings.worker_id]
        self.redis = connect_redis(settings.redis_url)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def __aenter__(self) -> DemoServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> str:
        if not ABLY_BUNDLE.exists():
            log.warning("demo.no_ably_bundle", path=str(ABLY_BUNDLE),
                        fix="run scripts/setup.sh (npm ci --prefix web)")  # fmt: skip
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("demo.started", url=self.url)
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.redis.aclose()

    def app(self) -> web.Application:
        app = web.Application()
        for path, name in PAGE_FILES.items():
            app.router.add_get(path, _file(WEB_DIR / name))
        app.router.add_get("/vendor/ably.min.js", _file(ABLY_BUNDLE))
        app.router.add_get("/config", self.config)
        app.router.add_route("*", "/auth", self.auth)  # ably-js asks with GET; POST works too
        app.router.add_get("/conversations", self.conversations)
        app.router.add_post("/conversations", self.new_conversation)
        return app

    # -- the user's conversations (kept in Redis) -------------------------------------

    def _key(self, user: str) -> str:
        return f"{self.settings.queue_prefix}:demo:conversations:{user}"

    async def add_conversation(self, user: str, channel: str, title: str) -> None:
        record = {"title": title[:TITLE_CHARS], "created": int(time.time() * 1000)}
        await self.redis.hset(self._key(user), channel, json.dumps(record))

    async def list_conversations(self, user: str) -> list[dict[str, Any]]:
        found = await self.redis.hgetall(self._key(user))
        rows = [{"channel": _text(k), **json.loads(v)} for k, v in found.items()]
        return sorted(rows, key=lambda row: row["created"], reverse=True)

    # -- routes ------------------------------------------------------------------------

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "user": _user(request),
                "ably": _ably_options(self.settings.ably_endpoint),
                "agentsChannel": self.settings.presence_channel,
                "agentIds": self.agent_ids,
            },
            headers=NO_STORE,
        )

    async def auth(self, request: web.Request) -> web.Response:
        """The user's JWT, fetched again by ably-js before it expires and after a new
        conversation (`auth.authorize()`), so it always names all of the user's channels."""
        user = _user(request)
        channels = [row["channel"] for row in await self.list_conversations(user)]
        token = self.token(user, channels)
        return web.Response(text=token, content_type=JWT_CONTENT_TYPE, headers=NO_STORE)

    def token(self, user: str, channels: Sequence[str]) -> str:
        """`worker.tokens`' user token, plus `subscribe` on the agents channel.

        The conversations get exactly `user_token`'s operations (subscribe, history,
        presence, publish); the agents channel gets `subscribe` alone, which is what reading
        presence needs: a user cannot enter it and pose as an agent."""
        agents = self.settings.presence_channel
        claims = user_claims(user, [*channels, agents], ttl=TOKEN_TTL_S)
        capability = user_capability(channels) if channels else {}
        capability[agents] = ["subscribe"]
        claims["x-ably-capability"] = json.dumps(capability, separators=(",", ":"))
        key_name, _, secret = self.settings.ably_api_key.get_secret_value().partition(":")
        with warnings.catch_warnings():  # PyJWT: the local key's secret is short (as tokens.py)
            warnings.filterwarnings("ignore", message="The HMAC key is", category=UserWarning)
            return jwt.encode(
                claims, secret, algorithm="HS256", headers={"kid": key_name, "typ": "JWT"}
            )

    async def conversations(self, request: web.Request) -> web.Response:
        rows = await self.list_conversations(_user(request))
        return web.json_response(rows, headers=NO_STORE)

    async def new_conversation(self, request: web.Request) -> web.Response:
        user = _user(request)
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="a JSON body: {prompt, model?}") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="a JSON body: {prompt, model?}")
        prompt, model = body.get("prompt"), body.get("model") or None
        if not isinstance(prompt, str) or not prompt.strip():
            raise web.HTTPBadRequest(text="prompt: a conversation starts with a prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise web.HTTPBadRequest(text=f"prompt: at most {MAX_PROMPT_CHARS} characters")
        if model is not None and not (isinstance(model, str) and _MODEL_RE.fullmatch(model)):
            raise web.HTTPBadRequest(text="model: letters, digits and . _ : -")
        channel = f"{CHANNEL_NAMESPACE}:{user}:{uuid.uuid4().hex[:10]}"
        prompt_id = f"p{uuid.uuid4().hex}"
        await self.add_conversation(user, channel, " ".join(prompt.split()))
        job: dict[str, Any] = {"id": prompt_id, "channel": channel, "input": prompt,
                               "user_client_id": user}  # fmt: skip
        if model:
            job["model"] = model
        try:
            # The backend's half: one enqueue, as any service would.
            await worker.enqueue(
                redis_url=self.settings.redis_url, queue_prefix=self.settings.queue_prefix, **job
            )
        except (JobError, ValueError) as exc:
            raise web.HTTPBadRequest(text=one_line(str(exc))) from None
        log.info("demo.conversation_started", user=user, channel=channel, job_id=prompt_id)
        return web.json_response({"channel": channel, "promptId": prompt_id}, headers=NO_STORE)


def _user(request: web.Request) -> str:
    """Who is asking. The demo's sign-in is `?user=`; a backend checks its own session."""
    user = request.query.get("user") or DEFAULT_USER
    if not _USER_RE.fullmatch(user):
        raise web.HTTPBadRequest(text="user: 1-32 letters, digits, _ or -")
    return user


def _ably_options(endpoint: str | None) -> dict[str, Any] | None:
    """ably-js client options for `ABLY_ENDPOINT` (None: Ably itself, the SDK's defaults)."""
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    options: dict[str, Any] = {"endpoint": parts.hostname, "tls": tls, "fallbackHosts": []}
    options["tlsPort" if tls else "port"] = port
    return options


def _file(path: Path) -> Any:
    async def serve(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})  # 404 if missing

    return serve


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
