"""The worker end to end: Redis jobs in, streamed answers on Ably out, real services only.

Each test enqueues jobs, runs the real worker, and checks what a user sees: what a live
subscriber renders, what a late joiner and history get, what is left in Redis.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from ably.types.message import Message
from ably.types.presence import PresenceAction

from tests.ably_helpers import wait_for
from tests.worker_harness import Stack, running_worker, subscriber
from worker.devstack.openai_local import answer_text
from worker.jobs import Job

pytestmark = pytest.mark.timeout(90)


def prompt(label: str) -> str:
    """A prompt unique to this run: the local model's failure counters key on it."""
    return f"{label} {uuid.uuid4().hex[:8]}"


def new_job(channel: str, text: str, **fields: Any) -> Job:
    return Job(channel=channel, input=text, **fields)


async def test_n_jobs_give_n_messages_with_the_model_text_live_rewound_and_in_history(
    stack: Stack, channel_name: str
) -> None:
    jobs = [
        new_job(channel_name, prompt(f"question {i}"), metadata={"user": f"u{i}"}) for i in range(5)
    ]
    expected = {job.id: answer_text(str(job.input)) for job in jobs}
    async with subscriber(stack, channel_name) as live, running_worker(stack.settings()):
        await stack.enqueue(*jobs)
        for job in jobs:
            await stack.wait_state(job.id, "completed")
        await wait_for(
            lambda: all(live.status(j) == "complete" for j in expected), what="all closed"
        )

    for job_id, text in expected.items():
        serial = live.by_response(job_id)
        assert serial is not None and live.texts[serial] == text
        assert live.statuses[serial] == ["streaming", "complete"]
        headers = live.headers[serial]
        assert headers["model"] == "local" and headers["user"].startswith("u")

    history = await stack.history(channel_name)
    assert len(history) == 5  # one message per job, not one per delta
    assert {m.extras["headers"]["responseId"]: m.data for m in history} == expected
    late = await stack.rewound(channel_name, 5)
    assert sorted(late.texts.values()) == sorted(expected.values())

    record = await stack.status(jobs[0].id)
    assert record["attempts"] == "1" and record["response_serial"] == live.by_response(jobs[0].id)
    assert int(record["output_tokens"]) > 10 and "ttft_ms" in record


async def test_a_retry_reuses_the_message_and_replaces_its_text(
    stack: Stack, channel_name: str
) -> None:
    """The model breaks off mid-answer once; the retry reopens the same channel message."""
    text = prompt("flaky")
    job = new_job(channel_name, text, metadata={"local_fail": "break", "local_fail_times": "1"})
    async with subscriber(stack, channel_name) as live, running_worker(stack.settings()):
        await stack.enqueue(job)
        record = await stack.wait_state(job.id, "completed")
        await wait_for(lambda: live.status(job.id) == "complete", what="closed")

    serial = live.by_response(job.id)
    assert serial is not None
    assert live.texts[serial] == answer_text(text)
    assert live.statuses[serial] == ["streaming", "interrupted", "streaming", "complete"]
    assert record["attempts"] == "2"
    history = await stack.history(channel_name)
    assert [(m.serial, m.data) for m in history] == [(serial, answer_text(text))]


async def test_a_model_that_keeps_failing_closes_the_message_failed_and_dead_letters(
    stack: Stack, channel_name: str
) -> None:
    job = new_job(channel_name, prompt("always 500"), metadata={"local_fail": "500"})
    settings = stack.settings(job_max_attempts=2)
    async with subscriber(stack, channel_name) as live, running_worker(settings):
        await stack.enqueue(job)
        record = await stack.wait_state(job.id, "dead", timeout=30)
        await wait_for(lambda: live.status(job.id) == "failed", what="failed status")

    assert record["attempts"] == "2" and "HTTP 500" in record["error"]
    serial = live.by_response(job.id)
    assert serial is not None and "HTTP 500" in live.headers[serial]["error"]
    assert len(await stack.history(channel_name)) == 1
    queue = stack.queue()
    try:
        [letter] = await queue.dead_letters()
        stats = await queue.stats()
    finally:
        await queue.redis.aclose()
    assert letter["job_id"] == job.id and "HTTP 500" in letter["error"]
    assert (stats.pending, stats.waiting, stats.delayed, stats.dead) == (0, 0, 0, 1)


