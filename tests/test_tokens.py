"""Tokens for users, tried as a browser would use them: real JWTs from `worker.tokens`
(and from `worker token` run as a command), verified by the local Ably (Sockudo), never
decoded by us to decide anything. A user reads and cancels in their own conversation and
is refused everyone else's; a role the client writes itself counts for nothing; the
agent's answers stay the agent's.

Where Sockudo answers with another code than Ably documents, the test says so and
asserts what Sockudo does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import pytest
from ably import AblyException
from ably.types.message import Message
from aiohttp import web
from pydantic import SecretStr
from structlog.testing import capture_logs

from tests.ably_helpers import TextView, wait_for
from tests.worker_harness import Stack, running_worker
from worker.devstack.ably import AblyKey
from worker.devstack.openai_local import answer_text
from worker.devstack.ports import free_port
from worker.jobs import Job
from worker.tokens import (
    JWT_CONTENT_TYPE,
    MAX_TTL_S,
    ROLE_CLAIM,
    USER_OPERATIONS,
    Grant,
    TokenError,
    auth_handler,
    parse_ttl,
    user_token,
)
from worker.transport.client import realtime_client, rest_client

pytestmark = [
    pytest.mark.timeout(120),
    # Only to read our own tokens back in the shape checks: the local dev secret is short.
    pytest.mark.filterwarnings("ignore:The HMAC key is"),
]

KEY = "app.key:a-secret-of-some-length-for-the-shape-tests"


def _decoded(token: str, secret: str) -> tuple[dict[str, Any], dict[str, Any]]:
    claims = jwt.decode(token, secret, algorithms=["HS256"], options={"verify_exp": False})
    return jwt.get_unverified_header(token), claims


# -- the token's shape (no services) ---------------------------------------------------


def test_a_user_token_is_hs256_with_the_key_name_as_kid_and_only_the_users_channels() -> None:
    token = user_token(
        SecretStr(KEY), "alice", ["conv:1", "conv:2", "conv:1"], ttl="2h", role="admin", now=1000
    )
    header, claims = _decoded(token, KEY.split(":", 1)[1])
    assert header == {"alg": "HS256", "kid": "app.key", "typ": "JWT"}
    assert claims["iat"] == 1000 and claims["exp"] == 1000 + 7200
    assert claims["x-ably-clientId"] == "alice"
    # A JSON string, as Ably wants it; each channel once; no update, delete or wildcard.
    assert json.loads(claims["x-ably-capability"]) == {
        "conv:1": ["history", "presence", "publish", "subscribe"],
        "conv:2": ["history", "presence", "publish", "subscribe"],
    }
    assert claims[ROLE_CLAIM] == "admin" and ROLE_CLAIM == "ably.channel.*"
    no_role = _decoded(user_token(KEY, "bob", "conv:3"), KEY.split(":", 1)[1])[1]
    assert ROLE_CLAIM not in no_role and json.loads(no_role["x-ably-capability"]) == {
        "conv:3": list(USER_OPERATIONS)
    }


def test_the_ttl_reads_units_and_ably_24_hour_cap_is_enforced() -> None:
    assert [parse_ttl(t) for t in ("90s", "30m", "1h", "1.5h", "24h", "1d", "600", 60)] == [
        90, 1800, 3600, 5400, 86400, 86400, 600, 60,
    ]  # fmt: skip
    assert MAX_TTL_S == 86400
    for too_long in ("25h", "24h1s", 86401, "2d"):
        with pytest.raises(TokenError) as refused:
            user_token(KEY, "alice", ["c"], ttl=too_long)
        assert refused.value.field == "ttl"
        if too_long != "24h1s":
            assert "24 h" in str(refused.value), refused.value
    for nonsense in ("", "1w", "-5m", "0s", "soon"):
        with pytest.raises(TokenError, match=r"^ttl: "):
            parse_ttl(nonsense)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"client_id": ""}, "client_id"),
        ({"client_id": "*"}, "client_id"),  # a wildcard identity could publish as anyone
        ({"client_id": "al\nice"}, "client_id"),
        ({"channels": []}, "channels"),
        ({"channels": ["conv:*"]}, "channels"),  # a wildcard reaches other users' channels
        ({"channels": ["*"]}, "channels"),
        ({"channels": ["[*]conv:1"]}, "channels"),
        ({"channels": ["has space"]}, "channels"),
        ({"channels": [f"c{i:04d}" for i in range(400)]}, "channels"),  # over 8 KB
        ({"role": "admin, root"}, "role"),  # could never match one CANCEL_ROLES entry
        ({"role": ""}, "role"),
    ],
)
def test_a_bad_argument_is_a_token_error_naming_it(args: dict[str, Any], field: str) -> None:
    kwargs: dict[str, Any] = {"client_id": "alice", "channels": ["conv:1"], **args}
    with pytest.raises(TokenError) as refused:
        user_token(KEY, **kwargs)
    assert refused.value.field == field and str(refused.value).startswith(f"{field}: ")


def test_a_bad_key_is_an_error_that_never_shows_the_secret() -> None:
    for key in ("no-colon-secret-xyz", "nodot:secret-xyz", "app.key:"):
        with pytest.raises(TokenError) as refused:
            user_token(key, "alice", ["c"])
        assert refused.value.field == "key" and "secret-xyz" not in str(refused.value)


# -- trust, against the local Ably -----------------------------------------------------


def token_for(stack: Stack, client_id: str, *channels: str, role: str | None = None) -> str:
    return user_token(stack.ably.key, client_id, channels, ttl="10m", role=role)


@contextlib.asynccontextmanager
async def browser(stack: Stack, token: str) -> AsyncIterator[Any]:
    """A user's realtime connection with nothing but their token."""
    client = realtime_client(None, stack.ably.endpoint, token=token)
    try:
        yield client
    finally:
        await client.close()


