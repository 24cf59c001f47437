"""The README's Python API, `await worker.enqueue(...)`, against a real Redis."""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import uuid

import pytest

import worker
from tests.worker_harness import Stack
from worker.jobs import Job

pytestmark = pytest.mark.timeout(60)


async def test_enqueue_works_on_every_call_in_one_process(stack: Stack, channel_name: str) -> None:
    where = {"redis_url": stack.redis.url, "queue_prefix": stack.prefix}
    first_id, second_id = f"q-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"

    first = await worker.enqueue(
        id=first_id, channel=channel_name, input="first", metadata={"user": "u1"}, **where
    )
    second = await worker.enqueue(id=second_id, channel=channel_name, input="second", **where)
    again = await worker.enqueue(id=first_id, channel=channel_name, input="changed?", **where)
    as_job = await worker.enqueue(Job(channel=channel_name, input="a Job object"), **where)

    assert first == (first_id, True) and second == (second_id, True)
    assert again == (first_id, False)  # the same id: nothing changed
    assert as_job[1] and as_job[0] not in (first_id, second_id)
    assert inspect.iscoroutinefunction(worker.enqueue)  # still the function, not a module

    records = {job_id: await stack.status(job_id) for job_id in (first_id, second_id, as_job[0])}
    assert {job_id: r["state"] for job_id, r in records.items()} == dict.fromkeys(records, "queued")
    assert {r["channel"] for r in records.values()} == {channel_name}
    payloads = {job_id: json.loads(r["payload"]) for job_id, r in records.items()}
    assert payloads[first_id]["input"] == "first"  # not "changed?"
    assert payloads[first_id]["metadata"] == {"user": "u1"}
    assert payloads[second_id]["input"] == "second"
    assert payloads[as_job[0]]["input"] == "a Job object"

    queue = stack.queue()
    try:
        assert await queue.redis.xlen(queue.stream) == 3  # one entry per new job
    finally:
        await queue.redis.aclose()


async def test_import_worker_stays_light() -> None:
    """`import worker` loads no client library: the enqueue code is imported on first use."""
    heavy = ("redis", "pydantic", "ably", "openai", "structlog")
    code = (
        "import sys, worker; print(sorted(m for m in sys.modules"
        f" if m.split('.')[0] in {heavy!r} or m.startswith('worker.')))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and out.decode().strip() == "[]"


async def test_a_job_over_the_limits_is_refused_at_enqueue(stack: Stack, channel_name: str) -> None:
    """The Python API checks what a take would: nothing over a limit reaches the queue."""
    from worker.jobs import JobError

    with pytest.raises(JobError, match="JOB_MAX_INPUT_CHARS"):
        await worker.enqueue(channel=channel_name, input="x" * 100_001,
                             redis_url=stack.redis.url, queue_prefix=stack.prefix)  # fmt: skip
    assert (await stack.status("anything")) == {}
    queue = stack.queue()
    try:
        assert await queue.redis.exists(queue.stream) == 0
    finally:
        await queue.redis.aclose()