async def test_a_refused_model_key_fails_at_once_without_retrying(
    stack: Stack, channel_name: str
) -> None:
    job = new_job(channel_name, prompt("wrong key"), metadata={"local_fail": "401"})
    async with subscriber(stack, channel_name) as live, running_worker(stack.settings()):
        await stack.enqueue(job)
        record = await stack.wait_state(job.id, "dead")
        await wait_for(lambda: live.status(job.id) == "failed", what="failed status")
    assert record["attempts"] == "1" and "401" in record["error"]


async def test_a_malformed_job_goes_to_the_dead_letters_with_its_reason(
    stack: Stack, channel_name: str
) -> None:
    queue = stack.queue()
    async with running_worker(stack.settings()):
        await queue.ensure_group()
        await queue.redis.xadd(
            queue.stream, {"job": json.dumps({"id": "poison-1", "input": "no channel"})}
        )
        await queue.redis.xadd(queue.stream, {"job": "{not json"})
        good = new_job(channel_name, prompt("after the poison"))
        await queue.enqueue(good)
        await stack.wait_state(good.id, "completed")  # the worker lives on
        await wait_for(lambda: True)
        letters = await queue.dead_letters()
    await queue.redis.aclose()
    reasons = {d["job_id"]: d["error"] for d in letters}
    assert "channel" in reasons["poison-1"] and "Field required" in reasons["poison-1"]
    assert any("not valid JSON" in r for r in reasons.values())


async def test_a_user_cancel_stops_the_answer_and_closes_it_cancelled(
    stack: Stack, channel_name: str
) -> None:
    text = prompt("long answer")
    job = new_job(
        channel_name, text, metadata={"local_tokens": "2000", "local_tokens_per_second": "50"},
        user_client_id="user-1",
    )  # fmt: skip
    async with subscriber(stack, channel_name) as live, running_worker(stack.settings()):
        await stack.enqueue(job)
        await wait_for(
            lambda: len(live.texts.get(live.by_response(job.id) or "", "")) > 20, what="text"
        )
        user = stack.realtime(client_id="user-1")
        try:
            cancel = Message(name="cancel", data="stop", extras={"headers": {"responseId": job.id}})
            await user.channels.get(channel_name).publish(cancel)
            record = await stack.wait_state(job.id, "cancelled")
            await wait_for(lambda: live.status(job.id) == "cancelled", what="cancelled status")
        finally:
            await user.close()
    serial = live.by_response(job.id)
    assert serial is not None
    assert 0 < len(live.texts[serial]) < len(answer_text(text, tokens=2000))
    assert answer_text(text, tokens=2000).startswith(live.texts[serial])
    assert record["state"] == "cancelled"


async def test_message_per_token_publishes_start_tokens_and_stop(
    stack: Stack, channel_name: str
) -> None:
    text = prompt("token pattern")
    job = new_job(channel_name, text, pattern="message-per-token")
    async with subscriber(stack, channel_name) as live, running_worker(stack.settings()):
        await stack.enqueue(job)
        await stack.wait_state(job.id, "completed")
        await wait_for(lambda: any(m.name == "stop" for m in live.messages), what="stop")
    names = [m.name for m in live.messages]
    assert names[0] == "start" and names[-1] == "stop" and names.count("token") > 10
    tokens = "".join(m.data for m in live.messages if m.name == "token")
    assert tokens == answer_text(text) == live.messages[-1].data
    assert {m.extras["headers"]["responseId"] for m in live.messages} == {job.id}
    assert live.messages[-1].extras["headers"]["status"] == "complete"


