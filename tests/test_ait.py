"""Ably AI Transport's wire end to end: the real worker, the channel read as a client would.

The Python half reads the raw messages (names, actions, `extras.ai`) and checks them
against the wire `worker.transport.ait` documents; `test_ait_client` drives the real
`@ably/ai-transport` 0.8.0 client against the same stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ably.types.message import Message, MessageAction
from structlog.testing import capture_logs

from tests import test_conformance_ablyjs
from tests.ably_helpers import wait_for
from tests.worker_harness import Stack, running_worker
from worker.devstack.fault_proxy import FaultProxy
from worker.devstack.openai_local import answer_text
from worker.jobs import Job
from worker.redis_client import connect_redis
from worker.sessions import session as session_module
from worker.sessions.keys import lease_key
from worker.transport import ait, lookup

pytestmark = pytest.mark.timeout(90)

CLIENT_SCRIPT = Path(__file__).parent / "js" / "ait_client.mjs"
# The `ablyjs_installed` fixture: Node, with tests/js/node_modules installed from the lock.
node_installed = test_conformance_ablyjs.ablyjs_installed


def prompt(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


class Wire:
    """Every message a subscriber gets on the channel, in order."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def on_message(self, message: Any) -> None:
        self.messages.append(message)

    def named(self, name: str) -> list[Any]:
        return [m for m in self.messages if m.name == name]

    def transport(self, message: Any) -> dict[str, str]:
        return dict(((message.extras or {}).get("ai") or {}).get("transport") or {})

    def run_end(self) -> Any | None:
        ends = self.named(ait.RUN_END)
        return ends[-1] if ends else None

    def output(self) -> list[Any]:
        """The answer message's create, appends and updates (appends carry no name)."""
        return [m for m in self.messages if (m.extras or {}).get("ai", {}).get("codec")]


@contextlib.asynccontextmanager
async def watching(stack: Stack, channel: str) -> AsyncIterator[Wire]:
    wire = Wire()
    client = stack.realtime()
    try:
        await client.channels.get(channel).subscribe(wire.on_message)
        yield wire
    finally:
        await client.close()


async def served(stack: Stack, channel: str) -> None:
    """Once a worker holds the channel's session and has attached: what a user publishes
    from now on is answered (the session starts from when it was opened)."""
    redis = connect_redis(stack.redis.url)
    try:
        key = lease_key(stack.prefix, channel)
        deadline = asyncio.get_running_loop().time() + 15
        while not await redis.get(key):
            assert asyncio.get_running_loop().time() < deadline, "the session was never taken"
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()
    await asyncio.sleep(0.5)  # the lease is taken before the attach


def expected_output_transport(job: Job, status: str) -> dict[str, str]:
    u, c = job.input_codec_message_id, job.user_client_id
    return {
        "role": "assistant", "codec-message-id": f"{job.id}:answer", "run-id": f"run:{job.id}",
        "run-client-id": c or "", "input-codec-message-id": u or "", "input-client-id": c or "",
        "parent": u or "", "stream": "true", "status": status, "stream-id": f"{job.id}:text",
    }  # fmt: skip


