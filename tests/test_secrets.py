"""No key, token or prompt text in any line the worker writes, and lines an operator can read.

The worker runs as Heroku runs it (`python -m worker run`, LOG_LEVEL=INFO) through a
completed job, a model failure that retries and then dead-letters, a refused model call,
jobs that never parse, a user's prompt and a user's cancel on a conversation channel;
then through starts that fail (a bad setting, Redis away, Ably away). Every line it
writes is searched for the Ably key's secret, the OpenAI key, the Redis password, the
tokens it was issued and every prompt's text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from ably.types.message import Message

from tests.ably_helpers import TextView, wait_for
from tests.worker_harness import Stack, start_worker_process
from worker import logs, redaction
from worker.devstack.redis_server import LocalRedis
from worker.jobs import Job

pytestmark = pytest.mark.timeout(150)

REDIS_PASSWORD = "redis-pw-Zq8sVt3Lk"
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}")
UUID_TAIL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def prompt(kind: str) -> str:
    """A prompt whose text no log line can contain by chance."""
    return f"confidential {kind} question {uuid.uuid4().hex}"


def json_lines(stderr: str) -> list[dict[str, Any]]:
    events = []
    for line in stderr.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"a log line that is not JSON: {line!r}") from None
    return events


def assert_clean(output: str, forbidden: dict[str, str]) -> None:
    """No forbidden value in any line, no JWT, no token query parameter, no repr of a
    traceback."""
    assert output.strip(), "no output at all"
    for line in output.splitlines():
        for what, value in forbidden.items():
            assert value not in line, f"the {what} in a line: {line}"
        assert not JWT.search(line), f"a JWT in a line: {line}"
        assert not re.search(r"accessToken=(?!\[redacted\])", line), line
        assert "<traceback object" not in line, line


async def token_prefix(stack: Stack) -> str:
    """What every token the local Ably issues begins with (`sockudo-ably-` and a uuid)."""
    issued = (await stack.rest().auth.request_token()).token
    prefix = UUID_TAIL.sub("", issued)
    assert 8 <= len(prefix) < len(issued), f"tokens no longer look like {issued!r}"
    return prefix


async def stop(proc: asyncio.subprocess.Process, timeout: float = 30) -> str:
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    return stderr.decode()


async def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def test_a_worker_run_writes_no_key_token_or_prompt(stack: Stack, channel_name: str) -> None:
    chat = f"{channel_name}-chat"
    prompts = {kind: prompt(kind) for kind in (
        "completed", "failing", "refused", "malformed", "chat", "cancelled"
    )}  # fmt: skip
    completed = Job(channel=channel_name, input=prompts["completed"])
    failing = Job(channel=channel_name, input=prompts["failing"], metadata={"local_fail": "failed"})
    refused = Job(channel=channel_name, input=prompts["refused"], metadata={"local_fail": "401"})
    async with LocalRedis(password=REDIS_PASSWORD, tls=True) as guarded:
        world = Stack(guarded, stack.ably, stack.openai, stack.prefix)
        assert world.redis.url.startswith("rediss://")
        env = world.env(log_level="INFO", listen_channels=chat, job_max_attempts=2,
                        stats_interval_seconds=0.5)  # fmt: skip
        forbidden = {
            "Ably key's secret": stack.ably.key.partition(":")[2],
            "OpenAI key": stack.openai.api_key,
            "Redis password": REDIS_PASSWORD,
            "Ably token": await token_prefix(stack),
            **{f"{kind} prompt": text for kind, text in prompts.items()},
        }
        proc = await start_worker_process(env)
        try:
            await world.enqueue(completed, failing, refused)
            queue = world.queue()
            try:  # jobs that never parse, quoting the prompt: dead-lettered with a reason
                bad = {"channel": "no spaces allowed", "input": prompts["malformed"]}
                await queue.redis.xadd(queue.stream, {"job": json.dumps(bad)})
                await queue.redis.xadd(queue.stream, {"job": f"{{{prompts['malformed']}"})
                lease = f"{world.prefix}:session:{chat}:lease"
                deadline = time.monotonic() + 20
                while not await queue.redis.get(lease):  # the worker serves the conversation
                    assert time.monotonic() < deadline, "the worker never took the session"
                    await asyncio.sleep(0.1)
            finally:
                await queue.redis.aclose()
            await user_prompt_and_cancel(world, chat, prompts["chat"], prompts["cancelled"])
            await world.wait_state(completed.id, "completed")
            failed = await world.wait_state(failing.id, "dead", timeout=30)
            assert failed["attempts"] == "2"
            await world.wait_state(refused.id, "dead")
            await asyncio.sleep(0.6)  # a stats line
        except BaseException:
            proc.kill()
            raise
        stderr = await stop(proc)

        # The operator's commands, against the same Redis: no password, no key.
        _, status = await cli(env, "status", failing.id)
        _, dlq = await cli(env, "dlq", "list")
        wrong = {**env, "REDIS_URL": world.redis.url.replace(REDIS_PASSWORD, "wrong-pw-7Hq2")}
        code, refused_status = await cli(wrong, "status")
    assert code == 1 and "wrong-pw-7Hq2" not in refused_status, refused_status
    assert failing.id in status and "dead" in status
    for output in (status, dlq, refused_status):
        assert_clean(output, {k: v for k, v in forbidden.items() if "prompt" not in k})

    assert_clean(stderr, forbidden)
    events = json_lines(stderr)
    names = {e["event"] for e in events}
    for expected in ("job.completed", "job.retry_scheduled", "job.dead_lettered",
                     "session.prompt", "job.cancel_applied", "worker.stats"):  # fmt: skip
        assert expected in names, f"{expected} missing from {sorted(names)}"
    # A prompt's length at INFO, never its text.
    [asked] = [e for e in events if e["event"] == "session.prompt" and e["channel"] == chat
               and e["chars"] == len(prompts["chat"])]  # fmt: skip
    assert asked["level"] == "info"
    assert all(e["level"] != "debug" for e in events)


async def user_prompt_and_cancel(world: Stack, chat: str, asked: str, cancelled: str) -> None:
    """Alice asks on the conversation channel (and is answered), then asks a slow question
    and cancels it while it streams."""
    view = TextView()
    client = world.realtime(client_id="alice")
    try:
        channel = client.channels.get(chat)
        await channel.subscribe(view.on_message)
        first = f"ask-{uuid.uuid4().hex[:10]}"
        await channel.publish(Message(name="prompt", id=first, data=asked))
        await wait_for(lambda: view.status(first) == "complete", 30, "the user's answer")
        slow = f"ask-{uuid.uuid4().hex[:10]}"
        await channel.publish(
            Message(name="prompt", id=slow, data=cancelled,
                    extras={"headers": {"model": "local-slow"}})
        )  # fmt: skip
        await wait_for(lambda: view.status(slow) == "streaming", 30, "the slow answer to start")
        await channel.publish(Message(name="cancel", extras={"headers": {"responseId": slow}}))
        await wait_for(lambda: view.status(slow) == "cancelled", 30, "the cancelled answer")
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("ABLY_API_KEY", "app.key-without-colon-Xs3cretX"), ("REDIS_URL", "http://:Xs3cretX@host/0"),
     ("WORKER_CONCURRENCY", "Xs3cretX"), ("OPENAI_API_KEY", None)],
)  # fmt: skip
async def test_a_bad_setting_is_named_and_its_value_never_echoed(
    stack: Stack, variable: str, value: str | None
) -> None:
    env = stack.env()
    if value is None:
        env.pop(variable)
    else:
        env[variable] = value
    code, output = await cli(env, "run")
    assert code == 2
    [line] = output.strip().splitlines()
    assert line.startswith("error: bad configuration") and variable in line, line
    assert "Xs3cretX" not in line
    assert_clean(output, {"Ably key's secret": stack.ably.key.partition(":")[2],
                          "OpenAI key": stack.openai.api_key})  # fmt: skip


async def test_an_unreachable_ably_gives_readable_lines_and_a_clear_last_one(
    stack: Stack,
) -> None:
    env = {**stack.env(log_level="INFO"), "ABLY_ENDPOINT": "http://127.0.0.1:1"}
    proc = await start_worker_process(env)
    _, raw = await asyncio.wait_for(proc.communicate(), 60)
    stderr = raw.decode()
    assert proc.returncode == 1
    assert_clean(stderr, {"Ably key's secret": stack.ably.key.partition(":")[2],
                          "OpenAI key": stack.openai.api_key})  # fmt: skip
    *lines, last = stderr.strip().splitlines()
    events = json_lines("\n".join(lines))
    sdk = [e for e in events if e.get("logger", "").startswith("ably")]
    assert sdk, "the SDK said nothing about the connection it could not make"
    for event in sdk:  # a reason on one line, never the repr of an exc_info tuple
        assert "exc_info" not in event, event
        assert isinstance(event.get("error"), str) and "\n" not in event["error"], event
    assert events[-1]["event"] == "worker.start_failed"
    assert last.startswith("error: no Ably connection after 30 s: ") and "ABLY_ENDPOINT" in last
    assert "cannot connect to host 127.0.0.1:1" in last.lower()  # what failed, and where


async def test_an_unreachable_redis_fails_at_once_and_never_dials_ably(stack: Stack) -> None:
    dialled: list[object] = []

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.append(writer.get_extra_info("peername"))
        writer.close()

    listener = await asyncio.start_server(count, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        env = {**stack.env(log_level="INFO"), "ABLY_ENDPOINT": f"http://127.0.0.1:{port}",
               "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"}  # fmt: skip
        # How long a start that fails before any service takes: a bad setting, plus the
        # worker's imports, which `run` makes only once the settings are good.
        started = time.monotonic()
        code, _ = await cli({**env, "WORKER_CONCURRENCY": "none"}, "run")
        imports = await asyncio.create_subprocess_exec(sys.executable, "-c", "import worker.app")
        assert await imports.wait() == 0
        baseline = time.monotonic() - started
        assert code == 2
        started = time.monotonic()
        code, output = await cli(env, "run")
        took = time.monotonic() - started
    finally:
        listener.close()
        await listener.wait_closed()
    assert code == 1
    assert took - baseline < 2.0, f"{took:.1f} s to fail, {baseline:.1f} s for a bad setting"
    assert dialled == [], "the worker dialled Ably although Redis was unreachable"
    assert_clean(output, {"Redis password": REDIS_PASSWORD})
    log_line, last = output.strip().splitlines()  # one log line and the error, nothing else
    assert json.loads(log_line)["event"] == "worker.start_failed"
    assert last.startswith("error: cannot reach Redis") and "REDIS_URL" in last


# -- the log pipeline, in this process -------------------------------------------------------


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """`configure_logging` as the worker runs it, restored afterwards; yields a reader of
    the lines written since the last read."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    levels = {name: logging.getLogger(name).level for name in logs._QUIET_LOGGERS}
    capsys.readouterr()

    def read() -> list[dict[str, Any]]:
        return json_lines(capsys.readouterr().err)

    try:
        yield read
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        structlog.reset_defaults()
        redaction.SECRETS.clear()