async def refused(action: Any) -> AblyException:
    with pytest.raises(AblyException) as caught:
        await asyncio.wait_for(action, 10)
    return caught.value


def slow_job(channel: str, user: str, tokens: int = 400, per_second: int = 40) -> Job:
    pace = {"local_tokens": str(tokens), "local_tokens_per_second": str(per_second)}
    question = f"{user}'s question {uuid.uuid4().hex[:6]}"
    return Job(channel=channel, input=question, user_client_id=user, metadata=pace)


async def test_a_user_token_reads_and_cancels_in_its_own_conversation_and_is_denied_anothers(
    stack: Stack, channel_name: str
) -> None:
    mine, theirs = channel_name, f"{channel_name}-bob"
    alice_job, bob_job = slow_job(mine, "alice"), slow_job(theirs, "bob", 120, 60)
    token = token_for(stack, "alice", mine)
    view = TextView()
    async with running_worker(stack.settings(listen_channels=f"{mine},{theirs}")), browser(
        stack, token
    ) as alice:  # fmt: skip
        await asyncio.sleep(1.0)  # both sessions are served
        own = alice.channels.get(mine)
        await own.subscribe(view.on_message)  # subscribe
        await stack.enqueue(alice_job, bob_job)
        await wait_for(lambda: view.by_response(alice_job.id) is not None, 15, "alice's answer")
        await own.presence.enter("reading")  # presence
        assert [m.client_id for m in await own.presence.get()] == ["alice"]
        with_token = rest_client(None, stack.ably.endpoint, token=token)
        history = await with_token.channels.get(mine).history()  # history
        assert any(m.name == "response" for m in history.items)

        # Another's conversation: refused by Ably, whatever the operation.
        attach = await refused(alice.channels.get(theirs).attach())
        async with browser(stack, token) as again:  # `theirs` failed to attach on `alice`
            publish = await refused(again.channels.get(theirs).publish(
                Message(name="cancel", extras={"headers": {"responseId": bob_job.id}})
            ))  # fmt: skip
        rest_publish = await refused(with_token.channels.get(theirs).publish(
            Message(name="cancel", extras={"headers": {"responseId": bob_job.id}})
        ))  # fmt: skip
        rest_history = await refused(with_token.channels.get(theirs).history())
        assert [e.code for e in (attach, publish, rest_publish, rest_history)] == [40160] * 4
        assert (rest_publish.status_code, rest_history.status_code) == (403, 403)
        await with_token.close()

        # Her own cancel stops her own answer.
        await own.publish(Message(name="cancel", extras={"headers": {"responseId": alice_job.id}}))
        cancelled = await stack.wait_state(alice_job.id, "cancelled", "completed", timeout=20)
        bob = await stack.wait_state(bob_job.id, "completed", "cancelled", timeout=20)
        await wait_for(lambda: view.status(alice_job.id) == "cancelled", 10, "the closing update")
    assert cancelled["state"] == "cancelled"
    assert bob["state"] == "completed"
    assert [m.data for m in await stack.history(theirs)] == [answer_text(bob_job.input, 120)]


