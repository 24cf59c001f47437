"""Shared fixtures: the real local servers, started once per test session."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from worker.devstack.ably import LocalAbly
from worker.devstack.redis_server import LocalRedis
from worker.transport.client import quiet_sdk_logs, realtime_client, rest_client

quiet_sdk_logs()


@pytest.fixture(scope="session")
async def local_ably() -> AsyncIterator[LocalAbly]:
    """Sockudo with Ably compatibility, on a free port, for the whole session."""
    async with LocalAbly() as server:
        yield server


@pytest.fixture
def channel_name() -> str:
    """A fresh channel per test, so tests never see each other's history."""
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def ably_clients(local_ably: LocalAbly) -> AsyncIterator[Callable[..., Any]]:
    """A factory of realtime clients against the local Ably, all closed after the test."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        client = realtime_client(local_ably.key, local_ably.endpoint, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.fixture
def ably_rest(local_ably: LocalAbly) -> Iterator[Any]:
    yield rest_client(local_ably.key, local_ably.endpoint)


@pytest.fixture(scope="session")
async def local_redis() -> AsyncIterator[LocalRedis]:
    """A real redis-server on a free port for the whole session (append-only, so a test
    that restarts it finds its data again)."""
    async with LocalRedis(appendonly=True) as server:
        yield server


@pytest.fixture
def queue_prefix() -> str:
    """A key prefix per test: tests share one Redis but never each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
async def openai_local() -> AsyncIterator[Any]:
    """The local OpenAI-compatible server, fast: 2,000 tokens/s, 20 ms to the first token."""
    from worker.devstack.openai_local import OpenAILocalServer

    async with OpenAILocalServer(tokens_per_second=2000, first_token_ms=20) as server:
        yield server


@pytest.fixture
def stack(
    local_redis: LocalRedis, local_ably: LocalAbly, openai_local: Any, queue_prefix: str
) -> Any:
    """The three local services and a fresh queue prefix: one end-to-end test's world."""
    from tests.worker_harness import Stack

    return Stack(local_redis, local_ably, openai_local, queue_prefix)
