"""`WORKER_PROCESSES=2 python -m worker run`: a supervisor and its two worker processes,
on the real services, signalled and killed as Heroku (or the kernel) would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.ably_helpers import wait_for
from tests.worker_harness import Stack, start_worker_process, subscriber
from worker.devstack.openai_local import answer_text
from worker.jobs import Job
from worker.runtime import ShutdownBudget

pytestmark = pytest.mark.timeout(90)

GRACE_S = 1.0  # in-flight answers' grace after SIGTERM: the drain tests stay quick
BUDGET_S = ShutdownBudget(grace_s=GRACE_S).total_s


@dataclass
class Supervised:
    """The supervisor's process and every line it and its children wrote on stderr."""

    proc: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stderr is not None
        # EOF only once the supervisor AND every child closed the inherited pipe.
        while raw := await self.proc.stderr.readline():
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            with contextlib.suppress(json.JSONDecodeError):
                self.events.append(json.loads(line))

    def named(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name
                and all(e.get(k) == v for k, v in fields.items())]  # fmt: skip

    async def wait(self, name: str, count: int = 1, timeout: float = 30, **fields: Any) -> Any:
        await wait_for(lambda: len(self.named(name, **fields)) >= count, timeout,
                       f"{count} x {name} {fields}: {self.lines[-20:]}")  # fmt: skip
        return self.named(name, **fields)

    def child_pids(self) -> set[int]:
        return {e["pid"] for e in self.named("supervisor.child_started")}

    async def until_exit(self, timeout: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        assert self.reader is not None
        await asyncio.wait_for(self.reader, 10)  # the children's ends of the pipe closed too
        return code


@contextlib.asynccontextmanager
async def supervised(env: dict[str, str]) -> AsyncIterator[Supervised]:
    """`python -m worker run` with its stderr read live; whatever is left is killed."""
    sup = Supervised(await start_worker_process(env))
    sup.reader = asyncio.create_task(sup.read())
    try:
        yield sup
    finally:
        for pid in sup.child_pids() | {sup.proc.pid}:
            kill_if_ours(pid)
        await sup.proc.wait()
        sup.reader.cancel()


def kill_if_ours(pid: int) -> None:
    """SIGKILL a worker process this test started, if still there (never a reused pid)."""
    with contextlib.suppress(OSError):
        if alive(pid) and b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running (a zombie is not: an orphan's reaper may not have waited for it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def supervisor_env(stack: Stack, **settings: Any) -> dict[str, str]:
    return stack.env(worker_processes=2, shutdown_grace_seconds=GRACE_S, **settings)


async def live_consumers(stack: Stack) -> set[str]:
    queue = stack.queue()
    try:
        return {w["consumer"] for w in await queue.live_workers()}
    finally:
        await queue.redis.aclose()


def jobs_for(channel: str, label: str, count: int, **metadata: str) -> list[Job]:
    tag = uuid.uuid4().hex[:8]
    return [Job(channel=channel, input=f"{label} {i} {tag}", metadata=metadata)
            for i in range(count)]  # fmt: skip


async def test_two_children_answer_every_job_exactly_once(stack: Stack, channel_name: str) -> None:
    # Two slots per child and answers of ~0.6 s: six jobs must spread over both children.
    env = supervisor_env(stack, worker_concurrency=2)
    jobs = jobs_for(channel_name, "twins", 6, local_tokens_per_second="200")
    async with subscriber(stack, channel_name) as live, supervised(env) as sup:
        await sup.wait("supervisor.started", processes=2)
        started = await sup.wait("supervisor.child_started", count=2)
        await sup.wait("worker.started", count=2)
        consumers = await live_consumers(stack)
        assert len(consumers) == 2 and {e["slot"] for e in started} == {1, 2}
        await stack.enqueue(*jobs)
        records = [await stack.wait_state(job.id, "completed") for job in jobs]
        await wait_for(lambda: all(live.status(j.id) == "complete" for j in jobs), what="closed")
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.until_exit(BUDGET_S + 5) == 0
    assert [r["attempts"] for r in records] == ["1"] * 6
    assert {r["worker"] for r in records} == consumers  # both children took jobs
    history = await stack.history(channel_name)
    assert sorted(m.data for m in history) == sorted(answer_text(j.input) for j in jobs)
    for job in jobs:
        serial = live.by_response(job.id)
        assert serial is not None and live.texts[serial] == answer_text(job.input)
    assert len(sup.named("supervisor.child_started")) == 2  # nothing was restarted


async def test_one_sigterm_drains_every_child_inside_the_budget(
    stack: Stack, channel_name: str
) -> None:
    # Four 8 s answers on two children of two slots: all in flight when SIGTERM comes.
    env = supervisor_env(stack, worker_concurrency=2, openai_model="local-slow")
    jobs = jobs_for(channel_name, "drain", 4)
    async with subscriber(stack, channel_name) as live, supervised(env) as sup:
        await sup.wait("worker.started", count=2)
        await stack.enqueue(*jobs)

        def streaming() -> bool:
            return all(len(live.texts.get(live.by_response(j.id) or "", "")) > 5 for j in jobs)

        await wait_for(streaming, 20, "every answer streaming")
        owners = {(await stack.status(job.id))["worker"] for job in jobs}
        assert len(owners) == 2  # both children are streaming
        children = sup.child_pids()
        began = time.monotonic()
        sup.proc.send_signal(signal.SIGTERM)
        # Heroku sometimes sends it twice. (Sent back to back, the kernel may merge the
        # two into one: the second goes once the first is handled.)
        await sup.wait("supervisor.signal")
        sup.proc.send_signal(signal.SIGTERM)
        code = await sup.until_exit(BUDGET_S + 5)
        drain_s = time.monotonic() - began
    print(f"supervisor drain: {drain_s:.2f} s (budget {BUDGET_S:.0f} s)")
    assert code == 0 and drain_s < BUDGET_S
    assert not any(alive(pid) for pid in children)
    # The runtime's drain: past the grace, each answer is closed `interrupted` and its job
    # goes back to the queue without spending an attempt.
    for job in jobs:
        record = await stack.status(job.id)
        assert (record["state"], record["attempts"]) == ("queued", "0"), record
        assert live.status(job.id) == "interrupted"
    signals = sup.named("supervisor.signal")
    assert [(e["signal"], e["stopping"]) for e in signals] == [
        ("SIGTERM", False),
        ("SIGTERM", True),
    ]
    exited = sup.named("supervisor.child_exited")
    assert sorted(e["pid"] for e in exited) == sorted(children)
    assert all(e["status"] == 0 and e["restarting"] is False for e in exited)
    assert sum(e["interrupted"] for e in sup.named("worker.drained")) == 4
    [stopped] = sup.named("supervisor.stopped")
    assert stopped["killed"] == 0 and stopped["drain_s"] < BUDGET_S


async def test_a_killed_child_is_restarted_and_its_job_finished_by_another_once(
    stack: Stack, channel_name: str
) -> None:
    env = supervisor_env(stack, job_visibility_timeout_seconds=3)
    # Each child's worker id is then its own default, host-pid: the job record names its
    # holder's pid.
    env.pop("WORKER_ID")
    env.pop("DYNO", None)
    [job] = jobs_for(channel_name, "kill my child", 1, local_tokens_per_second="30")
    async with subscriber(stack, channel_name) as live, supervised(env) as sup:
        await sup.wait("worker.started", count=2)
        await stack.enqueue(job)
        await wait_for(lambda: len(live.texts.get(live.by_response(job.id) or "", "")) > 10,
                       20, "the answer streaming")  # fmt: skip
        holder = (await stack.status(job.id))["worker"]
        pid = int(holder.partition(":")[0].rpartition("-")[2])
        [slot] = [e["slot"] for e in sup.named("supervisor.child_started") if e["pid"] == pid]
        serial = live.by_response(job.id)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        [exited] = await sup.wait("supervisor.child_exited", pid=pid)
        assert (exited["signal"], exited["restarting"], exited["backoff_s"]) == (
            "SIGKILL",
            True,
            0.5,
        )
        await sup.wait("supervisor.child_started", slot=slot, start=2)
        record = await stack.wait_state(job.id, "completed", timeout=30)
        finished_s = time.monotonic() - killed_at
        await wait_for(lambda: live.status(job.id) == "complete", what="complete")
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.until_exit(BUDGET_S + 5) == 0
    print(f"child SIGKILL to its job completed elsewhere: {finished_s:.2f} s")
    assert record["attempts"] == "2" and record["worker"] != holder
    assert sup.named("job.reclaimed", job_id=job.id)
    assert live.by_response(job.id) == serial  # the same message, reopened
    history = await stack.history(channel_name)
    assert [(m.serial, m.data) for m in history] == [(serial, answer_text(job.input))]
    assert len(sup.named("job.completed", job_id=job.id)) == 1


async def test_children_of_a_killed_supervisor_drain_and_exit_by_themselves(
    stack: Stack,
) -> None:
    async with supervised(supervisor_env(stack)) as sup:
        await sup.wait("worker.started", count=2)
        children = sup.child_pids()
        killed_at = time.monotonic()
        sup.proc.kill()
        await wait_for(lambda: not any(alive(pid) for pid in children), 15, "orphans gone")
        gone_s = time.monotonic() - killed_at
        assert sup.reader is not None
        await asyncio.wait_for(sup.reader, 10)
    print(f"orphaned children gone {gone_s:.2f} s after the supervisor's SIGKILL")
    assert len(sup.named("worker.supervisor_gone")) == 2
    assert len(sup.named("worker.stopped")) == 2  # drained, not merely dead


async def test_a_bad_setting_or_a_failing_start_stops_the_supervisor(stack: Stack) -> None:
    async def run(env: dict[str, str]) -> tuple[int, str, float]:
        began = time.monotonic()
        proc = await start_worker_process(env)
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, stderr.decode(), time.monotonic() - began

    no_processes = {**supervisor_env(stack), "WORKER_PROCESSES": "0"}
    no_redis = {**supervisor_env(stack), "REDIS_URL": "redis://127.0.0.1:1/0"}
    (bad_code, bad_err, _), (code, err, took_s) = await asyncio.gather(
        run(no_processes), run(no_redis)
    )
    lines = bad_err.strip().splitlines()
    assert bad_code == 2 and len(lines) == 1, bad_err
    assert lines[0].startswith("error: bad configuration") and "WORKER_PROCESSES" in lines[0]

    assert code == 1 and took_s < 45, err  # a child's failed start takes seconds, loaded
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.count("supervisor.child_started") == 2  # no restart loop
    failed = [
        e for e in events if e["event"] == "supervisor.child_exited" and e.get("start_failure")
    ]
    assert failed and failed[0]["status"] == 1 and failed[0]["restarting"] is False
    assert "error: cannot reach Redis" in err
    assert names[-1] == "supervisor.stopped"
