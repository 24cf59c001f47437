"""Running the real worker against the real local services, for the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ably.types.channeloptions import ChannelOptions

from tests.ably_helpers import TextView, wait_for
from worker.app import serve
from worker.devstack.ably import LocalAbly
from worker.devstack.redis_server import LocalRedis
from worker.jobs import Job
from worker.queue import RedisStreamsQueue
from worker.redis_client import connect_redis
from worker.settings import Settings, load_settings
from worker.transport.client import realtime_client, rest_client


@dataclass
class Stack:
    """The three local services and one queue prefix: one test's world."""

    redis: LocalRedis
    ably: LocalAbly
    openai: Any
    prefix: str

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": self.redis.url,
            "queue_prefix": self.prefix,
            "ably_api_key": self.ably.key,
            "ably_endpoint": self.ably.endpoint,
            "openai_api_key": self.openai.api_key,
            "openai_base_url": self.openai.base_url,
            "openai_model": "local",
            "worker_id": f"test-worker-{uuid.uuid4().hex[:6]}",
            "presence_channel": f"agents:{self.prefix}",
            "shutdown_grace_seconds": 5,
            "job_timeout_seconds": 30,
            "log_format": "json",
            "worker_processes": 1,  # `worker run` is then THE worker, the pid tests signal
        }
        values.update(overrides)
        return load_settings(Settings, **values)

    def env(self, **overrides: Any) -> dict[str, str]:
        """The same settings as environment variables, for a worker subprocess."""
        base = {k.upper(): str(v) for k, v in self.settings(**overrides).model_dump().items()
                if v is not None}  # fmt: skip
        base["ABLY_API_KEY"] = self.ably.key
        base["OPENAI_API_KEY"] = self.openai.api_key
        return {**os.environ, **base, "PYTHONPATH": os.getcwd()}

    def queue(self) -> RedisStreamsQueue:
        return RedisStreamsQueue(connect_redis(self.redis.url), prefix=self.prefix, consumer="test")

    async def enqueue(self, *jobs: Job) -> None:
        queue = self.queue()
        try:
            await queue.ensure_group()
            for job in jobs:
                assert await queue.enqueue(job)
        finally:
            await queue.redis.aclose()

    async def status(self, job_id: str) -> dict[str, str]:
        queue = self.queue()
        try:
            return await queue.status(job_id) or {}
        finally:
            await queue.redis.aclose()

    async def wait_state(self, job_id: str, *states: str, timeout: float = 20) -> dict[str, str]:
        record: dict[str, str] = {}

        async def fetch() -> bool:
            nonlocal record
            record = await self.status(job_id)
            return record.get("state") in states

        deadline = asyncio.get_running_loop().time() + timeout
        while not await fetch():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"job {job_id} never reached {states}: {record}")
            await asyncio.sleep(0.05)
        return record

    def rest(self) -> Any:
        return rest_client(self.ably.key, self.ably.endpoint)

    def realtime(self, **options: Any) -> Any:
        return realtime_client(self.ably.key, self.ably.endpoint, **options)

    async def history(self, channel: str) -> list[Any]:
        page = await self.rest().channels.get(channel).history()
        return list(page.items)

    async def rewound(self, channel: str, count: int, timeout: float = 10) -> TextView:
        """What a late joiner sees: attach with rewind and collect `count` messages."""
        view = TextView()
        client = self.realtime()
        try:
            ch = client.channels.get(channel, ChannelOptions(params={"rewind": "100"}))
            await ch.subscribe(view.on_message)
            await wait_for(lambda: len(view.texts) >= count, timeout, "rewound messages")
            await asyncio.sleep(0.2)  # anything more would show up now
        finally:
            await client.close()
        return view


@contextlib.asynccontextmanager
async def subscriber(stack: Stack, channel: str) -> AsyncIterator[TextView]:
    """A live subscriber attached before the worker publishes."""
    view = TextView()
    client = stack.realtime()
    try:
        await client.channels.get(channel).subscribe(view.on_message)
        yield view
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    """The real worker, in this process, stopped (and drained) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, handle_signals=False))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def start_worker_process(env: dict[str, str]) -> asyncio.subprocess.Process:
    """`python -m worker run` as its own process, logs on stderr."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
