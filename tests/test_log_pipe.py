"""A worker whose log stream breaks keeps working, drains and exits.

On Heroku stdout and stderr are a pipe to the log router; locally `worker run | head`
does the same. Once the reader is gone every write raises BrokenPipeError: the worker
must drop its logs from then on, never stall or lose its jobs over them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from typing import Any

import pytest

from tests.worker_harness import Stack
from worker import app, logs
from worker.devstack.openai_local import answer_text
from worker.jobs import Job

pytestmark = pytest.mark.timeout(120)


async def start_worker_into_pipe(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, int]:
    """`python -m worker run 2>&1 | ...`: stdout and stderr on one pipe; returns the
    process and the pipe's read end."""
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "run", env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
        )  # fmt: skip
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child holds the only write end now
    return proc, read_fd


async def read_then_close(read_fd: int, limit: int) -> bytes:
    """What `head -c LIMIT` does: read up to `limit` bytes, then close the pipe."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    data = b""
    try:
        while len(data) < limit:
            chunk = await asyncio.wait_for(reader.read(limit - len(data)), 20)
            if not chunk:
                break
            data += chunk
    finally:
        transport.close()  # the reader is gone: from here on the worker's writes fail
    return data


async def test_a_closed_log_pipe_does_not_stop_jobs_drain_or_exit(
    stack: Stack, channel_name: str
) -> None:
    proc, read_fd = await start_worker_into_pipe(stack.env(log_level="INFO"))
    try:
        head = await read_then_close(read_fd, 300)
        assert len(head) == 300, head  # the worker logged, then lost its reader
        jobs = [
            Job(channel=channel_name, input=f"after the pipe {i} {uuid.uuid4().hex[:8]}")
            for i in range(6)
        ]
        await stack.enqueue(*jobs)
        for job in jobs:
            await stack.wait_state(job.id, "completed", timeout=20)

        history: list[Any] = await stack.history(channel_name)
        assert len(history) == 6  # one message per job
        assert {m.extras["headers"]["responseId"]: m.data for m in history} == {
            job.id: answer_text(str(job.input)) for job in jobs
        }
        assert {m.extras["headers"].get("status") for m in history} == {"complete"}

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_signal_stops_the_worker_even_when_its_log_line_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stop is set before the signal is logged: a failing log call cannot swallow it."""

    class FailingLog:
        def info(self, *_: Any, **__: Any) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(app, "log", FailingLog())
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda *_: None)  # the handler's own error is expected here
    stop = asyncio.Event()
    app.install_signal_handlers(stop)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        loop.set_exception_handler(None)


def test_the_log_sink_drops_lines_once_its_stream_is_broken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class BrokenStream:
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    broken = BrokenStream()
    monkeypatch.setattr(sys, "stderr", broken)
    sink = logs._CurrentStderr()
    assert sink.write("one\n") == 4  # no exception: the line is dropped
    sink.flush()
    assert sink.write("two\n") == 4 and broken.writes == 1  # a null sink from then on
