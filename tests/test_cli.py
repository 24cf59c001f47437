"""The CLI as a user runs it: `python -m worker ...` as its own process, real services.

Each test runs the real command with the environment an operator would set, and checks
what they see (stdout, stderr, exit status) and what it did: what is left in Redis, what
reaches the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.worker_harness import Stack, running_worker
from worker.devstack.openai_local import answer_text
from worker.jobs import Job, Pattern
from worker.redis_client import connect_redis

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Any]:
    """A plain client, to look at what the commands left in Redis."""
    client: Any = connect_redis(stack.redis.url)
    yield client
    await client.aclose()


def prompt(label: str) -> str:
    """A prompt unique to this run."""
    return f"{label} {uuid.uuid4().hex[:8]}"


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


async def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> Ran:
    """`python -m worker ARGS` as its own process (never blocking the loop the worker
    under test runs on)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else None), 30
    )
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def ok(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    ran = await cli(env, *args, stdin=stdin)
    assert ran.code == 0, str(ran)
    return ran.out


async def stream_payloads(redis: Any, prefix: str) -> list[dict[str, Any]]:
    """The jobs in the queue's stream, as the worker will read them."""
    return [json.loads(fields["job"]) for _, fields in await redis.xrange(f"{prefix}:jobs")]


async def record(redis: Any, prefix: str, job_id: str) -> dict[str, str]:
    return dict(await redis.hgetall(f"{prefix}:job:{job_id}"))


# -- schema ------------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/$defs/"), ref
    return schema["$defs"][ref.removeprefix("#/$defs/")]


def _accepts(schema: dict[str, Any], node: dict[str, Any], value: Any) -> bool:
    """A small structural check of `value` against a schema node (no jsonschema here):
    types, enums, nested objects and arrays, anyOf."""
    node = _resolve(schema, node)
    if "anyOf" in node:
        return any(_accepts(schema, option, value) for option in node["anyOf"])
    if "enum" in node and value not in node["enum"]:
        return False
    if "const" in node and value != node["const"]:
        return False
    kind = node.get("type")
    checks: dict[str, Callable[[Any], bool]] = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "null": lambda v: v is None,
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if kind is not None and not checks[kind](value):
        return False
    if kind == "string" and "pattern" in node and not re.search(node["pattern"], value):
        return False
    if kind == "array":
        return all(_accepts(schema, node.get("items", {}), item) for item in value)
    if kind == "object":
        properties = node.get("properties", {})
        if not set(node.get("required", [])) <= set(value):
            return False
        extra = node.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                if not _accepts(schema, properties[key], item):
                    return False
            elif extra is False or (isinstance(extra, dict) and not _accepts(schema, extra, item)):
                return False
    return True


async def test_schema_prints_the_job_json_schema(stack: Stack) -> None:
    schema = json.loads(await ok(stack.env(), "schema"))

    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object"
    assert sorted(schema["required"]) == ["channel", "input"]
    assert {"id", "channel", "input", "model", "pattern", "metadata", "instructions"} <= set(
        schema["properties"]
    )
    assert schema.get("additionalProperties") is False  # a misspelt field is an error
    pattern = _resolve(schema, schema["properties"]["pattern"])
    assert set(pattern["enum"]) == {"message-per-response", "message-per-token"}

    sample = {
        "id": "order-42.reply",
        "channel": "conversation:42",
        "input": [{"role": "user", "content": "Hello"}],
        "model": "gpt-4.1-mini",
        "pattern": "message-per-token",
        "metadata": {"user": "u42"},
        "max_output_tokens": 200,
    }
    assert _accepts(schema, schema, sample)
    assert _accepts(schema, schema, {"channel": "c", "input": "just text"})
    assert not _accepts(schema, schema, {"input": "no channel"})
    assert not _accepts(schema, schema, {**sample, "pattern": "per-word"})
    assert not _accepts(schema, schema, {**sample, "colour": "blue"})
    assert not _accepts(schema, schema, {**sample, "metadata": {"n": 1}})


# -- enqueue -----------------------------------------------------------------------------


async def test_enqueue_prints_the_job_id_and_queues_the_job(
    stack: Stack, redis: Any, channel_name: str
) -> None:
    text = prompt("hello")
    out = await ok(stack.env(), "enqueue", "--channel", channel_name, text)

    job_id = out.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id), out
    [payload] = await stream_payloads(redis, stack.prefix)
    assert payload["id"] == job_id and payload["channel"] == channel_name
    assert payload["input"] == text and payload["pattern"] == "message-per-response"
    stored = await record(redis, stack.prefix, job_id)
    assert stored["state"] == "queued" and json.loads(stored["payload"]) == payload


