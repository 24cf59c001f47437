"""The worker as Heroku runs it: `python -m worker run`, signals, crashes, logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from typing import Any

import pytest

from tests.ably_helpers import wait_for
from tests.worker_harness import Stack, running_worker, start_worker_process, subscriber
from worker.devstack.openai_local import answer_text
from worker.jobs import Job

pytestmark = pytest.mark.timeout(120)


def log_events(stderr: bytes) -> list[dict[str, Any]]:
    events = []
    for line in stderr.decode().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"a log line that is not JSON: {line!r}") from None
    return events


async def test_sigterm_mid_stream_drains_interrupts_and_the_successor_finishes(
    stack: Stack, channel_name: str
) -> None:
    text = f"drain me {uuid.uuid4().hex[:8]}"
    job = Job(channel=channel_name, input=text)
    env = stack.env(openai_model="local-slow", shutdown_grace_seconds=1, worker_id="worker.1")
    async with subscriber(stack, channel_name) as live:
        proc = await start_worker_process(env)
        await stack.enqueue(job)
        await wait_for(
            lambda: len(live.texts.get(live.by_response(job.id) or "", "")) > 10, 20, "text"
        )
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # Heroku sometimes sends it twice
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        serial = live.by_response(job.id)
        await wait_for(lambda: live.status(job.id) == "interrupted", what="interrupted status")
        record = await stack.status(job.id)
        assert (record["state"], record["attempts"]) == ("queued", "0")  # back, no attempt spent

        # The successor (same DYNO name, as on Heroku) reopens the same message.
        async with running_worker(stack.settings(worker_id="worker.1")):
            await stack.wait_state(job.id, "completed")
            await wait_for(lambda: live.status(job.id) == "complete", what="complete")
    assert live.by_response(job.id) == serial
    assert live.texts[serial] == answer_text(text)
    assert live.statuses[serial] == ["streaming", "interrupted", "streaming", "complete"]
    assert len(await stack.history(channel_name)) == 1

    names = [e["event"] for e in log_events(stderr)]
    expected_events = [
        "worker.started", "job.received", "job.first_token", "worker.signal",
        "worker.draining", "job.interrupted", "worker.drained", "worker.stopped",
    ]  # fmt: skip
    for expected in expected_events:
        assert expected in names, f"{expected} missing from {names}"
    assert (
        names.index("worker.draining")
        < names.index("job.interrupted")
        < names.index("worker.stopped")
    )


async def test_sigterm_lets_a_job_that_fits_in_the_grace_period_finish(
    stack: Stack, channel_name: str
) -> None:
    job = Job(channel=channel_name, input=f"finish me {uuid.uuid4().hex[:8]}")
    env = stack.env(openai_model="local-slow", shutdown_grace_seconds=20)
    async with subscriber(stack, channel_name) as live:
        proc = await start_worker_process(env)
        await stack.enqueue(job)
        await wait_for(lambda: live.by_response(job.id) is not None, 20, "the answer to start")
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert (await stack.status(job.id))["state"] == "completed"
    events = {e["event"]: e for e in log_events(stderr)}
    assert (
        events["worker.drained"]["finished"] == 1 and events["worker.drained"]["interrupted"] == 0
    )


async def test_a_killed_workers_job_goes_to_a_live_worker_after_its_heartbeat_expires(
    stack: Stack, channel_name: str
) -> None:
    text = f"crash me {uuid.uuid4().hex[:8]}"
    job = Job(channel=channel_name, input=text)
    env = stack.env(openai_model="local-slow", job_visibility_timeout_seconds=2)
    async with subscriber(stack, channel_name) as live:
        proc = await start_worker_process(env)
        await stack.enqueue(job)
        await wait_for(
            lambda: len(live.texts.get(live.by_response(job.id) or "", "")) > 10, 20, "text"
        )
        proc.kill()  # no drain, no goodbye: only the heartbeat's expiry tells
        await proc.wait()
        serial = live.by_response(job.id)
        async with running_worker(stack.settings(job_visibility_timeout_seconds=2)):
            record = await stack.wait_state(job.id, "completed", timeout=30)
            await wait_for(lambda: live.status(job.id) == "complete", what="complete")
    assert record["attempts"] == "2"
    assert live.by_response(job.id) == serial  # the same message, reopened
    assert live.texts[serial] == answer_text(text)
    history = await stack.history(channel_name)
    assert [(m.serial, m.data) for m in history] == [(serial, answer_text(text))]


async def test_logs_are_json_lines_with_figures_and_never_a_key(
    stack: Stack, channel_name: str
) -> None:
    job = Job(channel=channel_name, input=f"log me {uuid.uuid4().hex[:8]}")
    proc = await start_worker_process(stack.env(log_level="INFO", stats_interval_seconds=0.5))
    await stack.enqueue(job)
    await stack.wait_state(job.id, "completed")
    await asyncio.sleep(1.0)  # a stats line or two
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    events = log_events(stderr)
    [done] = [e for e in events if e["event"] == "job.completed"]
    assert done["job_id"] == job.id and done["channel"] == channel_name and done["attempt"] == 1
    assert done["ttft_ms"] >= 0 and done["output_tokens"] > 10 and done["tokens_per_s"] > 0
    assert all({"timestamp", "level", "event"} <= e.keys() for e in events)
    stats = [e for e in events if e["event"] == "worker.stats"][-1]
    assert (stats["waiting"], stats["pending"], stats["in_flight"], stats["dead"]) == (0, 0, 0, 0)
    assert "lag_s" in stats and stats["live_workers"] >= 1
    # The collector's pauses, measured since the last line (the worker tunes it at start).
    assert stats["gc_collections"] >= 0 and stats["gc_pause_ms"] >= stats["gc_pause_max_ms"] >= 0
    secret = stack.ably.key.split(":")[1]
    assert secret not in stderr.decode() and stack.openai.api_key not in stderr.decode()


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [("WORKER_CONCURRENCY", "lots", "WORKER_CONCURRENCY"), ("ABLY_API_KEY", "", "ABLY_API_KEY"),
     ("REDIS_URL", "http://nope", "REDIS_URL"), ("LOG_FORMAT", "xml", "LOG_FORMAT")],
)  # fmt: skip
async def test_a_bad_setting_stops_the_start_with_one_line_naming_it(
    stack: Stack, variable: str, value: str, named: str
) -> None:
    env = stack.env()
    if value:
        env[variable] = value
    else:
        env.pop(variable)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith("error: bad configuration")


async def test_a_refused_ably_key_stops_the_start_with_a_clear_error(stack: Stack) -> None:
    env = stack.env()
    env["ABLY_API_KEY"] = f"{stack.ably.key.split(':')[0]}:wrong-secret"
    proc = await start_worker_process(env)
    _, stderr = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 1
    assert "Ably refused" in stderr.decode() and "wrong-secret" not in stderr.decode()


async def test_an_unreachable_redis_stops_the_start_with_a_clear_error(stack: Stack) -> None:
    env = {**stack.env(), "REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}
    proc = await start_worker_process(env)
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith("error: cannot reach Redis") and "REDIS_URL" in last
    assert "hunter2" not in stderr.decode()


def test_the_procfile_runs_the_worker() -> None:
    with open(os.path.join(os.path.dirname(__file__), "..", "Procfile")) as procfile:
        assert procfile.read().strip() == "worker: python -m worker run"


async def test_a_wrong_redis_password_is_reported_at_once(stack: Stack) -> None:
    """A refused password: one clear line, without the password."""
    from worker.devstack.redis_server import LocalRedis

    async with LocalRedis(password="right-password") as guarded:
        env = {**stack.env(), "REDIS_URL": guarded.url.replace("right-password", "wrong-one")}
        proc = await start_worker_process(env)
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith("error: cannot reach Redis") and "password" in last.lower()
    assert "wrong-one" not in stderr.decode()