async def test_a_role_the_client_writes_itself_does_not_cancel_another_users_answer(
    stack: Stack, channel_name: str
) -> None:
    """A shared conversation: mallory may publish there (her token says so) and holds a
    real role, `member`; the worker lets `admin` cancel anyone's answer. What she writes
    herself, a `role` or `userClaim` header or an `extras.userClaim`, counts for nothing."""
    job = slow_job(channel_name, "alice", 200, 50)
    mallory = token_for(stack, "mallory", channel_name, role="member")
    stop = {"responseId": job.id}
    settings = stack.settings(listen_channels=channel_name, cancel_roles="admin")
    with capture_logs() as logs:
        async with running_worker(settings), browser(stack, mallory) as client:
            await asyncio.sleep(1.0)
            await stack.enqueue(job)
            await stack.wait_state(job.id, "running")
            shared = client.channels.get(channel_name)
            for forged in ({"role": "admin"}, {"userClaim": "admin"}):
                await shared.publish(Message(name="cancel", extras={"headers": {**stop, **forged}}))
            # Ably sets `extras.userClaim` from the token. Sockudo 5.2.0 refuses a client's
            # own (40000, "Unsupported Ably message.extras field 'userClaim'"); had it taken
            # it, the worker would still have to keep the answer going (asserted below),
            # and this assertion would say that Sockudo changed.
            forged_claim = Message(name="cancel", extras={"userClaim": "admin", "headers": stop})
            claim = await refused(shared.publish(forged_claim))
            assert claim.code == 40000 and "userClaim" in claim.message, claim
            # Nor can she speak as alice: the token's clientId is the only one she has.
            as_alice = await refused(shared.publish(
                Message(name="cancel", client_id="alice", extras={"headers": stop})
            ))  # fmt: skip
            assert as_alice.code == 40012
            record = await stack.wait_state(job.id, "completed", "cancelled", timeout=30)
    # The worker read both cancels that reached the channel, and refused each (the session
    # and the running job's own listener both log it).
    refusals = [e for e in logs if e["event"] == "job.cancel_refused" and e["job_id"] == job.id]
    assert len(refusals) >= 2 and {e["by"] for e in refusals} == {"mallory"}, refusals
    assert {e["reason"] for e in refusals} == {"not the job's user and no allowed role"}
    assert record["state"] == "completed"
    history = await stack.history(channel_name)
    answers = [m for m in history if m.name == "response"]
    assert [a.data for a in answers] == [answer_text(job.input, 200)]
    assert answers[0].extras["headers"]["status"] == "complete"
    assert sum(m.name == "cancel" for m in history) == 2  # the two that Sockudo took