async def test_an_ait_job_is_a_run_start_one_streamed_output_and_a_run_end(
    stack: Stack, channel_name: str
) -> None:
    text = prompt("ait answer")
    u = f"u-{uuid.uuid4().hex[:8]}"
    job = Job(channel=channel_name, input=text, wire="ait", user_client_id="alice",
              input_codec_message_id=u, metadata={"topic": "t1"})  # fmt: skip
    async with watching(stack, channel_name) as wire, running_worker(stack.settings()):
        await stack.enqueue(job)
        await stack.wait_state(job.id, "completed")
        await wait_for(lambda: wire.run_end() is not None, what="ai-run-end")

    first, last = wire.messages[0], wire.messages[-1]
    assert first.name == ait.RUN_START and last.name == ait.RUN_END
    assert wire.transport(first) == {
        "run-id": f"run:{job.id}", "run-client-id": "alice", "parent": job.input_codec_message_id,
        "input-codec-message-id": job.input_codec_message_id, "input-client-id": "alice",
    }  # fmt: skip
    end = wire.transport(last)
    assert end.pop("run-reason") == "complete" and "parent" not in end
    assert end["run-id"] == f"run:{job.id}"

    output = wire.output()
    create, close = output[0], output[-1]
    assert create.name == ait.OUTPUT and create.action == MessageAction.MESSAGE_CREATE
    assert create.data in ("", None)
    assert wire.transport(create) == expected_output_transport(job, "streaming")
    codec = {"kind": "text", "id": f"{job.id}:text", "messageId": f"{job.id}:answer"}
    assert create.extras["ai"]["codec"] == codec
    appends = [m for m in output if m.action == MessageAction.MESSAGE_APPEND]
    assert appends and all(
        wire.transport(m) == expected_output_transport(job, "streaming")
        and m.extras["ai"]["codec"] == codec for m in appends
    )  # fmt: skip
    assert "".join(m.data for m in appends) == answer_text(text)
    # The close is the last change to the message, and carries the whole text.
    assert close.action == MessageAction.MESSAGE_UPDATE and close.data == answer_text(text)
    assert wire.transport(close) == expected_output_transport(job, "complete")
    assert output.index(close) == len(output) - 1
    # Our own headers ride beside `extras.ai`.
    assert close.extras["headers"]["responseId"] == job.id
    assert close.extras["headers"]["topic"] == "t1"

    history = await stack.history(channel_name)
    assert [m.name for m in reversed(history)] == [ait.RUN_START, ait.OUTPUT, ait.RUN_END]


async def test_wire_protocol_ait_is_the_wire_of_jobs_that_name_none(
    stack: Stack, channel_name: str
) -> None:
    text = prompt("ait by setting")
    job = Job(channel=channel_name, input=text)  # no `wire`: the setting decides
    settings = stack.settings(wire_protocol="ait")
    async with watching(stack, channel_name) as wire, running_worker(settings):
        await stack.enqueue(job)
        await stack.wait_state(job.id, "completed")
        await wait_for(lambda: wire.run_end() is not None, what="ai-run-end")
    names = [m.name for m in wire.messages]
    assert names[0] == ait.RUN_START and names[-1] == ait.RUN_END
    assert wire.output()[-1].data == answer_text(text)


async def test_an_ait_answer_too_long_to_resend_closes_with_an_empty_append(
    stack: Stack, channel_name: str
) -> None:
    # Over 60 KB the close cannot carry the whole text; an update without it would empty
    # the answer the AI Transport client shows, so the close is an empty append.
    text = prompt("ait long")
    tokens = {"local_tokens": "24000", "local_tokens_per_second": "0"}
    job = Job(channel=channel_name, input=text, wire="ait", metadata=tokens)
    async with watching(stack, channel_name) as wire, running_worker(stack.settings()):
        await stack.enqueue(job)
        await stack.wait_state(job.id, "completed", timeout=60)
        await wait_for(lambda: wire.run_end() is not None, what="ai-run-end")
    output = wire.output()
    close = output[-1]
    assert close.action == MessageAction.MESSAGE_APPEND and not close.data
    assert wire.transport(close)["status"] == "complete"
    appended = "".join(m.data or "" for m in output if m.action == MessageAction.MESSAGE_APPEND)
    expected = answer_text(text, 24000)
    assert len(expected.encode()) > 60_000 and appended == expected
    found = await lookup.response_state(stack.rest().channels.get(channel_name), close.serial)
    assert found is not None and found.text == expected