async def test_enqueue_with_the_same_id_twice_makes_one_job(
    stack: Stack, redis: Any, channel_name: str
) -> None:
    """Two producers racing with one idempotency key: one job, and each is told which."""
    env = stack.env()
    args = ("enqueue", "--channel", channel_name, "--id", "order-7", prompt("once"))

    first, second = sorted(await asyncio.gather(ok(env, *args), ok(env, *args)))
    assert first.strip() == "order-7"
    assert second.startswith("order-7 ") and "already enqueued" in second

    assert [p["id"] for p in await stream_payloads(redis, stack.prefix)] == ["order-7"]
    again = await ok(env, *args)  # and later still
    assert "already enqueued" in again and await redis.xlen(f"{stack.prefix}:jobs") == 1


async def test_enqueue_puts_pattern_model_and_metadata_in_the_job(
    stack: Stack, redis: Any, channel_name: str
) -> None:
    job_id = (
        await ok(
            stack.env(), "enqueue", "--channel", channel_name,
            "--pattern", "message-per-token", "--model", "local-slow",
            "--metadata", "user=u1", "--metadata", "query=a=b", prompt("tokens"),
        )
    ).strip()  # fmt: skip

    [payload] = await stream_payloads(redis, stack.prefix)
    assert payload["id"] == job_id
    assert payload["pattern"] == "message-per-token" and payload["model"] == "local-slow"
    assert payload["metadata"] == {"user": "u1", "query": "a=b"}  # split at the first '='


async def test_enqueue_reads_a_json_job_from_stdin_or_a_file(
    stack: Stack, redis: Any, channel_name: str, tmp_path: Path
) -> None:
    env = stack.env()
    from_stdin = {"id": "from-stdin", "channel": channel_name, "input": prompt("stdin")}
    from_file = {
        "id": "from-file",
        "channel": channel_name,
        "input": [{"role": "user", "content": prompt("file")}],
        "instructions": "Be brief.",
        "metadata": {"source": "file"},
    }
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(from_file))

    printed = await asyncio.gather(
        ok(env, "enqueue", "--json", "-", stdin=json.dumps(from_stdin)),
        ok(env, "enqueue", "--json", str(job_file)),
    )
    assert [out.strip() for out in printed] == ["from-stdin", "from-file"]

    payloads = {p["id"]: p for p in await stream_payloads(redis, stack.prefix)}
    assert payloads["from-stdin"]["input"] == from_stdin["input"]
    assert payloads["from-file"]["input"] == from_file["input"]
    assert payloads["from-file"]["metadata"] == {"source": "file"}
    assert payloads["from-file"]["instructions"] == "Be brief."


# (arguments, standard input, what the error must name)
BAD_JOBS: list[tuple[list[str], str | None, str]] = [
    (["--json", "-"], '{"input": "no channel"}', "channel"),
    (["--json", "-"], "{not json", "not valid JSON"),
    (["--json", "/nonexistent/job.json"], None, "/nonexistent/job.json"),
    (["--channel", "has space", "hello"], None, "channel"),
    (["--channel", "c", "--metadata", "novalue", "hello"], None, "--metadata"),
    (["hello"], None, "--channel"),
    (["--channel", "c", "--pattern", "per-word", "hello"], None, "per-word"),
]


async def test_a_bad_job_is_refused_with_exit_2_naming_the_field(stack: Stack, redis: Any) -> None:
    env = stack.env()
    runs = await asyncio.gather(
        *(cli(env, "enqueue", *args, stdin=stdin) for args, stdin, _ in BAD_JOBS)
    )
    for (args, _, named), ran in zip(BAD_JOBS, runs, strict=True):
        assert ran.code == 2, f"{args}: {ran}"
        assert ran.out == "", f"{args}: {ran}"
        assert named in ran.err and "Traceback" not in ran.err, f"{args}: {ran}"
        if "--pattern" not in args:  # typer words an option's own refusal
            assert ran.err.startswith("error: "), f"{args}: {ran}"
    assert await redis.exists(f"{stack.prefix}:jobs") == 0  # nothing enqueued


# -- enqueueing from any language: one XADD -----------------------------------------------