def test_sdk_records_are_redacted_and_their_exceptions_readable(json_logs: Any) -> None:
    import httpx

    logs.configure_logging("json", "DEBUG")
    logs.register_secrets("k3y-s3cret-value", None, "")
    sdk = logging.getLogger("ably.realtime.connectionmanager")
    sdk.warning("connect(): ws://127.0.0.1?clientId=w&accessToken=tok-abc123456&v=5")
    sdk.warning("Auth options: {'key_name': 'app.key', 'key_secret': 'k3y-s3cret-value'}")
    sdk.error("fail_queued_messages(): Failed to send protocol message: "
              "{'messages': [{'data': 'the user prompt'}]}")  # fmt: skip
    try:
        raise httpx.ConnectError("All connection attempts failed")
    except httpx.ConnectError:
        sdk.exception("Connection to 127.0.0.1 failed")
    try:
        {}["missing"]
    except KeyError:
        sdk.exception("a bug in the SDK")
    logging.getLogger("hpack").debug("Encoding header: (b'authorization', b'Bearer sk-1')")
    logs.get_logger("worker").warning(
        "ours", redis="rediss://:pw-abc-123@host:6379/0", note="with k3y-s3cret-value inside",
        token="a-token-value",
    )  # fmt: skip
    events = json_logs()
    text = json.dumps(events)
    assert "k3y-s3cret-value" not in text and "tok-abc123456" not in text
    assert "the user prompt" not in text and "pw-abc-123" not in text
    assert "a-token-value" not in text and "sk-1" not in text
    assert not any(e.get("logger") == "hpack" for e in events)
    by_event = {e["event"]: e for e in events}
    network = by_event["Connection to 127.0.0.1 failed"]
    assert network["error"] == "ConnectError: All connection attempts failed"
    assert "exc_info" not in network and "exception" not in network
    bug = by_event["a bug in the SDK"]
    assert bug["exception"].startswith("Traceback") and "KeyError: 'missing'" in bug["exception"]
    ours = by_event["ours"]
    assert ours["redis"] == "rediss://:***@host:6379/0" and ours["token"] == "[redacted]"
    assert ours["note"] == "with [redacted] inside"
