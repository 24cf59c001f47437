"""The agent's side of a session, on the real services: prompts and cancels users publish
on a conversation channel, caught up after a restart, a takeover or a lost connection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ably.realtime.channel import RealtimeChannel
from ably.types.message import Message, MessageAction
from structlog.testing import capture_logs

from tests.ably_helpers import TextView
from tests.worker_harness import Stack, running_worker, start_worker_process, subscriber
from worker.devstack.openai_local import OpenAILocalServer, answer_text
from worker.jobs import Job

pytestmark = pytest.mark.timeout(150)


@contextlib.asynccontextmanager
async def user(stack: Stack, channel: str, client_id: str = "alice") -> AsyncIterator[Any]:
    """A user's realtime connection to the conversation channel."""
    client = stack.realtime(client_id=client_id)
    try:
        yield client.channels.get(channel)
    finally:
        await client.close()


async def ask(stack: Stack, channel: str, *texts: str, client_id: str = "alice") -> None:
    async with user(stack, channel, client_id) as ch:
        for text in texts:
            await ch.publish(Message(name="prompt", data=text))


async def cancel(stack: Stack, channel: str, job_id: str, client_id: str = "alice") -> None:
    async with user(stack, channel, client_id) as ch:
        await ch.publish(Message(name="cancel", extras={"headers": {"responseId": job_id}}))


async def conversation(stack: Stack, channel: str) -> tuple[list[Any], list[Any]]:
    """The channel's prompts and answers, oldest first (every page of history)."""
    page = await stack.rest().channels.get(channel).history(direction="forwards", limit=1000)
    items = list(page.items)
    prompts = [m for m in items if m.name == "prompt"]
    answers = [m for m in items if m.name == "response"]
    return prompts, answers


async def served(stack: Stack, channel: str) -> None:
    """Until a worker holds the channel's session: from then on every prompt is answered,
    live or caught up from history (a fixed sleep is too short on a slow machine)."""
    redis = stack.queue().redis
    lease_key = f"{stack.prefix}:session:{channel}:lease"
    await wait_for_async(lambda: redis.get(lease_key), 30, "a session owner")


async def wait_answered(stack: Stack, channel: str, count: int, timeout: float = 40) -> None:
    async def answered() -> int:
        _, answers = await conversation(stack, channel)
        return sum(a.extras["headers"]["status"] == "complete" for a in answers)

    deadline = asyncio.get_running_loop().time() + timeout
    while (done := await answered()) < count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{done} of {count} prompts answered after {timeout:.0f} s")
        await asyncio.sleep(0.2)


def assert_one_answer_each(prompts: list[Any], answers: list[Any]) -> None:
    """Each prompt answered once, in publish order, the answer's responseId its id."""
    by_response = [a.extras["headers"]["responseId"] for a in answers]
    assert by_response == [p.id for p in prompts], (by_response, [p.id for p in prompts])
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer.data == answer_text(prompt.data)
        assert answer.extras["headers"]["status"] == "complete"


def creates_after_closes(view: TextView) -> bool:
    """Every answer was created after the one before it closed (one at a time)."""
    open_answers = 0
    for message in view.messages:
        status = (message.extras or {}).get("headers", {}).get("status")
        if message.action == MessageAction.MESSAGE_CREATE and message.name == "response":
            if open_answers:
                return False
            open_answers += 1
        elif message.action == MessageAction.MESSAGE_UPDATE and status == "complete":
            open_answers = max(0, open_answers - 1)
    return True


async def test_prompts_published_while_no_worker_runs_are_answered_once_in_order(
    stack: Stack, channel_name: str
) -> None:
    settings = stack.settings(listen_channels=channel_name)
    first = f"first question {uuid.uuid4().hex[:6]}"
    async with running_worker(settings):
        await served(stack, channel_name)
        await ask(stack, channel_name, first)
        await wait_answered(stack, channel_name, 1)
    # No worker runs: the user goes on asking.
    later = [f"second question {uuid.uuid4().hex[:6]}", f"third question {uuid.uuid4().hex[:6]}"]
    await ask(stack, channel_name, *later)
    async with subscriber(stack, channel_name) as live, running_worker(stack.settings(
        listen_channels=channel_name
    )):  # fmt: skip
        await wait_answered(stack, channel_name, 3)
        await asyncio.sleep(0.5)  # a duplicate would show up now
    prompts, answers = await conversation(stack, channel_name)
    assert [p.data for p in prompts] == [first, *later]
    assert_one_answer_each(prompts, answers)  # the first is not answered again
    assert creates_after_closes(live)
    for prompt in prompts:
        assert (await stack.status(prompt.id))["state"] == "completed"


