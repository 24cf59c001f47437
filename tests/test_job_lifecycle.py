"""Every job ends exactly once: the faults where a job stops, retries or changes hands,
each on the real services (Redis, the local Ably, the local OpenAI server)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from datetime import datetime
from typing import Any

import pytest

from tests.ably_helpers import wait_for
from tests.worker_harness import Stack, running_worker, start_worker_process, subscriber
from worker.devstack.openai_local import answer_text
from worker.devstack.redis_server import LocalRedis
from worker.jobs import Job
from worker.queue import RedisStreamsQueue
from worker.redis_client import connect_redis
from worker.transport import contract
from worker.transport.contract import Headers, Status
from worker.transport.response_stream import ResponseStream

pytestmark = pytest.mark.timeout(150)


def headers_for(job: Job, status: Status = Status.STREAMING) -> Headers:
    return Headers(response_id=job.id, model="local").with_status(status)


async def test_a_create_published_before_the_serial_was_saved_is_found_and_finished(
    stack: Stack, channel_name: str
) -> None:
    """Fault: a worker killed between its `message.create` and saving the serial left a
    message that every retry's create was refused for (Sockudo: 40000, message id already
    used), so the job was dead-lettered and the message stayed `streaming` for ever. The
    deterministic form: the create goes out first, then the job is enqueued."""
    job = Job(channel=channel_name, input=f"created early {uuid.uuid4().hex[:8]}")
    publisher = stack.realtime(client_id="a-worker-that-died")
    try:
        channel = publisher.channels.get(channel_name)
        await channel.publish(contract.response_create(headers_for(job)))
    finally:
        await publisher.close()
    async with running_worker(stack.settings()):
        await stack.enqueue(job)
        record = await stack.wait_state(job.id, "completed", "dead", timeout=30)
    assert record["state"] == "completed", record
    [message] = await stack.history(channel_name)
    assert message.id == f"{job.id}:response"
    assert message.data == answer_text(job.input)  # type: ignore[arg-type]
    assert message.extras["headers"]["status"] == "complete"


async def _a_dead_worker_takes(stack: Stack, job: Job) -> Any:
    """A worker takes the job and dies without a trace: no heartbeat key ever, so any
    live worker may reclaim its entry at once."""
    queue = RedisStreamsQueue(
        connect_redis(stack.redis.url), prefix=stack.prefix, consumer="dead-worker",
        claim_min_idle_ms=0,
    )  # fmt: skip
    try:
        await queue.ensure_group()
        [delivery] = await queue.take(1, 1000)
        return delivery, queue
    except BaseException:
        await queue.redis.aclose()
        raise


async def test_a_job_whose_message_was_already_closed_complete_is_not_run_again(
    stack: Stack, channel_name: str
) -> None:
    """A worker that died between the closing update and the acknowledgement: the job is
    reclaimed, found complete on the channel, acknowledged and recorded complete, and the
    user never sees the finished answer reset (the model is not asked again)."""
    prompt = f"finished before the crash {uuid.uuid4().hex[:8]}"
    job = Job(channel=channel_name, input=prompt)
    await stack.enqueue(job)
    delivery, dead = await _a_dead_worker_takes(stack, job)
    client = stack.realtime()
    try:
        channel = client.channels.get(channel_name)
        created = await channel.publish(contract.response_create(headers_for(job)))
        serial = str(created.serials[0])
        await dead.set_response_serial(delivery, serial)
        closing = contract.response_replace(serial, "the answer", headers_for(job, Status.COMPLETE))
        await channel.update_message(closing)
    finally:
        await client.close()
        await dead.redis.aclose()
    before = stack.openai.attempts(prompt)
    async with subscriber(stack, channel_name) as live:
        async with running_worker(stack.settings(job_visibility_timeout_seconds=2)):
            record = await stack.wait_state(job.id, "completed", timeout=30)
        await asyncio.sleep(0.3)  # anything published for it would be here by now
    assert record["attempts"] == "2"
    assert stack.openai.attempts(prompt) == before  # not run again
    assert live.messages == []  # not reopened, not reset
    [message] = await stack.history(channel_name)
    assert (message.data, message.extras["headers"]["status"]) == ("the answer", "complete")


async def test_a_reclaimed_job_whose_serial_was_never_saved_reopens_the_same_message(
    stack: Stack, channel_name: str
) -> None:
    """The killed worker's create went out, its serial never reached Redis: the reclaimer
    finds the message by its id in history and finishes it; one message, the model's text."""
    job = Job(channel=channel_name, input=f"serial lost {uuid.uuid4().hex[:8]}")
    await stack.enqueue(job)
    _, dead = await _a_dead_worker_takes(stack, job)
    await dead.redis.aclose()
    client = stack.realtime()
    try:
        await client.channels.get(channel_name).publish(contract.response_create(headers_for(job)))
    finally:
        await client.close()
    async with running_worker(stack.settings(job_visibility_timeout_seconds=2)):
        record = await stack.wait_state(job.id, "completed", "dead", timeout=30)
    assert (record["state"], record["attempts"]) == ("completed", "2")
    [message] = await stack.history(channel_name)
    assert message.data == answer_text(job.input)  # type: ignore[arg-type]
    assert message.extras["headers"]["status"] == "complete"


