"""The Redis Streams queue against a real redis-server: what is left in Redis after each step."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from worker.devstack.redis_server import LocalRedis
from worker.jobs import Job
from worker.queue import RedisStreamsQueue
from worker.queue.redis_streams import backoff_seconds
from worker.redis_client import connect_redis


@pytest.fixture
async def redis_client(local_redis: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(local_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
def make_queue(redis_client: aioredis.Redis, queue_prefix: str) -> Callable[..., RedisStreamsQueue]:
    def make(consumer: str = "w1", **options: Any) -> RedisStreamsQueue:
        options.setdefault("backoff_base_s", 0.05)
        options.setdefault("claim_min_idle_ms", 0)
        return RedisStreamsQueue(redis_client, prefix=queue_prefix, consumer=consumer, **options)

    return make


def job(job_id: str = "job-1", **fields: Any) -> Job:
    return Job(**{"id": job_id, "channel": "chat:room-1", "input": "Hello", **fields})


async def test_enqueue_take_complete_leaves_a_completed_record(make_queue: Any) -> None:
    queue = make_queue()
    await queue.ensure_group()
    assert await queue.enqueue(job())
    assert (await queue.stats()).waiting == 1

    [delivery] = await queue.take(10, 100)
    assert (delivery.job_id, delivery.attempt, delivery.job) == ("job-1", 1, job())
    stats = await queue.stats()
    assert (stats.waiting, stats.pending) == (0, 1)
    assert (await queue.status("job-1"))["state"] == "running"

    assert await queue.complete(delivery, figures={"output_tokens": 12, "ttft_ms": None})
    record = await queue.status("job-1")
    assert record["output_tokens"] == "12" and "ttft_ms" not in record
    assert record["state"] == "completed" and record["attempts"] == "1"
    stats = await queue.stats()
    assert (stats.waiting, stats.pending) == (0, 0)
    assert await queue.redis.xlen(queue.stream) == 0  # acknowledged entries are deleted


async def test_enqueueing_an_id_twice_makes_one_job(make_queue: Any) -> None:
    queue = make_queue()
    await queue.ensure_group()
    assert await queue.enqueue(job()) is True
    assert await queue.enqueue(job(input="changed")) is False
    deliveries = await queue.take(10, 100)
    assert [d.job.input for d in deliveries] == ["Hello"]
    await queue.complete(deliveries[0])
    assert await queue.enqueue(job()) is False  # still one job after it finished


async def test_a_producers_gathered_burst_lands_whole_on_one_connection(
    make_queue: Any,
) -> None:
    """A backend that gathers its enqueues: every job lands once (a repeated id still
    makes one job), over one pipelined connection rather than one connection each."""
    queue = make_queue()
    await queue.ensure_group()
    clients_before = len(await queue.redis.client_list())  # ours: the one it used so far
    jobs = [job(f"burst-{i}", channel=f"chat:burst-{i}") for i in range(500)]
    added = await asyncio.gather(*map(queue.enqueue, [*jobs, job("burst-7")]))
    assert added == [True] * 500 + [False]
    assert await queue.redis.xlen(queue.stream) == 500
    assert (await queue.status("burst-499"))["state"] == "queued"
    assert len(await queue.redis.client_list()) == clients_before  # no connection opened


async def test_raw_xadd_duplicates_are_dropped_at_take(make_queue: Any) -> None:
    """Other languages enqueue with a bare XADD; two entries with one id run once."""
    queue = make_queue()
    await queue.ensure_group()
    payload = json.dumps({"id": "raw-1", "channel": "chat:x", "input": "hi"})
    await queue.redis.xadd(queue.stream, {"job": payload})
    await queue.redis.xadd(queue.stream, {"job": payload})
    deliveries = await queue.take(10, 100)
    assert [d.job_id for d in deliveries] == ["raw-1"]
    assert (await queue.stats()).pending == 1  # the duplicate entry was acknowledged


async def test_job_without_id_keeps_one_id_across_retries(make_queue: Any) -> None:
    queue = make_queue()
    await queue.ensure_group()
    await queue.redis.xadd(queue.stream, {"job": json.dumps({"channel": "c:1", "input": "hi"})})
    [first] = await queue.take(1, 100)
    assert await queue.retry(first, "model failed")
    await asyncio.sleep(0.2)
    assert await queue.promote_due() == 1
    [second] = await queue.take(1, 100)
    assert second.job_id == first.job_id and second.attempt == 2


async def test_malformed_job_is_delivered_with_its_error_for_the_dead_letters(
    make_queue: Any,
) -> None:
    queue = make_queue()
    await queue.ensure_group()
    await queue.redis.xadd(queue.stream, {"job": '{"id": "bad-1", "input": "no channel"}'})
    await queue.redis.xadd(queue.stream, {"job": "not json at all"})
    bad, worse = await queue.take(10, 100)
    assert bad.job is None and "channel" in (bad.error or "")
    assert worse.job is None and "not valid JSON" in (worse.error or "")
    assert await queue.dead_letter(bad, bad.error or "")
    assert await queue.dead_letter(worse, worse.error or "")
    letters = await queue.dead_letters()
    assert letters[0]["job_id"] == "bad-1" and "channel" in letters[0]["error"]
    assert letters[1]["job"] == "not json at all"  # the payload is kept as it came
    stats = await queue.stats()
    assert (stats.pending, stats.dead) == (0, 2)


async def test_retries_back_off_then_dead_letter_after_the_last_attempt(make_queue: Any) -> None:
    queue = make_queue(max_attempts=2)
    await queue.ensure_group()
    await queue.enqueue(job())
    [first] = await queue.take(1, 100)
    assert await queue.retry(first, "HTTP 500")
    record = await queue.status("job-1")
    assert record["state"] == "retrying" and record["error"] == "HTTP 500"
    assert (await queue.stats()).delayed == 1
    assert await queue.take(1, 10) == []  # not before its backoff

    await asyncio.sleep(0.1)
    assert await queue.promote_due() == 1
    [second] = await queue.take(1, 100)
    assert second.attempt == 2
    assert await queue.dead_letter(second, "HTTP 500 again")
    [letter] = await queue.dead_letters()
    assert (letter["job_id"], letter["error"], letter["attempts"]) == (
        "job-1",
        "HTTP 500 again",
        "2",
    )
    assert json.loads(letter["job"])["input"] == "Hello"
    assert (await queue.status("job-1"))["state"] == "dead"


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)]:
        samples = [backoff_seconds(attempt, 1.0, 30.0) for _ in range(200)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples)
        assert max(samples) - min(samples) > ceiling / 10  # jittered, not fixed


async def test_live_workers_keep_their_jobs_and_dead_ones_lose_them(make_queue: Any) -> None:
    alive = make_queue("alive", heartbeat_ttl_s=1)
    other = make_queue("other", heartbeat_ttl_s=1)
    await alive.ensure_group()
    await alive.enqueue(job())
    await alive.heartbeat({"capacity": 1})
    await other.heartbeat({"capacity": 1})
    [taken] = await alive.take(1, 100)

    assert await other.reclaim() == []  # the owner's heartbeat is live
    await asyncio.sleep(1.2)  # the owner stops renewing: its key expires
    await other.heartbeat({"capacity": 1})
    [reclaimed] = await other.reclaim()
    assert (reclaimed.job_id, reclaimed.attempt, reclaimed.reclaimed) == ("job-1", 2, True)
    assert (await other.status("job-1"))["worker"] == "other"
    assert [w["consumer"] for w in (await other.stats()).workers] == ["other"]
    assert taken.entry_id == reclaimed.entry_id


async def test_a_job_that_keeps_killing_workers_is_dead_lettered(make_queue: Any) -> None:
    queue = make_queue("w", max_attempts=1)
    await queue.ensure_group()
    await queue.enqueue(job())
    await queue.take(1, 100)  # this worker "dies": no heartbeat key ever existed
    rescuer = make_queue("rescuer", max_attempts=1)
    [again] = await rescuer.reclaim()
    assert again.job is None and "gave up after 1 attempts" in (again.error or "")


async def test_requeue_interrupted_does_not_spend_an_attempt(make_queue: Any) -> None:
    queue = make_queue()
    await queue.ensure_group()
    await queue.enqueue(job())
    [first] = await queue.take(1, 100)
    assert await queue.set_response_serial(first, "serial-abc")
    assert await queue.requeue_interrupted(first)
    [second] = await queue.take(1, 100)
    assert second.attempt == 1
    assert second.response_serial == "serial-abc"  # the retry reopens the same message
    assert (await queue.stats()).pending == 1


async def test_dead_letters_can_be_retried_and_purged(make_queue: Any) -> None:
    queue = make_queue(max_attempts=1)
    await queue.ensure_group()
    await queue.enqueue(job("a"))
    await queue.enqueue(job("b"))
    for delivery in await queue.take(2, 100):
        assert await queue.dead_letter(delivery, "boom")
    assert (await queue.stats()).dead == 2
    first = (await queue.dead_letters())[0]["entry_id"]
    assert await queue.retry_dead([first]) == 1
    assert (await queue.status("a"))["state"] == "queued"  # `worker status a` says so
    [again] = await queue.take(5, 100)
    assert (again.job_id, again.attempt) == ("a", 1)
    assert await queue.purge_dead() == 1
    assert (await queue.stats()).dead == 0


async def test_stats_report_lag_of_the_oldest_waiting_job(make_queue: Any) -> None:
    queue = make_queue()
    await queue.ensure_group()
    assert (await queue.stats()).oldest_waiting_age_s is None
    await queue.enqueue(job())
    await asyncio.sleep(0.3)
    age = (await queue.stats()).oldest_waiting_age_s
    assert age is not None and age >= 0.25


async def test_jobs_survive_a_redis_restart(local_redis: LocalRedis, make_queue: Any) -> None:
    queue = make_queue()
    await queue.ensure_group()
    await queue.enqueue(job("durable"))
    await local_redis.restart()  # SIGKILL, then start on the same data directory
    [delivery] = await queue.take(1, 100)
    assert delivery.job_id == "durable"


async def test_own_entries_no_task_runs_are_taken_back(make_queue: Any) -> None:
    """A job whose task lost Redis while finishing stays pending under a live worker;
    `orphans` hands it back to that worker instead of leaving it stuck."""
    queue = make_queue("w")
    await queue.ensure_group()
    await queue.heartbeat({})
    await queue.enqueue(job("stuck"))
    await queue.enqueue(job("busy"))
    stuck, busy = await queue.take(2, 100)
    assert await queue.reclaim() == []  # our heartbeat is live: nobody else may take them
    [again] = await queue.orphans(running={busy.entry_id})
    assert (again.job_id, again.attempt, again.entry_id) == ("stuck", 2, stuck.entry_id)
    assert await queue.orphans(running={busy.entry_id, again.entry_id}) == []


async def test_rediss_with_a_self_signed_certificate_works_as_on_heroku() -> None:
    """Heroku Redis serves TLS with a self-signed certificate: `rediss://` must connect."""
    from worker.devstack.redis_server import LocalRedis

    async with LocalRedis(tls=True) as server:
        assert server.url.startswith("rediss://")
        client = connect_redis(server.url)
        try:
            queue = RedisStreamsQueue(client, prefix="tls", consumer="w")
            await queue.ensure_group()
            await queue.enqueue(job("over-tls"))
            [delivery] = await queue.take(1, 100)
            assert delivery.job_id == "over-tls"
        finally:
            await client.aclose()


async def test_a_refused_password_is_not_retried_like_a_restart() -> None:
    """redis-py makes AuthenticationError a ConnectionError; the client retries the
    latter (restarts, failovers) but not the former: one connection, not nine."""
    from redis.exceptions import AuthenticationError

    from worker.devstack.redis_server import LocalRedis

    async with LocalRedis(password="pw") as guarded:
        admin = connect_redis(guarded.url)
        wrong = connect_redis(guarded.url.replace(":pw@", ":nope@"))
        try:
            before = (await admin.info("stats"))["total_connections_received"]
            with pytest.raises(AuthenticationError):
                await wrong.ping()
            after = (await admin.info("stats"))["total_connections_received"]
        finally:
            await admin.aclose()
            await wrong.aclose()
    assert after - before == 1


async def test_a_stale_owners_transitions_are_refused_and_change_nothing(make_queue: Any) -> None:
    """Fencing: once another worker has reclaimed a job, every transition of its old
    owner is refused (False) and leaves the record, the stream and the sets as they were."""
    stale = make_queue("stale", heartbeat_ttl_s=1)
    live = make_queue("live", heartbeat_ttl_s=1)
    await stale.ensure_group()
    await stale.enqueue(job())
    await stale.heartbeat({})
    [old] = await stale.take(1, 100)
    await asyncio.sleep(1.2)  # the stale worker's heartbeat expires (frozen, partitioned)
    await live.heartbeat({})
    [new] = await live.reclaim()
    before = await live.status("job-1")

    assert not await stale.set_response_serial(old, "serial-of-the-stale-one")
    assert not await stale.complete(old, figures={"output_tokens": 1})
    assert not await stale.retry(old, "stale retry")
    assert not await stale.dead_letter(old, "stale dead letter")
    assert not await stale.requeue_interrupted(old)
    assert not await stale.owns(old)
    assert await live.status("job-1") == before
    stats = await live.stats()
    assert (stats.waiting, stats.pending, stats.delayed, stats.dead) == (0, 1, 0, 0)

    assert await live.owns(new)
    assert await live.complete(new)
    assert (await live.status("job-1"))["state"] == "completed"


async def test_a_finished_record_is_never_moved_back(make_queue: Any) -> None:
    queue = make_queue()
    await queue.ensure_group()
    await queue.enqueue(job())
    [delivery] = await queue.take(1, 100)
    assert await queue.complete(delivery)
    # A late second transition for the same delivery (a duplicate task, a retried call).
    assert not await queue.retry(delivery, "late")
    assert not await queue.requeue_interrupted(delivery)
    assert not await queue.dead_letter(delivery, "late")
    # Even a stray id in the delayed set is not promoted over a finished record.
    await queue.redis.zadd(queue.delayed, {"job-1": 0})
    await queue.promote_due()
    assert (await queue.status("job-1"))["state"] == "completed"
    stats = await queue.stats()
    assert (stats.waiting, stats.pending, stats.dead) == (0, 0, 0)


async def test_a_process_keeps_its_redis_connections_bounded() -> None:
    # Hundreds of answers at once each write to Redis: redis-py 8 refuses the 101st
    # command in flight (MaxConnectionsError); ours wait for a free connection instead.
    async with LocalRedis() as server:  # its own: only this test's connections on it
        redis = connect_redis(server.url, max_connections=8)
        watcher = connect_redis(server.url, max_connections=2)
        try:
            waits = [redis.blpop([f"nothing:{i}"], timeout=0.05) for i in range(150)]
            assert await asyncio.gather(*waits) == [None] * 150
            assert len(await watcher.client_list()) <= 8 + 1  # the pool's, the watcher
        finally:
            await redis.aclose()
            await watcher.aclose()


async def test_a_batch_taken_at_once_starts_every_job_and_opens_their_sessions(
    make_queue: Any,
) -> None:
    queue = make_queue()
    await queue.ensure_group()
    jobs = [Job(id=f"batch-{i}", channel=f"batch:{i}", input="hi") for i in range(40)]
    for job in jobs:
        await queue.enqueue(job)
    taken = await queue.take(100, 100)
    assert [d.job_id for d in taken] == [job.id for job in jobs]  # in the stream's order
    assert {await queue.redis.hget(queue.record_key(j.id), "state") for j in jobs} == {"running"}
    sessions = await queue.redis.zrange(f"{queue.prefix}:sessions", 0, -1)
    assert set(sessions) >= {job.channel for job in jobs}