async def test_presence_shows_the_worker_while_it_runs_and_not_after(stack: Stack) -> None:
    settings = stack.settings(worker_concurrency=7)
    watcher = stack.realtime()
    events: list[tuple[int, str, Any]] = []
    try:
        channel = watcher.channels.get(settings.presence_channel)
        await channel.presence.subscribe(lambda m: events.append((m.action, m.client_id, m.data)))
        async with running_worker(settings):
            await wait_for(lambda: any(e[0] == PresenceAction.ENTER for e in events), what="enter")
            [member] = await channel.presence.get()
            assert member.client_id == settings.worker_id
            assert member.data["capacity"] == 7 and member.data["inFlight"] == 0
        await wait_for(lambda: any(e[0] == PresenceAction.LEAVE for e in events), what="leave")
        assert await channel.presence.get() == []
    finally:
        await watcher.close()


async def test_chat_completions_mode_streams_the_same_answer(
    stack: Stack, channel_name: str
) -> None:
    job = new_job(channel_name, prompt("chat api"))
    async with (
        subscriber(stack, channel_name) as live,
        running_worker(stack.settings(openai_api="chat")),
    ):
        await stack.enqueue(job)
        await stack.wait_state(job.id, "completed")
        await wait_for(lambda: live.status(job.id) == "complete", what="closed")
    serial = live.by_response(job.id)
    assert serial is not None and live.texts[serial] == answer_text(str(job.input))


async def test_a_job_over_its_timeout_is_closed_and_retried(
    stack: Stack, channel_name: str
) -> None:
    job = new_job(channel_name, prompt("slow"), metadata={"local_first_token_ms": "3000"})
    settings = stack.settings(job_timeout_seconds=0.5, job_max_attempts=1)
    async with subscriber(stack, channel_name) as live, running_worker(settings):
        await stack.enqueue(job)
        record = await stack.wait_state(job.id, "dead")
        await wait_for(lambda: live.status(job.id) == "failed", what="failed status")
    assert "timed out" in record["error"]


async def test_concurrency_runs_jobs_side_by_side(stack: Stack, channel_name: str) -> None:
    pace = {"local_tokens_per_second": "200"}
    jobs = [new_job(channel_name, prompt(f"parallel {i}"), metadata=pace) for i in range(6)]
    async with running_worker(stack.settings(worker_concurrency=6)):
        await stack.enqueue(*jobs)
        records = [await stack.wait_state(job.id, "completed") for job in jobs]
    # Every job started before any finished: six at once on one connection.
    assert max(int(r["started_at"]) for r in records) < min(int(r["finished_at"]) for r in records)


async def test_rate_limits_before_the_first_token_are_retried_within_the_attempt(
    stack: Stack, channel_name: str
) -> None:
    """429 twice, honouring Retry-After, then the answer: one attempt, one message."""
    text = prompt("rate limited")
    meta = {"local_fail": "429", "local_fail_times": "2", "local_retry_after": "0.05"}
    job = new_job(channel_name, text, metadata=meta)
    async with subscriber(stack, channel_name) as live, running_worker(stack.settings()):
        await stack.enqueue(job)
        record = await stack.wait_state(job.id, "completed")
        await wait_for(lambda: live.status(job.id) == "complete", what="closed")
    assert record["attempts"] == "1"
    assert stack.openai.attempts(text) == 3  # two refusals, then the stream
    serial = live.by_response(job.id)
    assert serial is not None and live.texts[serial] == answer_text(text)
    assert live.statuses[serial] == ["streaming", "complete"]