async def test_a_backends_first_job_opens_the_session_for_the_users_follow_ups(
    stack: Stack, channel_name: str
) -> None:
    """No LISTEN_CHANNELS: the channel a job is enqueued for is listened on afterwards."""
    job = Job(channel=channel_name, input=f"opening {uuid.uuid4().hex[:6]}", user_client_id="alice")
    async with running_worker(stack.settings()):
        await stack.enqueue(job)
        await stack.wait_state(job.id, "completed")
        follow_up = f"follow up {uuid.uuid4().hex[:6]}"
        await ask(stack, channel_name, follow_up)
        await wait_answered(stack, channel_name, 2)
    prompts, answers = await conversation(stack, channel_name)
    assert [a.extras["headers"]["responseId"] for a in answers] == [job.id, prompts[0].id]
    assert answers[1].data == answer_text(follow_up)


async def test_prompts_without_an_identified_sender_are_ignored(
    stack: Stack, channel_name: str
) -> None:
    settings = stack.settings(listen_channels=channel_name)
    async with running_worker(settings):
        await served(stack, channel_name)
        anonymous = stack.realtime()  # no clientId
        try:
            await anonymous.channels.get(channel_name).publish(Message(name="prompt", data="hi"))
        finally:
            await anonymous.close()
        await ask(stack, channel_name, "from alice")
        await wait_answered(stack, channel_name, 1)
        await asyncio.sleep(0.5)
    prompts, answers = await conversation(stack, channel_name)
    assert len(prompts) == 2 and len(answers) == 1
    assert answers[0].extras["headers"]["responseId"] == prompts[1].id


async def test_the_session_owner_is_killed_and_another_process_takes_over(
    stack: Stack, channel_name: str
) -> None:
    """Two worker processes, one session: SIGKILL the lease owner; prompts published
    afterwards are answered by the other within the lease TTL plus catch-up, once each."""
    env = {"listen_channels": channel_name, "session_lease_seconds": 3,
           "job_visibility_timeout_seconds": 3}  # fmt: skip
    procs = {
        name: await start_worker_process(stack.env(worker_id=name, **env))
        for name in ("w-one", "w-two")
    }
    try:
        redis = stack.queue().redis
        lease_key = f"{stack.prefix}:session:{channel_name}:lease"
        await wait_for_async(lambda: redis.get(lease_key), 20, "a session owner")
        owner = (await redis.get(lease_key)).split(":")[0]
        procs[owner].kill()
        await procs[owner].wait()
        texts = [f"after the kill {i} {uuid.uuid4().hex[:6]}" for i in range(2)]
        await ask(stack, channel_name, *texts)
        await wait_answered(stack, channel_name, 2, timeout=30)
        await asyncio.sleep(0.5)
        prompts, answers = await conversation(stack, channel_name)
        assert_one_answer_each(prompts, answers)
        survivor = next(n for n in procs if n != owner)
        assert (await redis.get(lease_key)).startswith(f"{survivor}:")
        await redis.aclose()
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.communicate(), 30)