async def test_a_user_token_cannot_update_append_or_delete_the_agents_answer(
    stack: Stack, channel_name: str
) -> None:
    """Ably: updating, appending to or deleting a message needs `message-update-*` /
    `message-delete-*`, which a user token lacks (Ably's error: 40160). Sockudo 5.2.0
    refuses them too, with other codes: over realtime a NACK 40000 ("Connection is not
    allowed to update message on channel"), over REST 401 with 40140 (on which an SDK
    would try to renew its token)."""
    job = Job(channel=channel_name, input=f"the agent's words {uuid.uuid4().hex[:6]}",
              user_client_id="alice")  # fmt: skip
    async with running_worker(stack.settings()):
        await stack.enqueue(job)
        await stack.wait_state(job.id, "completed")
    [answer] = [m for m in await stack.history(channel_name) if m.name == "response"]
    token = token_for(stack, "alice", channel_name)
    forged = {"headers": {"responseId": job.id, "status": "complete", "model": "local"}}
    async with browser(stack, token) as alice:
        own = alice.channels.get(channel_name)
        await own.attach()
        update = await refused(own.update_message(
            Message(serial=answer.serial, name="response", data="forged", extras=forged)
        ))  # fmt: skip
        append = await refused(own.append_message(
            Message(serial=answer.serial, name="response", data=" and more", extras=forged)
        ))  # fmt: skip
        delete = await refused(own.delete_message(Message(serial=answer.serial)))
        await own.publish(Message(name="prompt", data="still allowed"))  # publish is hers
    for what, error in (("update", update), ("append", append), ("delete", delete)):
        assert error.code == 40000 and f"not allowed to {what} message" in error.message, error

    bearer = "Bearer " + base64.b64encode(token.encode()).decode()
    path = f"{stack.ably.endpoint}/channels/{quote_plus(channel_name, safe=':')}/messages/"
    async with aiohttp.ClientSession(headers={"Authorization": bearer}) as http:
        for action, data in ((1, "forged"), (5, " and more"), (2, None)):
            body = {"serial": answer.serial, "name": "response", "action": action,
                    "data": data, "extras": forged}  # fmt: skip
            async with http.patch(path + quote_plus(answer.serial, safe=":"), json=body) as r:
                said = await r.json()
            assert (r.status, said["error"]["code"]) == (401, 40140), said

    after = await stack.rest().channels.get(channel_name).get_message(answer.serial)
    assert after.data == answer_text(job.input) and after.client_id == answer.client_id
    assert after.extras["headers"]["status"] == "complete"


# -- the authUrl endpoint --------------------------------------------------------------


@contextlib.asynccontextmanager
async def auth_server(handler: Any) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/ably/token", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/ably/token"
    finally:
        await runner.cleanup()


async def test_an_auth_url_endpoint_gives_the_signed_in_user_their_token(
    stack: Stack, channel_name: str
) -> None:
    """What a backend mounts for a browser's `authUrl`: the user's JWT as application/jwt
    (Ably's SDKs take application/jwt or text/plain), or 401 for nobody. What the SDK
    asks for in the request (clientId, capability) changes nothing."""
    mine, other = channel_name, f"{channel_name}-other"
    sessions = {"cookie-alice": Grant("alice", [mine], "member")}

    async def who(request: web.Request) -> Grant | None:
        return sessions.get(request.headers.get("X-Session", ""))

    async with auth_server(auth_handler(stack.ably.key, who, ttl="15m")) as url:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as nobody:
                assert nobody.status == 401
            ask_more = {"clientId": "bob", "capability": json.dumps({"*": ["*"]}), "ttl": "1"}
            headers = {"X-Session": "cookie-alice"}
            async with http.get(url, params=ask_more, headers=headers) as response:
                assert response.status == 200
                assert response.content_type == JWT_CONTENT_TYPE
                assert response.headers["Cache-Control"] == "no-store"
                token = await response.text()
            async with http.post(url, data=ask_more, headers=headers) as posted:
                assert posted.status == 200 and posted.content_type == JWT_CONTENT_TYPE
        secret = AblyKey.parse(stack.ably.key).secret
        claims = jwt.decode(token, secret, algorithms=["HS256"])
        assert claims["x-ably-clientId"] == "alice" and claims["exp"] - claims["iat"] == 900
        # The SDK itself, with authUrl, as a browser's would.
        listener = stack.realtime()
        seen: list[Any] = []
        await listener.channels.get(mine).subscribe(lambda m: seen.append(m))
        client = realtime_client(None, stack.ably.endpoint, auth_url=url,
                                 auth_headers={"X-Session": "cookie-alice"})  # fmt: skip
        try:
            own = client.channels.get(mine)
            await own.attach()
            await own.publish(Message(name="prompt", data="hello"))
            await wait_for(lambda: bool(seen), what="alice's prompt")
            assert seen[0].client_id == "alice"
            assert (await refused(client.channels.get(other).attach())).code == 40160
        finally:
            await client.close()
            await listener.close()