async def test_an_aborted_publisher_sends_nothing_more(stack: Stack, channel_name: str) -> None:
    """Fault: a worker that abandoned a job (its lease lapsed) kept its coalescing timer
    and pending appends alive, so fragments landed in a message another worker now owns.
    After `abort()` (or once its lease reads lapsed) nothing more reaches the channel."""
    job = Job(channel=channel_name, input="x")
    alive = True
    client = stack.realtime()
    try:
        async with subscriber(stack, channel_name) as live:
            channel = client.channels.get(channel_name)
            stream = ResponseStream(channel, headers_for(job), alive=lambda: alive)
            await stream.open()
            stream.append("before ")
            await wait_for(lambda: live.texts.get(stream.serial or "") == "before ", what="text")
            stream.append("coalescing ")  # waits for the rollup window: a timer is pending
            alive = False  # the lease lapses
            stream.append("after ")
            await asyncio.sleep(0.5)
            assert live.texts[stream.serial or ""] == "before "
            assert stream.aborted

            second = ResponseStream(channel, Headers(response_id="other", model="m"))
            await second.open()
            second.append("in flight ")
            second.append("and coalescing")
            second.abort()
            await asyncio.sleep(0.5)
            assert live.texts.get(second.serial or "", "") in ("", "in flight ")
    finally:
        await client.close()


