"""Enqueueing from Python: `await worker.enqueue(channel="...", input="...")`.

The package's `worker.enqueue` calls this module's `enqueue` on first use (a lazy import,
so `import worker` stays light). It is not named `worker/enqueue.py`: importing a
submodule of that name would replace the function `worker.enqueue` with the module.

From any other language it is one `XADD` (see the README): this is a convenience.
"""

from __future__ import annotations

from typing import Any

from worker.jobs import Job, parse_job
from worker.queue import RedisStreamsQueue
from worker.redis_client import connect_redis
from worker.settings import RedisSettings, load_settings


async def enqueue(
    job: Job | None = None,
    *,
    redis_url: str | None = None,
    queue_prefix: str | None = None,
    **fields: Any,
) -> tuple[str, bool]:
    """Enqueue a job (a `Job`, or its fields as keywords).

    Returns the job id and whether it is new (False: a job with this id exists already,
    and nothing was changed). `REDIS_URL` and `QUEUE_PREFIX` apply unless given here.
    """
    job = job or parse_job(fields)  # the schema and the JOB_MAX_* limits, before Redis
    settings = load_settings(RedisSettings)
    queue = RedisStreamsQueue(
        connect_redis(redis_url or settings.redis_url),
        prefix=queue_prefix or settings.queue_prefix,
    )
    try:
        await queue.ensure_group()
        return job.id, await queue.enqueue(job)
    finally:
        await queue.redis.aclose()