async def wait_for_async(fetch: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await fetch():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


# -- cancels ---------------------------------------------------------------------------


async def test_a_cancel_while_the_job_is_queued_means_it_never_runs(
    stack: Stack, channel_name: str
) -> None:
    busy = Job(channel=channel_name, input="keep the only slot busy", user_client_id="alice",
               metadata={"local_tokens": "300", "local_tokens_per_second": "100"})  # fmt: skip
    queued = Job(channel=channel_name, input="never runs", user_client_id="alice")
    async with running_worker(stack.settings(worker_concurrency=1)):
        await stack.enqueue(busy)
        await stack.wait_state(busy.id, "running")
        await stack.enqueue(queued)
        await cancel(stack, channel_name, queued.id)
        record = await stack.wait_state(queued.id, "cancelled")
        await stack.wait_state(busy.id, "completed")
    assert "started_at" not in record  # never taken to run
    _, answers = await conversation(stack, channel_name)
    assert [a.extras["headers"]["responseId"] for a in answers] == [busy.id]


async def test_a_cancel_published_while_the_worker_is_down_is_found_on_resume(
    stack: Stack, channel_name: str
) -> None:
    job = Job(channel=channel_name, input="cancelled in the dark", user_client_id="alice",
              metadata={"local_tokens": "400", "local_tokens_per_second": "40"})  # fmt: skip
    async with running_worker(stack.settings(listen_channels=channel_name)):
        await served(stack, channel_name)
    await stack.enqueue(job)
    await cancel(stack, channel_name, job.id)
    async with running_worker(stack.settings(listen_channels=channel_name)):
        record = await stack.wait_state(job.id, "cancelled", timeout=20)
    _, answers = await conversation(stack, channel_name)
    # Either it never started, or it was stopped at once and closed `cancelled`.
    assert all(a.extras["headers"]["status"] == "cancelled" for a in answers)
    assert record["state"] == "cancelled"


async def test_a_cancel_from_another_user_is_refused(stack: Stack, channel_name: str) -> None:
    job = Job(channel=channel_name, input=f"alice's {uuid.uuid4().hex[:6]}", user_client_id="alice",
              metadata={"local_tokens": "150", "local_tokens_per_second": "60"})  # fmt: skip
    async with running_worker(stack.settings(listen_channels=channel_name)):
        await served(stack, channel_name)
        await stack.enqueue(job)
        await stack.wait_state(job.id, "running")
        await cancel(stack, channel_name, job.id, client_id="mallory")
        forged = Message(name="cancel", extras={"headers": {"responseId": job.id,
                                                            "role": "admin"}})  # fmt: skip
        async with user(stack, channel_name, "mallory") as ch:
            await ch.publish(forged)  # a role written by the client counts for nothing
        record = await stack.wait_state(job.id, "completed", "cancelled", timeout=30)
    assert record["state"] == "completed"
    _, answers = await conversation(stack, channel_name)
    assert [a.data for a in answers] == [answer_text(job.input, 150)]  # type: ignore[arg-type]
    assert json.loads(record["payload"])["user_client_id"] == "alice"


async def test_a_connection_that_cannot_resume_is_caught_up(
    stack: Stack, channel_name: str
) -> None:
    """The worker's connection drops and comes back only after the resume window (here
    5 s): the connection cannot be recovered (80008). Prompts published meanwhile are found
    by the resume routine: none missed, none answered twice."""
    from worker.devstack.ably import LocalAbly
    from worker.devstack.fault_proxy import FaultProxy

    async with LocalAbly(resume_window_s=5) as ably, FaultProxy(ably.endpoint) as proxy:
        local = Stack(stack.redis, ably, stack.openai, stack.prefix)
        settings = local.settings(listen_channels=channel_name, ably_endpoint=proxy.endpoint)
        with capture_logs() as logs:
            async with running_worker(settings), subscriber(local, channel_name) as live:
                await served(local, channel_name)
                await ask(local, channel_name, "before the outage")
                await wait_answered(local, channel_name, 1)
                proxy.blackhole(12.0)  # new connections are held past the resume window
                await proxy.drop_connections()
                await ask(local, channel_name, "during the outage 1", "during the outage 2")
                await wait_answered(local, channel_name, 3, timeout=60)
                await ask(local, channel_name, "after the outage")
                await wait_answered(local, channel_name, 4, timeout=30)
                await asyncio.sleep(0.5)
        prompts, answers = await conversation(local, channel_name)
    # Sockudo re-attaches with the channel serial the SDK sends, so it resumes the channel
    # even on a new connection (a re-attach it cannot resume is the next test); the
    # connection itself could not be recovered, and the worker replaced it.
    events = [e["event"] for e in logs]
    assert "ably.connection_recycled" in events, events
    assert len(prompts) == 4
    assert_one_answer_each(prompts, answers)
    assert live.messages  # the subscriber saw the answers live


async def test_a_reattach_that_ably_reports_as_not_resumed_runs_the_resume_routine(
    stack: Stack, channel_name: str
) -> None:
    """The session's channel is detached and attached again (as after a suspension):
    Ably reports `resumed: false`, and prompts published meanwhile are caught up."""
    from worker.queue import RedisStreamsQueue
    from worker.redis_client import connect_redis
    from worker.sessions.session import Session, SessionOptions
    from worker.sessions.store import SessionStore
    from worker.transport.channel_uses import ChannelUses

    redis = connect_redis(stack.redis.url)
    queue = RedisStreamsQueue(redis, prefix=stack.prefix, consumer="session-test")
    store = SessionStore(redis, stack.prefix, "session-test", lease_ttl_s=15)
    await store.open(channel_name)
    client = stack.realtime(client_id="agent")

    async def agents() -> set[str]:
        return {"agent"}

    session = Session(channel_name, client, store, queue, SessionOptions(), agents, ChannelUses())
    try:
        with capture_logs() as logs:
            await session.start()
            await ask(stack, channel_name, "while attached")
            await session.channel.detach()
            await ask(stack, channel_name, "while detached 1", "while detached 2")
            await session.channel.attach()
            deadline = asyncio.get_running_loop().time() + 10
            while sum(e["event"] == "session.prompt_enqueued" for e in logs) < 1:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
    finally:
        await session.stop()
        await client.close()
    prompts, _ = await conversation(stack, channel_name)
    resumes = [e for e in logs if e["event"] == "session.resumed"]
    assert [e["reason"] for e in resumes] == ["taken", "reattached"], resumes
    assert resumes[1]["prompts"] == 2
    # One job per prompt, the first active and the other two waiting behind it, in order.
    state = await store.state(channel_name)
    assert state.active == prompts[0].id
    assert [w["id"] for w in state.waiting] == [prompts[1].id, prompts[2].id]
    await redis.aclose()


async def test_a_follow_up_is_answered_after_the_first_and_sees_the_conversation(
    stack: Stack, channel_name: str
) -> None:
    """Prompts of one conversation: the follow-up's answer starts after the first one
    closed, and the model was given the first answer's response id to continue from."""
    first, second = (f"{word} {uuid.uuid4().hex[:6]}" for word in ("question", "follow-up"))
    async with (
        subscriber(stack, channel_name) as live,
        running_worker(stack.settings(listen_channels=channel_name)),
    ):
        await served(stack, channel_name)
        await ask(stack, channel_name, first, second)
        await wait_answered(stack, channel_name, 2)
    prompts, answers = await conversation(stack, channel_name)
    assert_one_answer_each(prompts, answers)
    assert creates_after_closes(live)
    record = await stack.status(prompts[0].id)
    assert record["model_response_id"].startswith("resp_")
    assert stack.openai.last_request(first)["previous_response_id"] is None
    assert stack.openai.last_request(second)["previous_response_id"] == record["model_response_id"]


async def test_with_chat_completions_the_follow_up_carries_the_transcript(
    stack: Stack, channel_name: str
) -> None:
    """OPENAI_API=chat has no previous_response_id: the worker sends the conversation
    read from the channel (the user's prompts and the agent's complete answers)."""
    first, second = (f"{word} {uuid.uuid4().hex[:6]}" for word in ("chat question", "chat again"))
    async with running_worker(stack.settings(listen_channels=channel_name, openai_api="chat")):
        await served(stack, channel_name)
        await ask(stack, channel_name, first, second)
        await wait_answered(stack, channel_name, 2)
    prompts, answers = await conversation(stack, channel_name)
    assert_one_answer_each(prompts, answers)
    sent = stack.openai.last_request(second)["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("user", first), ("assistant", answer_text(first)), ("user", second)
    ]  # fmt: skip


async def test_an_idle_session_leaves_redis_alone(stack: Stack, channel_name: str) -> None:
    """A session with no answer of its own to watch polls nothing: hundreds of idle
    sessions would otherwise cost a worker a Redis read each, four times a second."""
    redis = stack.queue().redis

    async def session_reads() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))

    async with running_worker(stack.settings(listen_channels=channel_name)):
        await served(stack, channel_name)
        await ask(stack, channel_name, f"one question {uuid.uuid4().hex[:6]}")
        await wait_answered(stack, channel_name, 1)
        await asyncio.sleep(1.0)  # the session sees its answer end, then has nothing to watch
        before = await session_reads()
        await asyncio.sleep(2.0)
        assert await session_reads() - before <= 1