def redis_cli_binary() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        pytest.fail(
            "redis-cli not found on PATH: it comes with redis-server "
            "(`apt-get install redis-server` or `redis-tools`)"
        )
    return binary


async def redis_cli(stack: Stack, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        redis_cli_binary(), "-u", stack.redis.url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()
    assert not out.startswith(b"(error)") and not out.startswith(b"ERR"), out.decode()
    return out.decode().strip()


async def test_one_redis_cli_xadd_is_a_job_the_worker_answers(
    stack: Stack, channel_name: str
) -> None:
    """The README's line for any language: `redis-cli XADD <prefix>:jobs '*' job '<json>'`,
    before any worker has run (no consumer group yet) and while one runs."""
    before, during = prompt("xadd before"), prompt("xadd during")
    early = {"id": f"xadd-{uuid.uuid4().hex[:6]}", "channel": channel_name, "input": before}
    entry = await redis_cli(stack, "XADD", f"{stack.prefix}:jobs", "*", "job", json.dumps(early))
    assert re.fullmatch(r"\d+-\d+", entry), entry  # redis-cli prints the entry id

    async with running_worker(stack.settings()):
        await stack.wait_state(early["id"], "completed")
        # Without an id, the job is named after its stream entry.
        late = {"channel": channel_name, "input": during}
        entry = await redis_cli(stack, "XADD", f"{stack.prefix}:jobs", "*", "job", json.dumps(late))
        await stack.wait_state(f"x{entry}", "completed")

    history = await stack.history(channel_name)
    answers = {m.extras["headers"]["responseId"]: m.data for m in history}
    assert answers == {early["id"]: answer_text(before), f"x{entry}": answer_text(during)}


# -- status --------------------------------------------------------------------------------


async def test_status_shows_the_queue_figures_and_the_live_workers(
    stack: Stack, channel_name: str
) -> None:
    env = stack.env()
    jobs = [Job(id=f"s{i}", channel=channel_name, input=prompt("status")) for i in range(2)]
    await stack.enqueue(*jobs)
    queued = json.loads(await ok(env, "status"))
    figures = {k: queued[k] for k in ("waiting", "pending", "delayed", "dead", "workers")}
    assert figures == {"waiting": 2, "pending": 0, "delayed": 0, "dead": 0, "workers": []}
    assert queued["oldest_waiting_age_s"] is not None and queued["oldest_waiting_age_s"] >= 0
    # The jobs' channel is a session now, held by nobody until a worker runs.
    assert [(s["channel"], s["holder"]) for s in queued["sessions"]] == [(channel_name, None)]

    settings = stack.settings()
    async with running_worker(settings):
        for job in jobs:
            await stack.wait_state(job.id, "completed")
        busy = json.loads(await ok(env, "status"))
    assert (busy["waiting"], busy["pending"], busy["delayed"], busy["dead"]) == (0, 0, 0, 0)
    assert [w["worker_id"] for w in busy["workers"]] == [settings.worker_id]
    [session] = busy["sessions"]
    assert session["holder"].startswith(f"{settings.worker_id}:")

    after = json.loads(await ok(env, "status"))
    assert after["workers"] == []  # a stopped worker leaves the list
    assert after["sessions"][0]["holder"] is None  # and hands its sessions back


async def test_status_of_a_job_shows_its_record(stack: Stack, channel_name: str) -> None:
    env = stack.env()
    job = Job(channel=channel_name, input=prompt("record"), metadata={"user": "u9"})
    await stack.enqueue(job)

    found, unknown = await asyncio.gather(cli(env, "status", job.id), cli(env, "status", "nope"))
    assert found.code == 0, str(found)
    queued = json.loads(found.out)
    assert queued["state"] == "queued" and queued["attempts"] == "0"
    assert queued["payload"] == json.loads(job.to_json())  # the job itself, as JSON
    assert "response_serial" not in queued
    assert unknown.code == 1 and unknown.out == "", str(unknown)
    assert unknown.err.startswith("error: ") and "nope" in unknown.err, str(unknown)

    async with running_worker(stack.settings()):
        await stack.wait_state(job.id, "completed")
    done = json.loads(await ok(env, "status", job.id))
    assert done["state"] == "completed" and done["attempts"] == "1"
    assert int(done["output_tokens"]) > 0 and "finished_at" in done
    [message] = await stack.history(channel_name)
    assert done["response_serial"] == message.serial
    assert message.data == answer_text(str(job.input))


# -- dead letters ------------------------------------------------------------------------


async def test_dlq_lists_retries_and_purges_dead_jobs(
    stack: Stack, redis: Any, channel_name: str
) -> None:
    env = stack.env()
    refused = Job(
        id="refused-1", channel=channel_name, input=prompt("wrong key"),
        metadata={"local_fail": "401"},  # the local model refuses it: dead at once
    )  # fmt: skip
    async with running_worker(stack.settings()):
        await stack.enqueue(refused)
        entry = await redis_cli(stack, "XADD", f"{stack.prefix}:jobs", "*", "job", "{not json")
        await wait_for_dead(redis, stack.prefix, 2)
    poison = f"x{entry}"  # a job without a usable id is named after its entry

    listed, shown = await asyncio.gather(ok(env, "dlq", "list"), ok(env, "status", poison))
    letters = json.loads(listed)
    reasons = {d["job_id"]: d["error"] for d in letters}
    assert "401" in reasons["refused-1"] and "not valid JSON" in reasons[poison]
    assert [d["attempts"] for d in letters] == ["1", "1"]
    record = json.loads(shown)
    assert record["state"] == "dead" and record["payload"] == "{not json"  # shown as it came

    # Retry one, by its dead-letter entry: it is back in the stream as it was enqueued.
    [letter] = [d for d in letters if d["job_id"] == "refused-1"]
    assert (await ok(env, "dlq", "retry", letter["entry_id"])).strip() == "requeued 1"
    [payload] = await stream_payloads(redis, stack.prefix)
    assert payload == json.loads(refused.to_json())
    assert [f["job_id"] for _, f in await redis.xrange(f"{stack.prefix}:dead")] == [poison]

    # Retry the rest (none named: all), and both go round again and die again.
    assert (await ok(env, "dlq", "retry")).strip() == "requeued 1"
    assert await redis.xlen(f"{stack.prefix}:jobs") == 2
    assert await redis.xlen(f"{stack.prefix}:dead") == 0
    async with running_worker(stack.settings()):
        await wait_for_dead(redis, stack.prefix, 2)

    assert (await ok(env, "dlq", "purge")).strip() == "purged 2"
    assert json.loads(await ok(env, "dlq", "list")) == []


async def wait_for_dead(redis: Any, prefix: str, count: int, timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await redis.xlen(f"{prefix}:dead") < count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"fewer than {count} dead letters after {timeout} s")
        await asyncio.sleep(0.05)


# -- watch ---------------------------------------------------------------------------------


@dataclass
class Watcher:
    proc: asyncio.subprocess.Process
    lines: list[str]

    async def line_for(self, response_id: str, timeout: float = 20) -> str:
        """Read stdout until the line for `response_id` appears; return it."""
        for line in self.lines:
            if _line_id(line) == response_id:
                return line
        assert self.proc.stdout is not None

        async def read() -> str:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"watch ended before {response_id}: {self.lines}")
                self.lines.append(raw.decode().rstrip("\n"))
                if _line_id(self.lines[-1]) == response_id:
                    return self.lines[-1]

        try:
            return await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no line for {response_id} in {timeout} s: {self.lines}"
            ) from None