async def test_an_ait_answer_asks_the_model_while_its_run_start_is_on_its_way(
    stack: Stack, channel_name: str
) -> None:
    """The model's own delay overlaps the `ai-run-start` round trip (and the create's):
    with a slow Ably, the model is asked before the run has started."""
    text = prompt("asked early")
    job = Job(channel=channel_name, input=text, wire="ait", user_client_id="alice")
    async with FaultProxy(stack.ably.endpoint) as proxy:
        with capture_logs() as logs:
            async with running_worker(stack.settings(ably_endpoint=proxy.endpoint)):
                await wait_for(lambda: any(e["event"] == "worker.started" for e in logs))
                proxy.set_latency(1000)
                await stack.enqueue(job)
                await wait_for(lambda: stack.openai.attempts(text) == 1, what="the model asked")
                assert not [e for e in logs if e["event"] == "ait.run_started"]
                await stack.wait_state(job.id, "completed", timeout=30)
    assert [e["event"] for e in logs if e["event"].startswith("ait.run_")] == [
        "ait.run_started",
        "ait.run_ended",
    ]


async def test_a_failed_ait_job_closes_its_output_and_ends_the_run_with_an_error(
    stack: Stack, channel_name: str
) -> None:
    job = Job(channel=channel_name, input=prompt("refused"), wire="ait", user_client_id="alice",
              input_codec_message_id="u-fail", metadata={"local_fail": "401"})  # fmt: skip
    async with watching(stack, channel_name) as wire, running_worker(stack.settings()):
        await stack.enqueue(job)
        record = await stack.wait_state(job.id, "dead")
        await wait_for(lambda: wire.run_end() is not None, what="ai-run-end")

    end = wire.transport(wire.run_end())
    assert end["run-reason"] == "error" and end["error-code"] == "104008"
    assert end["error-message"] and end["error-message"] in record["error"]
    close = wire.output()[-1]
    assert wire.transport(close)["status"] == "cancelled"  # `failed` has no AIT spelling
    assert close.extras["headers"]["status"] == "failed"


def ai_input(text: str, codec_message_id: str, event_id: str, part: int = 0) -> Message:
    """One text part of a user message, as the 0.8.0 client publishes it (Vercel codec)."""
    transport = {"role": "user", "codec-message-id": codec_message_id, "event-id": event_id,
                 "run-client-id": "alice", "stream": "false", "discrete": "true"}  # fmt: skip
    codec = {"kind": "user-message", "partType": "text", "messageId": f"ui-{codec_message_id}"}
    extras = {"ai": {"transport": transport, "codec": codec}}
    return Message(name=ait.INPUT, data=text, extras=extras)