async def test_a_follow_up_behind_an_answer_of_this_process_waits_without_polling(
    stack: Stack, channel_name: str
) -> None:
    """The session is woken when its active answer, running in the same process, ends:
    it reads nothing from Redis meanwhile (256 such sessions polled four times a second
    cost a busy worker two thousand reads a second), and the follow-up is answered next."""
    redis = stack.queue().redis

    async def session_reads() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))

    first, follow_up = (f"{word} {uuid.uuid4().hex[:6]}" for word in ("question", "and then?"))
    async with OpenAILocalServer(tokens_per_second=40, first_token_ms=20) as paced:
        slow = Stack(stack.redis, stack.ably, paced, stack.prefix)  # answers of about 3 s
        async with running_worker(slow.settings(listen_channels=channel_name)):
            await served(stack, channel_name)
            await ask(stack, channel_name, first, follow_up)
            await wait_for_async(lambda: _one_running(stack, channel_name), 10, "an answer")
            await asyncio.sleep(0.5)  # the session has seen the follow-up wait behind it
            before = await session_reads()
            await asyncio.sleep(1.0)
            reads = await session_reads() - before
            assert await _one_running(stack, channel_name), "the first answer ended too soon"
            await wait_answered(stack, channel_name, 2)
        sent = paced.last_request(follow_up)
    assert reads <= 1, f"{reads} hash reads in 1 s while the answer streamed"
    prompts, answers = await conversation(stack, channel_name)
    assert_one_answer_each(prompts, answers)
    record = await stack.status(prompts[0].id)
    assert sent["previous_response_id"] == record["model_response_id"]