def _line_id(line: str) -> str | None:
    match = re.match(r"^\[\w+\] (\S+): ", line)
    return match.group(1) if match else None


def parse_line(line: str) -> tuple[str, str, str]:
    match = re.match(r"^\[(\w+)\] (\S+): (.*)$", line, re.S)
    assert match, line
    return match.group(1), match.group(2), match.group(3)


@contextlib.asynccontextmanager
async def watching(env: dict[str, str], *args: str) -> AsyncIterator[Watcher]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "watch", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield Watcher(proc, [])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def interrupt(watcher: Watcher, within: float = 5) -> tuple[int, str]:
    """Ctrl-C: SIGINT, then the exit status and stderr, within `within` seconds."""
    watcher.proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(watcher.proc.communicate(), within)
    assert watcher.proc.returncode is not None
    return watcher.proc.returncode, err.decode()


async def wait_attached(watcher: Watcher, channel: str) -> None:
    """`watch` says on stderr when it is attached (stdout carries only answers)."""
    assert watcher.proc.stderr is not None
    line = await asyncio.wait_for(watcher.proc.stderr.readline(), 15)
    assert channel in line.decode(), line


async def test_watch_prints_each_answer_live_as_one_line_and_stops_on_ctrl_c(
    stack: Stack, channel_name: str
) -> None:
    jobs = [
        Job(channel=channel_name, input=prompt("watched")),
        Job(channel=channel_name, input=prompt("per token"), pattern=Pattern.MESSAGE_PER_TOKEN),
        Job(channel=channel_name, input=prompt("refused"), metadata={"local_fail": "401"}),
    ]
    async with watching(stack.env(), channel_name, "--rewind", "0") as watcher:
        await wait_attached(watcher, channel_name)
        async with running_worker(stack.settings()):
            await stack.enqueue(*jobs)
            lines = [parse_line(await watcher.line_for(job.id)) for job in jobs]
        code, err = await interrupt(watcher)

    assert lines[0] == ("complete", jobs[0].id, answer_text(str(jobs[0].input)))
    assert lines[1] == ("complete", jobs[1].id, answer_text(str(jobs[1].input)))
    assert lines[2][:2] == ("failed", jobs[2].id)
    assert len(watcher.lines) == 3  # one line per answer, however many appends it took
    assert code == 0 and "Traceback" not in err, err


