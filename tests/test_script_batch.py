"""`ScriptBatch` against a real redis-server: calls of one moment share a pipeline, each
gets its own reply or error, and scripts Redis has forgotten are loaded again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from worker.devstack.redis_server import LocalRedis
from worker.queue.batch import ScriptBatch
from worker.redis_client import connect_redis

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL_ON_NEGATIVE = """
if tonumber(ARGV[1]) < 0 then return redis.error_reply('negative: ' .. ARGV[1]) end
return ARGV[1]
"""


@pytest.fixture
async def redis(local_redis: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(local_redis.url)
    yield client
    await client.aclose()


def counting_pipelines(redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    made: list[int] = []
    original = redis.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(redis, "pipeline", pipeline)
    return made


async def test_the_calls_of_one_moment_go_in_one_pipeline_each_with_its_reply(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    incr, key = redis.register_script(INCR), f"batch:{uuid.uuid4().hex}"
    batch = ScriptBatch(redis)
    await incr(keys=[key], args=[0])  # loaded, as the queue's scripts are by their first use
    pipelines = counting_pipelines(redis, monkeypatch)
    replies = await asyncio.gather(*(batch(incr, [key], [1]) for _ in range(200)))
    assert sorted(replies) == list(range(1, 201))  # each call ran once, atomically
    assert len(pipelines) == 1
    assert await redis.get(key) == "200"


async def test_one_call_refused_fails_alone(redis: aioredis.Redis) -> None:
    check, batch = redis.register_script(FAIL_ON_NEGATIVE), ScriptBatch(redis)
    outcomes = await asyncio.gather(
        *(batch(check, [], [n]) for n in (1, -2, 3)), return_exceptions=True
    )
    assert outcomes[0] == "1" and outcomes[2] == "3"
    assert isinstance(outcomes[1], ResponseError) and "negative: -2" in str(outcomes[1])


async def test_scripts_redis_forgot_are_loaded_again(redis: aioredis.Redis) -> None:
    """A Redis restart flushes the script cache: the batch's calls still run, once each."""
    incr, key = redis.register_script(INCR), f"batch:{uuid.uuid4().hex}"
    batch = ScriptBatch(redis)
    assert await batch(incr, [key], [5]) == 5
    await redis.script_flush()
    assert await asyncio.gather(batch(incr, [key], [1]), batch(incr, [key], [1])) in (
        [6, 7], [7, 6]
    )  # fmt: skip
    assert await redis.get(key) == "7"