async def _one_running(stack: Stack, channel: str) -> bool:
    """The first prompt's answer streams (and the follow-up's has not started)."""
    prompts, _ = await conversation(stack, channel)
    states = [(await stack.status(p.id) or {}).get("state") for p in prompts]
    return states[:1] == ["running"] and "completed" not in states


def channel_objects(names: set[str]) -> int:
    """ably-python channel objects alive in this process for these channel names."""
    gc.collect()
    return sum(isinstance(o, RealtimeChannel) and o.name in names for o in gc.get_objects())


async def test_a_conversation_gone_idle_leaves_no_channel_behind(stack: Stack) -> None:
    """A long-lived connection that kept every channel it served (about 11 KB each, and
    attached ones sent every message) grew with each new conversation."""
    names = {f"idle:{uuid.uuid4().hex[:8]}" for _ in range(3)}
    jobs = [Job(id=uuid.uuid4().hex, channel=name, input="hello") for name in sorted(names)]
    redis = stack.queue().redis
    settings = stack.settings(session_idle_seconds=1, session_lease_seconds=2)
    async with running_worker(settings):
        await stack.enqueue(*jobs)
        for job in jobs:
            await stack.wait_state(job.id, "completed")
        await served(stack, jobs[0].channel)
        assert channel_objects(names) >= 1  # the sessions hold their channels meanwhile
        leases = [f"{stack.prefix}:session:{name}:lease" for name in names]
        await wait_for_async(lambda: _none_exist(redis, leases), 30, "the sessions gone idle")
        await asyncio.sleep(0.5)  # the last one detaching
        assert channel_objects(names) == 0


async def _none_exist(redis: Any, keys: list[str]) -> bool:
    return not await redis.exists(*keys)