async def test_watch_with_rewind_shows_an_answer_closed_before_it_started(
    stack: Stack, channel_name: str
) -> None:
    job = Job(channel=channel_name, input=prompt("before watch"))
    async with running_worker(stack.settings()):
        await stack.enqueue(job)
        await stack.wait_state(job.id, "completed")

    async with watching(stack.env(), channel_name, "--rewind", "5") as watcher:
        line = await watcher.line_for(job.id)
        code, err = await interrupt(watcher)
    assert parse_line(line) == ("complete", job.id, answer_text(str(job.input)))
    assert code == 0 and "Traceback" not in err, err


# -- settings errors -------------------------------------------------------------------------


# (command, variable, its bad value or None for unset)
BAD_SETTINGS: list[tuple[list[str], str, str | None]] = [
    (["enqueue", "--channel", "c", "hi"], "REDIS_URL", "http://x"),
    (["dlq", "list"], "QUEUE_PREFIX", ""),
    (["watch", "c"], "ABLY_API_KEY", None),
]


async def test_a_bad_setting_exits_2_with_one_line_naming_it(stack: Stack, redis: Any) -> None:
    envs = []
    for _, variable, value in BAD_SETTINGS:
        env = stack.env()
        if value is None:
            env.pop(variable)
        else:
            env[variable] = value
        envs.append(env)
    runs = await asyncio.gather(
        *(cli(env, *command) for env, (command, _, _) in zip(envs, BAD_SETTINGS, strict=True))
    )
    for (command, variable, value), ran in zip(BAD_SETTINGS, runs, strict=True):
        where = f"{command} with {variable}={value!r}: {ran}"
        assert ran.code == 2, where
        assert ran.err.startswith("error: ") and variable in ran.err, where
        assert len(ran.err.strip().splitlines()) == 1, where
        if value:
            assert value not in ran.err, where  # never echoed: it may be a secret
    assert await redis.exists(f"{stack.prefix}:jobs") == 0


async def test_a_service_that_refuses_or_is_not_there_exits_1_with_one_clear_line(
    stack: Stack,
) -> None:
    refused = {**stack.env(), "REDIS_URL": "redis://127.0.0.1:1/0"}  # nothing listens
    no_such_db = {**stack.env(), "REDIS_URL": stack.redis.url.rsplit("/", 1)[0] + "/99"}
    wrong_key = {**stack.env(), "ABLY_API_KEY": stack.ably.key.split(":")[0] + ":wrong-secret"}
    runs = await asyncio.gather(
        cli(refused, "enqueue", "--channel", "c", "hi"),
        cli(no_such_db, "status"),
        cli(wrong_key, "watch", "c"),  # rather than wait forever for a connection
    )
    expected = [
        ("cannot reach Redis", "REDIS_URL"),
        ("DB index is out of range", "REDIS_URL"),
        ("Ably refused", "ABLY_API_KEY"),
    ]
    for ran, (said, variable) in zip(runs, expected, strict=True):
        assert ran.code == 1, str(ran)
        assert ran.err.startswith("error: ") and said in ran.err and variable in ran.err, str(ran)
        assert len(ran.err.strip().splitlines()) == 1 and "wrong-secret" not in ran.err, str(ran)
        assert ran.out == "", str(ran)