def test_an_auth_handler_with_a_bad_key_or_ttl_fails_when_it_is_made() -> None:
    for key, ttl, field in (("nope", "1h", "key"), (KEY, "48h", "ttl")):
        with pytest.raises(TokenError) as refused:
            auth_handler(key, lambda _request: None, ttl=ttl)
        assert refused.value.field == field


# -- the command, as a user runs it ----------------------------------------------------


def token_command() -> list[str]:
    """`uv run worker token` (no sync: the test must not change the environment); the
    venv's own `worker` script where uv is not on PATH."""
    if uv := shutil.which("uv"):
        return [uv, "run", "--no-sync", "worker", "token"]
    return [str(Path(sys.executable).with_name("worker")), "token"]


async def run_token(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *token_command(), *args, env=env, cwd=Path(__file__).parents[1],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_worker_token_prints_a_token_that_opens_exactly_its_channels(
    stack: Stack, channel_name: str
) -> None:
    first, second, other = f"{channel_name}-a", f"{channel_name}-b", f"{channel_name}-c"
    code, out, err = await run_token(
        stack.env(), "--client-id", "carol", "--channel", first, "--channel", second,
        "--ttl", "10m", "--role", "moderator",
    )  # fmt: skip
    assert code == 0, (out, err)
    token = out.strip().splitlines()[-1]  # what a script takes
    assert "carol" in err and "expires" in err and token not in err
    listener = stack.realtime()
    seen: list[Any] = []
    await listener.channels.get(second).subscribe(lambda m: seen.append(m))
    started = time.time()
    try:
        async with browser(stack, token) as carol:
            for name in (first, second):
                channel = carol.channels.get(name)
                await channel.attach()
                await channel.publish(Message(name="prompt", data=f"on {name}"))
            await wait_for(lambda: bool(seen), what="carol's prompt")
            assert seen[0].client_id == "carol"
            assert (await refused(carol.channels.get(other).attach())).code == 40160
            elsewhere = carol.channels.get(f"{other}-2")  # `other` failed: a fresh one
            assert (await refused(elsewhere.publish("prompt", "x"))).code == 40160
    finally:
        await listener.close()
    claims = jwt.decode(token, AblyKey.parse(stack.ably.key).secret, algorithms=["HS256"])
    assert abs(claims["exp"] - (started + 600)) < 30


async def test_worker_token_refuses_bad_input_with_one_line_naming_it(stack: Stack) -> None:
    no_key = {k: v for k, v in stack.env().items() if k != "ABLY_API_KEY"}
    runs = await asyncio.gather(
        run_token(stack.env(), "--client-id", "carol", "--channel", "c", "--ttl", "25h"),
        run_token(stack.env(), "--client-id", "*", "--channel", "c"),
        run_token(stack.env(), "--client-id", "carol", "--channel", "conv:*"),
        run_token(no_key, "--client-id", "carol", "--channel", "c"),
    )
    secret = AblyKey.parse(stack.ably.key).secret
    for (code, out, err), named in zip(
        runs, ["--ttl", "--client-id", "--channel", "ABLY_API_KEY"], strict=True
    ):
        assert code == 2 and out == "", (code, out, err)
        assert err.startswith("error: ") and named in err and len(err.strip().splitlines()) == 1
        assert secret not in err
    assert "24 h" in runs[0][2]