async def test_a_hung_redis_does_not_hide_a_lost_lease(stack: Stack, channel_name: str) -> None:
    """Fault: with no socket timeout and the lease checked only when a heartbeat returned,
    a worker whose Redis hung kept streaming past its lease. Redis is frozen (SIGSTOP)
    past the heartbeat TTL: the worker says its lease is lost and stops the job; when
    Redis is back the job is finished once, in the same message."""
    text = f"hung redis {uuid.uuid4().hex[:8]}"
    job = Job(channel=channel_name, input=text, metadata={"local_tokens_per_second": "20"})
    async with LocalRedis(appendonly=True) as redis:
        private = Stack(redis, stack.ably, stack.openai, stack.prefix)
        env = private.env(job_visibility_timeout_seconds=3)
        await private.enqueue(job)
        async with subscriber(private, channel_name) as live:
            proc = await start_worker_process(env)
            try:
                await wait_for(lambda: len(live.texts.get(live.by_response(job.id) or "", "")) > 5,
                               20, "the answer to start")  # fmt: skip
                os.kill(redis.pid, signal.SIGSTOP)
                await asyncio.sleep(5)
                redis_back_at = time.time()
                os.kill(redis.pid, signal.SIGCONT)
                record = await private.wait_state(job.id, "completed", timeout=40)
                await wait_for(lambda: live.status(job.id) == "complete", 10, "complete")
            finally:
                os.kill(redis.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    events = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    [lost] = [e for e in events if e["event"] == "worker.heartbeat_lost"]
    # Noticed while Redis was still frozen, not only once a renewal came back late.
    assert datetime.fromisoformat(lost["timestamp"]).timestamp() < redis_back_at
    assert record["attempts"] == "2"
    [message] = await stack.history(channel_name)
    assert message.data == answer_text(text)
    assert message.extras["headers"]["status"] == "complete"


async def test_sigterm_with_ten_answers_in_flight_and_a_successor_started_at_once(
    stack: Stack,
) -> None:
    """A deploy: SIGTERM (twice, as Heroku may) with 10 long answers in flight and the
    successor started at once under the same DYNO name. The old process is gone within
    the 28 s budget; every answer ends complete, one message each, the model's text."""
    channels = [f"test:{uuid.uuid4().hex[:12]}" for _ in range(5)]
    jobs = [
        Job(channel=channels[i % 5], input=f"deploy {i} {uuid.uuid4().hex[:6]}",
            metadata={"local_tokens": "400"})
        for i in range(10)
    ]  # fmt: skip
    old = await start_worker_process(stack.env(openai_model="local-slow", worker_id="worker.1",
                                               worker_concurrency=16))  # fmt: skip
    await stack.enqueue(*jobs)
    await wait_for_all_running(stack, jobs)
    started = time.monotonic()
    old.send_signal(signal.SIGTERM)
    successor = stack.settings(openai_model="local-fast", worker_id="worker.1")
    async with running_worker(successor):
        old.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(old.communicate(), 40)
        gone_after = time.monotonic() - started
        for job in jobs:
            await stack.wait_state(job.id, "completed", timeout=60)
    assert old.returncode == 0, stderr.decode()[-2000:]
    assert gone_after <= 28.0, f"the old worker took {gone_after:.1f} s to exit"
    for channel in channels:
        history = await stack.history(channel)
        mine = [j for j in jobs if j.channel == channel]
        assert len(history) == len(mine)
        by_id = {m.extras["headers"]["responseId"]: m for m in history}
        for job in mine:
            message = by_id[job.id]
            assert message.extras["headers"]["status"] == "complete"
            assert message.data == answer_text(job.input, 400)  # type: ignore[arg-type]


async def wait_for_all_running(stack: Stack, jobs: list[Job]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        states = [(await stack.status(j.id)).get("state") for j in jobs]
        if all(s == "running" for s in states):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not all running: {states}")


async def test_shutdown_stays_inside_the_budget_when_ably_stops_answering(
    stack: Stack, channel_name: str
) -> None:
    """Fault: grace 25 s + closing 5 s + presence leave 5 s outlasted Heroku's 30 s. With
    Ably unreachable from the moment of SIGTERM (nothing is acknowledged: closes, presence
    leave and connection close all hang), the worker is still gone within 28 s, and its
    answers are finished by a successor in their own messages."""
    from worker.devstack.fault_proxy import FaultProxy

    jobs = [Job(channel=channel_name, input=f"black hole {i} {uuid.uuid4().hex[:6]}",
                metadata={"local_tokens": "600"}) for i in range(2)]  # fmt: skip
    async with FaultProxy(stack.ably.endpoint) as proxy:
        env = stack.env(ably_endpoint=proxy.endpoint, openai_model="local-slow")
        old = await start_worker_process(env)
        await stack.enqueue(*jobs)
        await wait_for_all_running(stack, jobs)
        await asyncio.sleep(1.0)  # creates acknowledged, text streaming
        proxy.blackhole(120)
        started = time.monotonic()
        old.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(old.communicate(), 40)
        gone_after = time.monotonic() - started
    assert gone_after <= 28.0, f"took {gone_after:.1f} s: {stderr.decode()[-1500:]}"
    async with running_worker(stack.settings(openai_model="local-fast")):
        for job in jobs:
            await stack.wait_state(job.id, "completed", timeout=60)
    history = await stack.history(channel_name)
    assert sorted(m.data for m in history) == sorted(answer_text(j.input, 600) for j in jobs)  # type: ignore[arg-type]