@pytest.mark.parametrize("frames", ["one publish", "a publish per part"])
async def test_an_ai_input_in_parts_on_a_served_channel_is_one_job_answered_on_the_ait_wire(
    stack: Stack, channel_name: str, frames: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ably delivers one publish's messages together; Sockudo sends them a frame each: the
    parts are gathered until a quiet moment (here widened, so the test can space them)."""
    monkeypatch.setattr(session_module, "PARTS_QUIET_S", 1.5)
    u, event_id = f"u-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    first, second = prompt("part one"), prompt("part two")
    settings = stack.settings(listen_channels=channel_name)
    async with watching(stack, channel_name) as wire, running_worker(settings):
        client = stack.realtime(client_id="alice")
        try:
            channel = client.channels.get(channel_name)
            await channel.attach()
            await served(stack, channel_name)
            parts = [ai_input(first, u, event_id), ai_input(second, u, event_id)]
            if frames == "one publish":
                await channel.publish(parts)
            else:  # two frames, the second one well after the first
                await channel.publish(parts[0])
                await asyncio.sleep(0.3)
                await channel.publish(parts[1])
            await stack.wait_state(event_id, "completed")  # the job id: the input's event-id
            await wait_for(lambda: wire.run_end() is not None, what="ai-run-end")
        finally:
            await client.close()

    job = Job.model_validate_json((await stack.status(event_id))["payload"])
    assert (job.wire, job.input_codec_message_id, job.user_client_id) == ("ait", u, "alice")
    assert job.input == f"{first}\n{second}"
    close = wire.output()[-1]
    assert close.data == answer_text(str(job.input))
    assert wire.transport(close)["input-codec-message-id"] == u
    assert wire.transport(close)["input-client-id"] == "alice"


async def test_a_backend_enqueues_an_input_by_its_event_id_and_the_worker_finds_it(
    stack: Stack, channel_name: str
) -> None:
    """The README's backend handler for a channel no worker serves yet: the input is on
    the channel, the job names it by the invocation's `inputEventId` only."""
    u, event_id, text = f"u-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, prompt("backend")
    client = stack.realtime(client_id="alice")
    try:
        await client.channels.get(channel_name).publish(ai_input(text, u, event_id))
    finally:
        await client.close()
    job = Job(id=event_id, channel=channel_name, input=text, wire="ait", input_event_id=event_id)
    async with watching(stack, channel_name) as wire, running_worker(stack.settings()):
        await stack.enqueue(job)
        await stack.wait_state(job.id, "completed")
        await wait_for(lambda: wire.run_end() is not None, what="ai-run-end")

    start = wire.transport(wire.named(ait.RUN_START)[0])
    assert start["parent"] == u and start["input-client-id"] == "alice"
    assert wire.output()[-1].data == answer_text(text)
    # The session the enqueue opened starts after the input: no second answer to it.
    await asyncio.sleep(0.5)
    assert len(wire.named(ait.RUN_START)) == 1


async def test_a_backend_enqueueing_an_input_the_worker_also_reads_makes_one_answer(
    stack: Stack, channel_name: str
) -> None:
    u, event_id, text = f"u-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, prompt("both")
    job = Job(id=event_id, channel=channel_name, input=text, wire="ait", input_event_id=event_id)
    settings = stack.settings(listen_channels=channel_name)
    async with watching(stack, channel_name) as wire, running_worker(settings):
        await served(stack, channel_name)
        client = stack.realtime(client_id="alice")
        try:
            await client.channels.get(channel_name).publish(ai_input(text, u, event_id))
        finally:
            await client.close()
        queue = stack.queue()
        try:
            await queue.enqueue(job)  # whoever is first, the other makes no second job
        finally:
            await queue.redis.aclose()
        await stack.wait_state(event_id, "completed")
        await wait_for(lambda: wire.run_end() is not None, what="ai-run-end")
        await asyncio.sleep(0.5)
    assert len(wire.named(ait.RUN_START)) == 1 and len(wire.named(ait.RUN_END)) == 1
    assert wire.output()[-1].data == answer_text(text)


async def test_an_ai_cancel_naming_the_input_stops_the_answer_and_ends_the_run_cancelled(
    stack: Stack, channel_name: str
) -> None:
    u = f"u-{uuid.uuid4().hex[:8]}"
    job = Job(channel=channel_name, input=prompt("long"), wire="ait", user_client_id="alice",
              input_codec_message_id=u,
              metadata={"local_tokens": "400", "local_tokens_per_second": "40"})  # fmt: skip
    async with watching(stack, channel_name) as wire, running_worker(stack.settings()):
        await stack.enqueue(job)
        await wait_for(lambda: len(wire.output()) > 3, what="the answer streaming")
        client = stack.realtime(client_id="alice")
        try:
            cancel = {"event-id": uuid.uuid4().hex, "input-codec-message-id": u}
            await client.channels.get(channel_name).publish(
                Message(name=ait.CANCEL, extras={"ai": {"transport": cancel}})
            )
            await stack.wait_state(job.id, "cancelled")
            await wait_for(lambda: wire.run_end() is not None, what="ai-run-end")
        finally:
            await client.close()

    assert wire.transport(wire.run_end())["run-reason"] == "cancelled"
    close = wire.output()[-1]
    assert wire.transport(close)["status"] == "cancelled"
    assert close.data and answer_text(job.input).startswith(close.data)  # type: ignore[arg-type]
    assert close.data != answer_text(job.input)  # type: ignore[arg-type]


# -- the real client: @ably/ai-transport 0.8.0 ------------------------------------------


@contextlib.asynccontextmanager
async def app_backend() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """The app's `api` endpoint, which the ChatTransport POSTs each invocation to after
    publishing the input. The worker serves the channel, so the input is a job already:
    the handler only answers (the README's "backend handler")."""
    from aiohttp import web

    invocations: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        invocations.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/api/chat", invocations
    finally:
        await runner.cleanup()


async def run_client(
    node: str, scenario: str, stack: Stack, channel: str, api_url: str, text: str, expected: str
) -> dict[str, Any]:
    """One scenario of tests/js/ait_client.mjs; its result line, asserted ok."""
    env = {**os.environ, "ABLY_ENDPOINT": stack.ably.endpoint, "ABLY_API_KEY": stack.ably.key,
           "CHANNEL": channel, "API_URL": api_url, "PROMPT": text,
           "EXPECTED": expected}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        node, str(CLIENT_SCRIPT), scenario, cwd=CLIENT_SCRIPT.parent, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    assert lines, f"no result from {scenario}\nstdout:\n{out.decode()}\nstderr:\n{err.decode()}"
    result: dict[str, Any] = json.loads(lines[-1])
    shown = json.dumps(result, indent=2, ensure_ascii=False)
    assert result["ok"], f"{scenario} failed:\n{shown}\nstderr:\n{err.decode()[-3000:]}"
    return result


def client_settings(stack: Stack, channel: str, **overrides: Any) -> Any:
    """A worker with WIRE_PROTOCOL=ait serving the conversation channel."""
    return stack.settings(listen_channels=channel, wire_protocol="ait", **overrides)


async def test_the_ait_client_gets_the_models_answer(
    stack: Stack, channel_name: str, node_installed: str
) -> None:
    text = prompt("client asks")
    async with (
        app_backend() as (api_url, invocations),
        running_worker(client_settings(stack, channel_name)),
    ):
        await served(stack, channel_name)
        await run_client(node_installed, "answer", stack, channel_name, api_url, text,
                         answer_text(text))  # fmt: skip
    # The invocation the backend got names the input and the channel.
    assert len(invocations) == 1 and invocations[0]["sessionName"] == channel_name
    assert invocations[0]["inputEventId"]


async def test_stop_through_the_ait_client_cancels_and_keeps_the_partial_text(
    stack: Stack, channel_name: str, node_installed: str
) -> None:
    text = prompt("client stops")
    settings = client_settings(stack, channel_name, openai_model="local-slow")
    async with app_backend() as (api_url, _), running_worker(settings):
        await served(stack, channel_name)
        await run_client(node_installed, "stop", stack, channel_name, api_url, text,
                         answer_text(text))  # fmt: skip


async def test_a_model_failure_shows_on_the_ait_clients_run(
    stack: Stack, channel_name: str, node_installed: str
) -> None:
    from worker.devstack.openai_local import OpenAILocalServer

    text = prompt("client fails")
    async with OpenAILocalServer(api_key="sk-only-this") as refusing, app_backend() as (api_url, _):
        settings = client_settings(stack, channel_name, openai_base_url=refusing.base_url,
                                   openai_api_key="sk-not-this")  # fmt: skip
        async with running_worker(settings):
            await served(stack, channel_name)
            result = await run_client(node_installed, "failure", stack, channel_name,
                                      api_url, text, "")  # fmt: skip
    run = result["detail"]["run"]
    assert run["status"] == "error" and run["code"] == 104008
    assert "401" in run["message"] or "refused" in run["message"].lower()


async def test_ait_clients_opened_mid_answer_and_after_end_with_the_live_text(
    stack: Stack, channel_name: str, node_installed: str
) -> None:
    text = prompt("client hydrates")
    settings = client_settings(stack, channel_name, openai_model="local-slow")
    async with app_backend() as (api_url, _), running_worker(settings):
        await served(stack, channel_name)
        await run_client(node_installed, "hydrate", stack, channel_name, api_url, text,
                         answer_text(text))  # fmt: skip