async def test_presence_data_follows_the_load(stack: Stack, channel_name: str) -> None:
    settings = stack.settings(worker_concurrency=3)
    job = new_job(channel_name, prompt("busy"), metadata={"local_tokens_per_second": "40"})
    watcher = stack.realtime()
    try:
        channel = watcher.channels.get(settings.presence_channel)
        loads: list[int] = []
        await channel.presence.subscribe(lambda m: loads.append(m.data["inFlight"]))
        async with running_worker(settings):
            await wait_for(lambda: loads == [0], what="enter with no load")
            await stack.enqueue(job)
            await wait_for(lambda: 1 in loads, what="in-flight 1")
            await stack.wait_state(job.id, "completed")
            await wait_for(lambda: loads[-1] == 0, what="back to 0")
    finally:
        await watcher.close()


async def test_appends_lost_in_a_network_black_hole_are_repaired_by_the_closing_update(
    stack: Stack, channel_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames vanish for a while between the worker and Ably: the subscriber (connected
    directly) misses fragments, and the closing update's whole text makes it converge."""
    from worker.devstack.fault_proxy import FaultProxy
    from worker.transport import acks

    monkeypatch.setattr(acks, "ACK_TIMEOUT_S", 2.0)
    text = prompt("through a black hole")
    job = new_job(channel_name, text, metadata={"local_tokens_per_second": "60"})
    async with FaultProxy(stack.ably.endpoint) as proxy, subscriber(stack, channel_name) as live:
        async with running_worker(stack.settings(ably_endpoint=proxy.endpoint)):
            await stack.enqueue(job)
            await wait_for(
                lambda: len(live.texts.get(live.by_response(job.id) or "", "")) > 10, what="text"
            )
            proxy.blackhole(1.0)
            await stack.wait_state(job.id, "completed", timeout=40)
            await wait_for(lambda: live.status(job.id) == "complete", 20, "closed")
    serial = live.by_response(job.id)
    assert serial is not None and live.texts[serial] == answer_text(text)
    appended = "".join(m.data for m in live.messages if m.action == 5 and m.serial == serial)
    assert appended != answer_text(text)  # fragments were lost on the way...
    assert [m.data for m in await stack.history(channel_name)] == [
        answer_text(text)
    ]  # ...not the answer


async def test_fast_answers_stay_inside_ablys_rate_limits(stack: Stack, channel_name: str) -> None:
    """Counted as Ably counts (appends to one message roll up within 40 ms), two fast
    answers on one connection stay under 50 messages/s, with nothing refused: deltas are
    coalesced to at most one append per rollup window per answer."""
    from worker.devstack.fault_proxy import FaultProxy

    pace = {"local_tokens_per_second": "400", "local_tokens": "400"}
    jobs = [new_job(channel_name, prompt(f"fast {i}"), metadata=pace) for i in range(2)]
    async with FaultProxy(stack.ably.endpoint, enforce_rate_limits=True) as proxy:
        async with running_worker(stack.settings(ably_endpoint=proxy.endpoint)):
            await stack.enqueue(*jobs)
            records = [await stack.wait_state(job.id, "completed") for job in jobs]
        stats = proxy.stats()
    channel = stats.channels[channel_name]
    deltas = sum(int(r["deltas"]) for r in records)
    assert channel.messages < deltas / 2  # coalesced: far fewer messages than deltas
    assert 10 < channel.peak_counted_per_s <= 50 and channel.refused == 0  # busy, in budget
    history = await stack.history(channel_name)
    expected = [answer_text(str(j.input), tokens=400) for j in jobs]
    assert sorted(m.data for m in history) == sorted(expected)


@pytest.mark.parametrize("streams_per_connection", [2, 8])
async def test_many_fast_answers_share_connections_inside_the_budget(
    stack: Stack, streams_per_connection: int
) -> None:
    """Eight answers at full speed: spread over ceil(8 / streams_per_connection) Ably
    connections, each connection's budget shared among its answers, none refused."""
    from worker.devstack.fault_proxy import FaultProxy

    pace = {"local_tokens_per_second": "400", "local_tokens": "300"}
    jobs = [new_job(f"conv:{uuid.uuid4().hex[:8]}", prompt(f"many {i}"), metadata=pace)
            for i in range(8)]  # fmt: skip
    async with FaultProxy(stack.ably.endpoint, enforce_rate_limits=True) as proxy:
        settings = stack.settings(
            worker_concurrency=8, streams_per_connection=streams_per_connection,
            ably_endpoint=proxy.endpoint,
        )  # fmt: skip
        async with running_worker(settings):
            await stack.enqueue(*jobs)
            for job in jobs:
                await stack.wait_state(job.id, "completed")
        stats = proxy.stats()
    publishing = [c for c in stats.connections.values() if c.total.messages > 0]
    assert len(publishing) == 8 // streams_per_connection
    assert all(c.total.peak_counted_per_s <= 50 and c.total.refused == 0 for c in publishing)
    for job in jobs:
        [message] = await stack.history(job.channel)
        assert message.data == answer_text(str(job.input), tokens=300)


async def test_a_redis_outage_longer_than_the_heartbeat_gives_one_answer_not_two(
    stack: Stack, channel_name: str
) -> None:
    """Two workers; Redis goes away for longer than the heartbeat TTL while one streams.
    Its claim lapses, so it abandons the job; whichever worker takes it back reopens the
    same message. One message, the model's text, closed once as complete."""
    text = prompt("outage")
    job = new_job(
        channel_name, text, metadata={"local_tokens_per_second": "40", "local_tokens": "400"}
    )
    settings = {"job_visibility_timeout_seconds": 2, "job_timeout_seconds": 60}
    async with subscriber(stack, channel_name) as live:
        async with (
            running_worker(stack.settings(**settings)),
            running_worker(stack.settings(**settings)),
        ):
            await stack.enqueue(job)
            await wait_for(
                lambda: len(live.texts.get(live.by_response(job.id) or "", "")) > 10, what="text"
            )
            stack.redis.kill()
            await asyncio.sleep(3.5)
            stack.redis.start()
            await stack.redis.wait_ready()
            record = await stack.wait_state(job.id, "completed", timeout=60)
            await wait_for(lambda: live.status(job.id) == "complete", 20, "complete")
    serial = live.by_response(job.id)
    assert serial is not None and live.texts[serial] == answer_text(text, tokens=400)
    assert int(record["attempts"]) >= 2  # the first attempt was abandoned
    history = await stack.history(channel_name)
    assert [(m.serial, m.data) for m in history] == [(serial, answer_text(text, tokens=400))]
    assert live.statuses[serial][-1] == "complete" and live.statuses[serial].count("complete") == 1


async def test_fast_answers_in_one_conversation_share_the_channel_budget(
    stack: Stack, channel_name: str
) -> None:
    """Ably's 50/s holds per channel too, across connections: three fast answers in one
    conversation, each on its own connection, stay inside it together."""
    from worker.devstack.fault_proxy import FaultProxy

    pace = {"local_tokens_per_second": "400", "local_tokens": "400"}
    jobs = [new_job(channel_name, prompt(f"same channel {i}"), metadata=pace) for i in range(3)]
    async with FaultProxy(stack.ably.endpoint, enforce_rate_limits=True) as proxy:
        settings = stack.settings(
            worker_concurrency=3, streams_per_connection=1, ably_endpoint=proxy.endpoint
        )
        async with running_worker(settings):
            await stack.enqueue(*jobs)
            for job in jobs:
                await stack.wait_state(job.id, "completed")
        stats = proxy.stats()
    channel = stats.channels[channel_name]
    assert channel.peak_counted_per_s <= 50 and channel.refused == 0
    assert channel.peak_counted_per_s > 30  # the three did stream side by side
    history = await stack.history(channel_name)
    assert sorted(m.data for m in history) == sorted(
        answer_text(str(j.input), tokens=400) for j in jobs
    )
