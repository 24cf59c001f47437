"""The chaos soak: the proof that every job ends exactly once, whatever befalls the workers.

    uv run python -m tests.chaos_soak --jobs 200 [--seed N] [--log-dir DIR]

Real processes: a `redis-server` with AOF persistence (`appendfsync always`), the local
Ably (Sockudo), the local OpenAI server (in this process; each job asks for 20-40 tokens a
second through its metadata, so a job lasts a few seconds and faults land mid-answer) and
three `python -m worker run` processes with a 3 s heartbeat TTL, each logging JSON lines
to its own file. While the jobs are fed in (spread over six channels), a seeded schedule
of faults runs: SIGKILLs with a successor started at once (some of them within a second
of a worker's start, while its creates are in flight), one SIGSTOP past the heartbeat TTL
and then SIGCONT, one restart of `redis-server` on the same port and data, and one
SIGTERM as a deploy sends it (its successor starts at once). Three workers stay alive.

Then, once every job has finished (or a bounded wait ran out) and the workers have
stopped, each job is checked from the channel's history and from Redis: exactly one
`response` message carrying its id, closed `complete`, with exactly the answer the model
gave; its record `completed`; nothing pending, delayed or dead-lettered. The figures
(kills, stops, reclaims, fenced transitions, the longest wait from a kill until a job the
killed worker held was running again, wall time) come from the workers' logs.

`run_soak(jobs, seed)` returns a `SoakReport`; the CLI prints it and exits 1 on any
violation. The worker logs stay in the log directory the report names.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from redis.exceptions import RedisError

import worker.devstack.ably as local_ably_module
from tests.worker_harness import Stack
from worker.devstack.ably import LocalAbly
from worker.devstack.openai_local import (
    TOKENS,
    TOKENS_PER_SECOND,
    OpenAILocalServer,
    answer_text,
)
from worker.devstack.processes import server_process_options
from worker.devstack.redis_server import LocalRedis
from worker.jobs import Job
from worker.queue.redis_streams import GROUP, RedisStreamsQueue
from worker.transport.client import quiet_sdk_logs, rest_client

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# A job's task ends (in that process) with one of these; until then the process holds it.
ENDING_EVENTS = frozenset({
    "job.completed", "job.cancelled", "job.interrupted", "job.retry_scheduled",
    "job.dead_lettered", "job.abandoned", "job.fenced", "job.crashed", "job.transition_failed",
})  # fmt: skip
# Shown in the report: how the workers saw the soak.
COUNTED_EVENTS = (
    "job.received", "job.reclaimed", "job.completed", "job.interrupted", "job.retry_scheduled",
    "job.fenced", "job.abandoned", "job.error", "job.close_failed", "job.transition_failed",
    "job.dead_lettered", "job.crashed", "worker.heartbeat_lost", "worker.housekeeping_failed",
    "queue.take_failed", "worker.shutdown_overrun", "worker.started",
)  # fmt: skip
FINAL_STATES = frozenset({"completed", "dead", "cancelled"})
VERSIONS_PAGE = 100_000  # every version of a message in one read (see SoakAbly)


@dataclass(frozen=True)
class SoakConfig:
    workers: int = 3
    concurrency: int = 8
    channels: int = 6
    visibility_s: int = 3  # JOB_VISIBILITY_TIMEOUT_SECONDS: the heartbeat's TTL
    grace_s: float = 1.0  # SHUTDOWN_GRACE_SECONDS
    # A job killed again and again must not run out of attempts: the soak checks that each
    # one completes, not the dead-letter policy (JOB_MAX_ATTEMPTS defaults to 3).
    max_attempts: int = 10
    tokens: tuple[int, int] = (80, 200)  # answer length, per job: about 3-8 s each
    tokens_per_second: tuple[int, int] = (20, 40)  # model pace, per job
    kills: int | None = None  # None: max(5, jobs // 25)
    gap_s: tuple[float, float] = (0.7, 2.5)  # between faults
    burst_per_quick_kill: int = 6  # jobs held back for the worker about to be killed
    finish_timeout_s: float | None = None  # None: 60 s + 0.5 s a job
    worker_start_timeout_s: float = 60.0


# -- the report ------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    job_id: str  # "-" when it is about the run, not one job
    what: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.job_id}: {self.what}" + (f"\n      {self.detail}" if self.detail else "")


def creating(held: dict[str, str]) -> int:
    """How many held jobs are received but not yet started: their create is in flight."""
    return sum(1 for stage in held.values() if stage in ("job.received", "job.reclaimed"))


@dataclass
class KillRecord:
    at: float  # wall clock (time.time()), comparable with the logs' timestamps
    slot: str
    process: int
    held: dict[str, str]  # job id -> the last thing the process logged for it
    quick: bool = False
    age_s: float | None = None  # since the worker logged `worker.started`

    @property
    def creates_in_flight(self) -> int:
        return creating(self.held)


@dataclass
class StopRecord:
    at: float
    slot: str
    process: int
    held: dict[str, str]
    duration_s: float
    woke_at: float = 0.0
    moved: int = 0  # held jobs another worker received while it was stopped


@dataclass
class TermRecord:
    at: float
    slot: str
    process: int
    held: dict[str, str]
    exit_code: int | None = None
    exited_after_s: float | None = None


@dataclass
class SoakReport:
    seed: int
    jobs: int
    config: SoakConfig
    log_dir: Path
    wall_s: float = 0.0
    completed: int = 0
    finished_in_time: bool = False
    kills: list[KillRecord] = field(default_factory=list)
    stops: list[StopRecord] = field(default_factory=list)
    redis_restarts: list[float] = field(default_factory=list)  # seconds Redis was away
    sigterms: list[TermRecord] = field(default_factory=list)
    processes_started: int = 0
    events: Counter[str] = field(default_factory=Counter)
    held_by_killed: int = 0
    rerun_after_kill: int = 0
    longest_kill_to_rerun_s: float | None = None
    woken_events: Counter[str] = field(default_factory=Counter)  # the SIGCONT'd worker's
    attempts: Counter[str] = field(default_factory=Counter)
    history_messages: int = 0
    message_versions: int = 0
    timeline: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def reclaims(self) -> int:
        return self.events["job.reclaimed"]

    @property
    def fenced(self) -> int:
        return self.events["job.fenced"]

    def render(self) -> str:
        c = self.config
        quick = [k for k in self.kills if k.quick]
        lines = [
            f"chaos soak: {self.jobs} jobs, seed {self.seed}, {c.workers} workers x "
            f"{c.concurrency}, heartbeat TTL {c.visibility_s} s, {c.channels} channels",
            f"  wall time            {self.wall_s:.1f} s",
            f"  jobs completed       {self.completed}/{self.jobs}"
            + ("" if self.finished_in_time else "  (the wait for the end ran out)"),
            f"  kills                {len(self.kills)} ({len(quick)} within a second of a "
            f"worker's start: "
            + ", ".join(
                f"{k.age_s:.2f} s holding {len(k.held)}" for k in quick if k.age_s is not None
            )
            + f"; {sum(k.creates_in_flight for k in self.kills)} creates in flight at kills)",
            f"  stops                {len(self.stops)} ("
            + ", ".join(
                f"{s.duration_s:.1f} s holding {len(s.held)} jobs, {s.moved} taken by others"
                for s in self.stops
            )
            + ")",
            f"  redis restarts       {len(self.redis_restarts)} ("
            + ", ".join(f"away {d:.2f} s" for d in self.redis_restarts)
            + ")",
            f"  sigterms             {len(self.sigterms)} ("
            + ", ".join(
                f"holding {len(t.held)} jobs, exit {t.exit_code} after "
                + (f"{t.exited_after_s:.1f} s" if t.exited_after_s is not None else "?")
                for t in self.sigterms
            )
            + ")",
            f"  worker processes     {self.processes_started} started",
            f"  reclaims             {self.reclaims} (job.reclaimed)",
            f"  fenced refusals      {self.fenced} (job.fenced)",
            "  kill -> rerun        "
            + (
                f"longest {self.longest_kill_to_rerun_s:.1f} s"
                if self.longest_kill_to_rerun_s is not None
                else "none measured"
            )
            + f" ({self.held_by_killed} jobs held by killed workers, "
            f"{self.rerun_after_kill} received again)",
            "  attempts             "
            + ", ".join(f"{k}: {n}" for k, n in sorted(self.attempts.items())),
            f"  history messages     {self.history_messages} "
            f"({self.message_versions} versions: creates, appends and updates)",
            "  log events           "
            + ", ".join(f"{e} {self.events[e]}" for e in COUNTED_EVENTS if self.events[e]),
        ]
        if self.woken_events:
            lines.append(
                "  after SIGCONT        the woken worker logged "
                + ", ".join(f"{e} {n}" for e, n in sorted(self.woken_events.items()))
            )
        lines.append(f"  worker logs          {self.log_dir}")
        lines.append("timeline:")
        lines.extend(f"  {entry}" for entry in self.timeline)
        if self.notes:
            lines.append(f"notes ({len(self.notes)}):")
            lines.extend(f"  {note}" for note in self.notes)
        if self.violations:
            lines.append(f"VIOLATIONS ({len(self.violations)}):")
            lines.extend(f"  {v}" for v in self.violations)
        else:
            lines.append("no violations: every job ended exactly once")
        return "\n".join(lines)


# -- the jobs --------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakJob:
    job: Job
    prompt: str
    tokens: int

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def expected(self) -> str:
        return answer_text(self.prompt, self.tokens)


def make_jobs(rng: random.Random, prefix: str, count: int, config: SoakConfig) -> list[SoakJob]:
    """One prompt each, spread over the channels, each with its own length and pace."""
    channels = [f"soak-{prefix}:conversation-{n}" for n in range(config.channels)]
    made = []
    for n in range(count):
        prompt = f"Soak question {n} of run {prefix}: {rng.choice(TOPICS)}?"
        tokens = rng.randint(*config.tokens)
        pace = rng.randint(*config.tokens_per_second)
        job = Job(
            id=f"{prefix}-{n:04d}",
            channel=channels[n % len(channels)] if n < len(channels) else rng.choice(channels),
            input=prompt,
            metadata={TOKENS: str(tokens), TOKENS_PER_SECOND: str(pace)},
        )
        made.append(SoakJob(job, prompt, tokens))
    return made


TOPICS = ("tides", "bridges", "ferns", "comets", "glaciers", "lighthouses", "moss", "owls")


async def retrying(operation: Callable[[], Awaitable[T]], what: str, tries: int = 40) -> T:
    """The harness's own Redis calls ride out the Redis restart it causes."""
    for attempt in range(tries):
        try:
            return await operation()
        except (RedisError, OSError):
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.25)
    raise AssertionError(f"unreachable: {what}")


class JobFeed:
    """Enqueues the jobs: a first burst, then a steady trickle; `reserved` jobs are kept
    for the bursts the quick kills ask for (work for a worker that has just started)."""

    def __init__(self, queue: RedisStreamsQueue, jobs: list[SoakJob], reserved: int) -> None:
        self.queue = queue
        reserved = min(reserved, len(jobs))
        self.waiting: deque[SoakJob] = deque(jobs[: len(jobs) - reserved])
        self.reserve: deque[SoakJob] = deque(jobs[len(jobs) - reserved :])

    async def enqueue(self, count: int, source: deque[SoakJob] | None = None) -> int:
        source = self.waiting if source is None else source
        done = 0
        while source and done < count:
            job = source.popleft()
            # A retry after a lost reply finds the job there already: enqueue is idempotent.
            await retrying(lambda job=job: self.queue.enqueue(job.job), "enqueue")
            done += 1
        return done

    async def burst(self, count: int) -> int:
        return await self.enqueue(count, self.reserve if self.reserve else self.waiting)

    async def trickle(self, span_s: float, stop: asyncio.Event) -> None:
        """Spread what is left over `span_s`; everything at once when `stop` is set."""
        interval = span_s / max(1, len(self.waiting))
        while self.waiting and not stop.is_set():
            await self.enqueue(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        await self.enqueue(len(self.waiting))
        await self.enqueue(len(self.reserve), self.reserve)


# -- the workers' logs -----------------------------------------------------------------


def log_time(event: dict[str, Any]) -> float:
    stamp = str(event.get("timestamp", "")).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


class WorkerLog:
    """One worker process's stderr file, read as it grows: JSON events, and what it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self.other_lines: list[str] = []  # not JSON: a traceback, a cut last line
        self.holding: dict[str, str] = {}  # job id -> its latest event in this process
        self.started_at: float | None = None  # `worker.started`, wall clock
        self._offset = 0
        self._partial = b""

    def refresh(self) -> None:
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._take(line)

    def finish(self) -> None:
        """The process is gone: read the rest, including a last line a SIGKILL cut."""
        self.refresh()
        if self._partial:
            self._take(self._partial)
            self._partial = b""

    def _take(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").strip()
        if not text:
            return
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            self.other_lines.append(text)
            return
        if not isinstance(event, dict):
            self.other_lines.append(text)
            return
        self.events.append(event)
        name, job_id = event.get("event"), event.get("job_id")
        if name == "worker.started" and self.started_at is None:
            self.started_at = log_time(event)
        if not isinstance(job_id, str) or not isinstance(name, str):
            return
        if name == "job.received":
            self.holding[job_id] = name
        elif name in ENDING_EVENTS:
            self.holding.pop(job_id, None)
        elif job_id in self.holding and name.startswith("job."):
            self.holding[job_id] = name

    def tail(self, lines: int = 5) -> str:
        last = [json.dumps(e)[:300] for e in self.events[-lines:]] + self.other_lines[-lines:]
        return " | ".join(last[-lines:])


# -- the worker pool -------------------------------------------------------------------


@dataclass
class WorkerProcess:
    slot: str  # the DYNO-like name (`worker.2`): a successor takes its predecessor's
    number: int  # 1, 2, 3...: names its log file
    proc: asyncio.subprocess.Process
    log: WorkerLog
    spawned_at: float
    ended_by_us: str | None = None  # "killed", "terminated", "stopped at the end"

    def holding(self) -> dict[str, str]:
        self.log.refresh()
        return dict(self.log.holding)

    @property
    def name(self) -> str:
        return f"{self.slot} (#{self.number}, pid {self.proc.pid})"


class WorkerPool:
    """Three `python -m worker run` processes, one per slot; a crashed one is replaced."""

    MAX_CRASHES = 10

    def __init__(
        self,
        env_for: Callable[[str], dict[str, str]],
        log_dir: Path,
        report: SoakReport,
        note: Callable[[str], None],
    ) -> None:
        self.env_for = env_for
        self.log_dir = log_dir
        self.report = report
        self.note = note
        self.current: dict[str, WorkerProcess] = {}
        self.every: list[WorkerProcess] = []
        self._draining: list[asyncio.Task[None]] = []
        self._crashes = 0

    async def start(self, slot: str) -> WorkerProcess:
        number = len(self.every) + 1
        path = self.log_dir / f"worker-{number:02d}-{slot}.log"
        with path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "run", env=self.env_for(slot), cwd=REPO_ROOT,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr, **server_process_options(),
            )  # fmt: skip
        worker = WorkerProcess(slot, number, proc, WorkerLog(path), time.time())
        self.current[slot] = worker
        self.every.append(worker)
        self.report.processes_started += 1
        return worker

    async def start_all(self, count: int) -> None:
        for n in range(1, count + 1):
            await self.start(f"worker.{n}")

    async def wait_started(self, worker: WorkerProcess, timeout: float) -> bool:
        """Until the worker logs `worker.started` (False if it died or took too long)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and worker.proc.returncode is None:
            worker.log.refresh()
            if worker.log.started_at is not None:
                return True
            await asyncio.sleep(0.02)
        return False

    async def kill(self, worker: WorkerProcess) -> None:
        worker.ended_by_us = "killed"
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGKILL)
        await worker.proc.wait()

    async def terminate(self, worker: WorkerProcess, record: TermRecord) -> None:
        """SIGTERM, as a deploy sends it: the worker drains while its successor starts."""
        worker.ended_by_us = "terminated"
        worker.proc.send_signal(signal.SIGTERM)
        self._draining.append(asyncio.create_task(self._watch_drain(worker, record)))

    async def _watch_drain(self, worker: WorkerProcess, record: TermRecord) -> None:
        limit = self.report.config.grace_s + 20
        try:
            await asyncio.wait_for(worker.proc.wait(), limit)
        except TimeoutError:
            self.report.violations.append(Violation(
                "-", f"{worker.name} still running {limit:.0f} s after SIGTERM (drain hangs)",
                worker.log.tail(),
            ))  # fmt: skip
            await self.kill(worker)
            worker.ended_by_us = "terminated"
        record.exit_code = worker.proc.returncode
        record.exited_after_s = time.time() - record.at
        self.note(f"{worker.name} exited {record.exit_code} {record.exited_after_s:.1f} s after "
                  "SIGTERM")  # fmt: skip
        if record.exit_code != 0:
            self.report.violations.append(Violation(
                "-", f"{worker.name} exited with code {record.exit_code} after SIGTERM",
                worker.log.tail(),
            ))  # fmt: skip

    async def supervise(self) -> None:
        """A worker that exits on its own is a violation; a new one takes its slot."""
        try:
            while self._crashes <= self.MAX_CRASHES:
                for slot, worker in list(self.current.items()):
                    if worker.proc.returncode is None or worker.ended_by_us:
                        continue
                    await self._replace_crashed(slot, worker)
                await asyncio.sleep(0.2)
            self.report.violations.append(
                Violation("-", f"more than {self.MAX_CRASHES} crashes: no more replacements")
            )
        except Exception as exc:  # never silently: the run goes on without supervision
            self.report.violations.append(Violation("-", f"the supervisor failed: {exc!r}"))

    async def _replace_crashed(self, slot: str, worker: WorkerProcess) -> None:
        worker.ended_by_us = "crashed"
        worker.log.finish()
        self._crashes += 1
        self.report.violations.append(Violation(
            "-", f"{worker.name} exited on its own with code {worker.proc.returncode}",
            worker.log.tail(),
        ))  # fmt: skip
        replacement = await self.start(slot)
        self.note(f"{worker.name} crashed; {replacement.name} replaces it")

    async def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM every worker and wait for it; SIGKILL one that does not exit."""
        live = [w for w in self.current.values() if w.proc.returncode is None]
        for worker in live:
            worker.ended_by_us = "stopped at the end"
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGCONT)  # in case it is the stopped one
                worker.proc.send_signal(signal.SIGTERM)
        for worker in live:
            try:
                await asyncio.wait_for(worker.proc.wait(), timeout)
            except TimeoutError:
                self.report.violations.append(Violation(
                    "-", f"{worker.name} still running {timeout:.0f} s after the final SIGTERM",
                    worker.log.tail(),
                ))  # fmt: skip
                await self.kill(worker)
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)

    async def kill_all(self) -> None:
        """The last resort in `finally`: nothing outlives the soak."""
        for task in self._draining:
            task.cancel()
        for worker in self.every:
            if worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(worker.proc.wait(), 5)
        for worker in self.every:
            worker.log.finish()


# -- the faults ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str  # kill, quick_kill, stop, redis_restart, sigterm
    gap_s: float  # the pause before it
    hold_s: float = 0.0  # how long a SIGSTOP lasts


def plan_faults(rng: random.Random, kills: int, config: SoakConfig) -> list[Fault]:
    """The schedule: each quick kill right after an ordinary kill (it takes the successor
    that kill started), then one stop, one Redis restart and one SIGTERM, shuffled."""
    quick = kills // 2
    groups: list[list[str]] = [["kill", "quick_kill"]] * quick + [["kill"]] * (kills - 2 * quick)
    groups += [["stop"], ["redis_restart"], ["sigterm"]]
    rng.shuffle(groups)
    faults = []
    for group in groups:
        for n, kind in enumerate(group):
            gap = rng.uniform(*config.gap_s) if n == 0 else 0.0
            # Long enough past the TTL for the others to free slots and take its jobs.
            hold = config.visibility_s + rng.uniform(2.5, 4.5) if kind == "stop" else 0.0
            faults.append(Fault(kind, gap, hold))
    return faults


class Chaos:
    """Runs the fault schedule against the pool and Redis, recording what it did."""

    STOP_EXTRA_S = 20.0  # how much longer a stop may last, waiting for its jobs to move

    def __init__(
        self,
        pool: WorkerPool,
        redis: LocalRedis,
        feed: JobFeed,
        rng: random.Random,
        report: SoakReport,
        note: Callable[[str], None],
    ) -> None:
        self.pool, self.redis, self.feed, self.rng = pool, redis, feed, rng
        self.report, self.note = report, note
        self.successor: WorkerProcess | None = None  # started by the last kill

    async def run(self, faults: list[Fault]) -> None:
        for fault in faults:
            await asyncio.sleep(fault.gap_s)
            await getattr(self, fault.kind)(fault)

    def target(self) -> WorkerProcess:
        """A random started worker, preferring those that hold jobs right now."""
        live = [w for _, w in sorted(self.pool.current.items()) if w.proc.returncode is None]
        started = [w for w in live if w.log.started_at is not None] or live
        busy = [w for w in started if w.holding()]
        return self.rng.choice(busy or started)

    async def kill(self, _fault: Fault) -> None:
        victim = self.target()
        held = victim.holding()
        await self.pool.kill(victim)
        record = KillRecord(time.time(), victim.slot, victim.number, held)
        self.report.kills.append(record)
        self.successor = await self.pool.start(victim.slot)
        self.note(f"SIGKILL {victim.name} holding {len(held)} jobs ({record.creates_in_flight} "
                  f"creates in flight); {self.successor.name} started")  # fmt: skip

    async def quick_kill(self, _fault: Fault) -> None:
        """Kill the successor the last kill started, within a second of its start: every
        other one the moment one of its creates is in flight (a job received, not yet
        started), the others up to 0.1 s after its first job (create acked, its serial
        perhaps not yet saved)."""
        victim = self.successor
        if victim is None or not await self.pool.wait_started(victim, 30):
            self.note("quick kill skipped: the successor never started")
            return
        assert victim.log.started_at is not None
        await self.feed.burst(self.report.config.burst_per_quick_kill)  # work for it to take
        deadline = victim.log.started_at + self.rng.uniform(0.6, 0.9)
        at_once = sum(1 for k in self.report.kills if k.quick) % 2 == 0
        for _ in range(500):  # bounded: the deadline is under a second away
            held = victim.holding()
            if time.time() >= deadline or (held and not at_once) or creating(held):
                break
            await asyncio.sleep(0.002)
        if not at_once:
            await asyncio.sleep(max(0.0, min(self.rng.uniform(0.0, 0.1), deadline - time.time())))
        held = victim.holding()
        await self.pool.kill(victim)
        at = time.time()
        record = KillRecord(at, victim.slot, victim.number, held, quick=True,
                            age_s=at - victim.log.started_at)  # fmt: skip
        self.report.kills.append(record)
        self.successor = await self.pool.start(victim.slot)
        self.note(f"SIGKILL {victim.name} {record.age_s:.2f} s after its start, holding "
                  f"{len(held)} jobs ({record.creates_in_flight} creates in flight); "
                  f"{self.successor.name} started")  # fmt: skip

    async def stop(self, fault: Fault) -> None:
        """SIGSTOP past the heartbeat TTL: its jobs go to others; then wake it."""
        victim = self.target()
        held = victim.holding()
        victim.proc.send_signal(signal.SIGSTOP)
        record = StopRecord(time.time(), victim.slot, victim.number, held, fault.hold_s)
        self.report.stops.append(record)
        self.note(f"SIGSTOP {victim.name} holding {len(held)} jobs for {fault.hold_s:.1f} s")
        await asyncio.sleep(fault.hold_s)
        # Under a full load the others have no free slot to take its jobs: hold on (for a
        # while) until one has moved, so that waking it tests what a stale worker does.
        for _ in range(int(self.STOP_EXTRA_S / 0.25)):
            if not held or self.moved(victim, held, record.at):
                break
            await asyncio.sleep(0.25)
        victim.proc.send_signal(signal.SIGCONT)
        record.woke_at = time.time()
        record.duration_s = record.woke_at - record.at
        self.note(f"SIGCONT {victim.name} after {record.duration_s:.1f} s")

    def moved(self, victim: WorkerProcess, held: dict[str, str], since: float) -> bool:
        """Whether another worker has received one of `held` since `since`."""
        for worker in self.pool.every:
            if worker is victim:
                continue
            worker.log.refresh()
            for event in reversed(worker.log.events):
                if log_time(event) < since:
                    break
                if event.get("event") == "job.received" and event.get("job_id") in held:
                    return True
        return False

    async def redis_restart(self, _fault: Fault) -> None:
        began = time.monotonic()
        await self.redis.restart()
        away = time.monotonic() - began
        self.report.redis_restarts.append(away)
        self.note(f"redis-server restarted (away {away:.2f} s)")

    async def sigterm(self, _fault: Fault) -> None:
        victim = self.target()
        record = TermRecord(time.time(), victim.slot, victim.number, victim.holding())
        self.report.sigterms.append(record)
        await self.pool.terminate(victim, record)
        successor = await self.pool.start(victim.slot)
        self.note(f"SIGTERM {victim.name} holding {len(record.held)} jobs; "
                  f"{successor.name} started")  # fmt: skip


# -- the end of the run ----------------------------------------------------------------


@dataclass
class QueueState:
    records: dict[str, dict[str, str]]
    pending: list[dict[str, Any]]
    delayed: list[str]
    dead: list[tuple[str, dict[str, str]]]
    left_in_stream: list[tuple[str, dict[str, str]]]  # never delivered to any worker

    def finished(self) -> bool:
        states = [r.get("state") for r in self.records.values()]
        return (
            all(s in FINAL_STATES for s in states)
            and not self.pending
            and not self.delayed
            and not self.left_in_stream
        )


async def read_queue(queue: RedisStreamsQueue, jobs: list[SoakJob]) -> QueueState:
    async def read() -> QueueState:
        redis = queue.redis
        async with redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.hgetall(queue.record_key(job.id))
            records = await pipe.execute()
        pending = await redis.xpending_range(queue.stream, GROUP, min="-", max="+", count=1000)
        # Acknowledged entries may stay in the stream: only those after the group's last
        # delivered id were never taken.
        group = next(g for g in await redis.xinfo_groups(queue.stream) if g["name"] == GROUP)
        undelivered = await redis.xrange(
            queue.stream, min=f"({group['last-delivered-id']}", count=1000
        )
        return QueueState(
            records={job.id: dict(r or {}) for job, r in zip(jobs, records, strict=True)},
            pending=list(pending),
            delayed=list(await redis.zrange(queue.delayed, 0, -1)),
            dead=list(await redis.xrange(queue.dead, count=1000)),
            left_in_stream=list(undelivered),
        )

    return await retrying(read, "reading the queue")


async def wait_finished(
    queue: RedisStreamsQueue, jobs: list[SoakJob], timeout: float
) -> tuple[QueueState, bool]:
    """Until every job is finished and nothing is left pending, delayed or waiting."""
    deadline = time.monotonic() + timeout
    while True:
        state = await read_queue(queue, jobs)
        if state.finished():
            return state, True
        if time.monotonic() > deadline:
            return state, False
        await asyncio.sleep(0.5)


async def read_history(rest: Any, channel: str) -> list[Any]:
    """Every message in the channel's history, all pages."""
    page = await rest.channels.get(channel).history(limit=100)
    messages = list(page.items)
    for _ in range(1000):
        if not page.has_next():
            break
        page = await page.next()
        messages.extend(page.items)
    return messages


async def read_versions(rest: Any, channel: str, serial: str) -> list[Any]:
    """Every version of one message (its create, each append, each update), in order."""
    versions = rest.channels.get(channel).get_message_versions
    page = await versions(serial, params={"limit": 1000})  # Sockudo sends its page anyway
    items = list(page.items)
    for _ in range(1000):
        if not page.has_next():
            break
        page = await page.next()
        items.extend(page.items)
    if len(items) >= VERSIONS_PAGE:
        raise AssertionError(f"{len(items)} versions of {serial}: the read may be cut short")
    return sorted(items, key=lambda v: str(getattr(v.version, "serial", "") or ""))


# -- the checks ------------------------------------------------------------------------

ACTIONS = {0: "create", 1: "update", 2: "delete", 3: "meta", 4: "summary", 5: "append"}


def writes(versions: list[Any]) -> str:
    """A message's versions in short: `create streaming, 87x append, update complete`."""
    runs: list[list[Any]] = []
    for version in versions:
        action = ACTIONS.get(int(version.action), str(version.action))
        label = action if action == "append" else f"{action} {headers_of(version).get('status')}"
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    return ", ".join(label if n == 1 else f"{n}x {label}" for label, n in runs)


def check_closed_once(job_id: str, versions: list[Any]) -> list[Violation]:
    """Closed `complete` once, and nothing written after: a worker that lost the job (a
    stale one, woken after its jobs moved) must not touch the message again, even with a
    final text that happens to match."""
    closes = [i for i, v in enumerate(versions) if headers_of(v).get("status") == "complete"
              and int(v.action) == 1]  # fmt: skip
    if not closes or closes[0] == len(versions) - 1:
        return []
    after = len(versions) - closes[0] - 1
    return [Violation(
        job_id, f"{after} writes after it was closed 'complete' ({len(closes)} complete closes)",
        writes(versions),
    )]  # fmt: skip


def short_diff(expected: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
              min(len(expected), len(got)))  # fmt: skip
    hint = ""
    if got and expected.startswith(got):
        hint = " (a prefix of the answer: cut short)"
    elif got.startswith(expected):
        hint = " (the answer, then more)"
    elif expected and expected in got:
        hint = " (the answer inside other text)"
    elif expected and got.count(expected[:40]) > 1:
        hint = " (the answer's start appears twice: two attempts interleaved)"
    lo = max(0, at - 20)
    return (
        f"expected {len(expected)} chars, got {len(got)}{hint}; first difference at {at}: "
        f"expected {expected[lo : at + 40]!r}, got {got[lo : at + 40]!r}"
    )


def headers_of(message: Any) -> dict[str, Any]:
    extras = message.extras if isinstance(message.extras, dict) else {}
    headers = extras.get("headers")
    return headers if isinstance(headers, dict) else {}


def check_answers(
    jobs: list[SoakJob], history: dict[str, list[Any]], versions: dict[str, list[Any]]
) -> list[Violation]:
    """Exactly one `response` message per job, on its channel, `complete`, with its answer,
    closed once (`versions`: each message's versions by serial)."""
    by_id = {job.id: job for job in jobs}
    found: dict[str, list[tuple[str, Any]]] = {}
    violations = []
    for channel, messages in sorted(history.items()):
        for message in messages:
            response_id = headers_of(message).get("responseId")
            if message.name != "response" or response_id not in by_id:
                violations.append(Violation(
                    str(response_id or "-"), "a message that is no job's answer",
                    f"{channel}: name={message.name!r} serial={message.serial} "
                    f"data={str(message.data)[:80]!r}",
                ))  # fmt: skip
                continue
            found.setdefault(response_id, []).append((channel, message))
    for job in jobs:
        messages = found.get(job.id, [])
        if not messages:
            violations.append(Violation(job.id, "no response message", f"on {job.job.channel}"))
            continue
        if len(messages) > 1:
            described = "; ".join(
                f"{ch} serial {m.serial}: status {headers_of(m).get('status')}, "
                f"{len(str(m.data or ''))} chars, "
                f"{'the answer' if m.data == job.expected else 'not the answer'}"
                for ch, m in messages
            )
            violations.append(Violation(job.id, f"{len(messages)} response messages", described))
            continue
        [(channel, message)] = messages
        status = headers_of(message).get("status")
        text = str(message.data or "")
        if channel != job.job.channel:
            violations.append(Violation(job.id, f"answer on {channel}, not {job.job.channel}"))
        sequence = writes(versions.get(message.serial, []))
        if status != "complete":
            error = headers_of(message).get("error")
            violations.append(Violation(
                job.id, f"message closed {status!r}, not 'complete'",
                f"serial {message.serial}" + (f", error {error!r}" if error else "")
                + f"; writes: {sequence}",
            ))  # fmt: skip
        if text != job.expected:
            diff = short_diff(job.expected, text)
            violations.append(
                Violation(job.id, "text differs from the answer", f"{diff}; writes: {sequence}")
            )
        violations.extend(check_closed_once(job.id, versions.get(message.serial, [])))
    return violations


def check_queue(state: QueueState, jobs: list[SoakJob]) -> list[Violation]:
    """Each record `completed`; nothing pending, delayed, dead or left in the stream."""
    violations = []
    for job in jobs:
        record = state.records.get(job.id, {})
        if record.get("state") != "completed":
            detail = ", ".join(
                f"{k}={record[k]!r}" for k in ("attempts", "worker", "error") if k in record
            )
            violations.append(
                Violation(job.id, f"record state {record.get('state')!r}, not 'completed'", detail)
            )
    for entry in state.pending:
        violations.append(Violation(
            "-", f"entry {entry['message_id']} still pending",
            f"consumer {entry['consumer']}, delivered {entry['times_delivered']} times",
        ))  # fmt: skip
    for job_id in state.delayed:
        violations.append(Violation(job_id, "still in the delayed set (a retry waiting)"))
    for entry_id, fields in state.dead:
        violations.append(Violation(
            fields.get("job_id", "-"), "dead-lettered",
            f"entry {entry_id}: {fields.get('error', '')} (attempts {fields.get('attempts')})",
        ))  # fmt: skip
    for entry_id, fields in state.left_in_stream:
        job_id = "-"
        with contextlib.suppress(ValueError, AttributeError):
            job_id = json.loads(fields.get("job", "{}")).get("id", "-")
        violations.append(Violation(job_id, f"entry {entry_id} left in the stream, never taken"))
    return violations


def check_serials(
    jobs: list[SoakJob], state: QueueState, history: dict[str, list[Any]]
) -> list[str]:
    """A note (not a violation): the record's response serial should be the message's."""
    serials = {headers_of(m).get("responseId"): m.serial for ms in history.values() for m in ms}
    notes = []
    for job in jobs:
        recorded = state.records.get(job.id, {}).get("response_serial")
        if recorded and job.id in serials and recorded != serials[job.id]:
            notes.append(f"{job.id}: record's response_serial {recorded} is not the message's "
                         f"{serials[job.id]}")  # fmt: skip
    return notes


# -- the figures -----------------------------------------------------------------------


def figures_from_logs(pool: WorkerPool, report: SoakReport) -> None:
    """Event counts, and the longest time from a kill to a held job being received again."""
    receptions: dict[str, list[tuple[float, int]]] = {}  # job id -> (time, process)
    for worker in pool.every:
        worker.log.finish()
        for event in worker.log.events:
            report.events[str(event.get("event"))] += 1
            if event.get("event") == "job.received" and isinstance(event.get("job_id"), str):
                receptions.setdefault(event["job_id"], []).append((log_time(event), worker.number))
    longest: float | None = None
    for kill in report.kills:
        for job_id in kill.held:
            report.held_by_killed += 1
            later = [t for t, proc in receptions.get(job_id, []) if t >= kill.at and
                     proc != kill.process]  # fmt: skip
            if later:
                report.rerun_after_kill += 1
                longest = max(longest or 0.0, min(later) - kill.at)
    report.longest_kill_to_rerun_s = longest
    for stop in report.stops:
        stop.moved = sum(
            1
            for job_id in stop.held
            if any(stop.at <= t <= stop.woke_at and p != stop.process
                   for t, p in receptions.get(job_id, []))
        )  # fmt: skip
        woken = next(w for w in pool.every if w.number == stop.process)
        for event in woken.log.events:
            if log_time(event) >= stop.woke_at and event.get("job_id") in stop.held:
                report.woken_events[str(event.get("event"))] += 1


# -- the run ---------------------------------------------------------------------------


class SoakAbly(LocalAbly):
    """The local Ably, with every version of a message in one read: Sockudo's versions
    endpoint returns a single page, oldest first, of `versioned_messages.max_page_size`
    (100 by default, fewer than an answer's appends), so later writes would go unseen."""

    def start(self) -> None:
        render = local_ably_module.render_config

        def render_all_versions(*args: Any, **kwargs: Any) -> str:
            return render(*args, **kwargs).replace(
                "[versioned_messages]\n", f"[versioned_messages]\nmax_page_size = {VERSIONS_PAGE}\n"
            )

        local_ably_module.render_config = render_all_versions  # for this one start only
        try:
            super().start()
        finally:
            local_ably_module.render_config = render


async def run_soak(
    jobs: int = 200,
    seed: int | None = None,
    *,
    config: SoakConfig | None = None,
    log_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SoakReport:
    """The whole soak: services up, workers up, jobs and faults, the wait, the checks."""
    config = config or SoakConfig()
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    rng = random.Random(seed)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"chaos-soak-{seed}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    report = SoakReport(seed=seed, jobs=jobs, config=config, log_dir=log_dir)
    began = time.monotonic()

    def note(text: str) -> None:
        entry = f"+{time.monotonic() - began:6.1f} s  {text}"
        report.timeline.append(entry)
        if progress:
            progress(entry)

    note(f"seed {seed}; logs in {log_dir}")
    prefix = f"soak{uuid.uuid4().hex[:8]}"
    soak_jobs = make_jobs(rng, prefix, jobs, config)
    async with (
        LocalRedis(appendonly=True) as redis,
        SoakAbly() as local_ably,
        OpenAILocalServer(first_token_ms=200, tokens_per_second=30) as openai,
    ):
        stack = Stack(redis, local_ably, openai, prefix)
        queue = stack.queue()
        pool = WorkerPool(lambda slot: worker_env(stack, config, slot), log_dir, report, note)
        supervisor: asyncio.Task[None] | None = None
        try:
            await retrying(queue.ensure_group, "ensure_group")
            await pool.start_all(config.workers)
            for worker in list(pool.current.values()):
                if not await pool.wait_started(worker, config.worker_start_timeout_s):
                    raise RuntimeError(f"{worker.name} never started: {worker.log.tail()}")
            supervisor = asyncio.create_task(pool.supervise())
            note(f"{config.workers} workers started; enqueueing {jobs} jobs")
            await chaos_phase(pool, redis, queue, soak_jobs, rng, report, note)
            timeout = config.finish_timeout_s or 60 + 0.5 * jobs
            _, report.finished_in_time = await wait_finished(queue, soak_jobs, timeout)
            note("every job finished" if report.finished_in_time
                 else f"the wait for the end ran out after {timeout:.0f} s")  # fmt: skip
            await asyncio.sleep(2.0)  # a stale worker's late writes would land now
            supervisor.cancel()
            await pool.stop_all()
            note("workers stopped; checking")
            await check_everything(stack, queue, soak_jobs, report)
        finally:
            if supervisor is not None:
                supervisor.cancel()
                with contextlib.suppress(BaseException):
                    await supervisor
            await pool.kill_all()
            await queue.redis.aclose()
        figures_from_logs(pool, report)
    report.wall_s = time.monotonic() - began
    return report


def worker_env(stack: Stack, config: SoakConfig, slot: str) -> dict[str, str]:
    env = stack.env(
        worker_id=slot,
        worker_concurrency=config.concurrency,
        job_visibility_timeout_seconds=config.visibility_s,
        shutdown_grace_seconds=config.grace_s,
        job_max_attempts=config.max_attempts,
        job_timeout_seconds=60,
        stats_interval_seconds=5,
        log_level="INFO",
        log_format="json",
    )
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("DYNO", None)
    return env


async def chaos_phase(
    pool: WorkerPool,
    redis: LocalRedis,
    queue: RedisStreamsQueue,
    jobs: list[SoakJob],
    rng: random.Random,
    report: SoakReport,
    note: Callable[[str], None],
) -> None:
    """Feed the jobs while the faults run: a first burst that fills half the slots, the
    rest spread over the schedule's expected length, so each fault finds answers
    mid-stream."""
    config = report.config
    kills = config.kills if config.kills is not None else max(5, len(jobs) // 25)
    faults = plan_faults(rng, kills, config)
    quick = sum(1 for f in faults if f.kind == "quick_kill")
    feed = JobFeed(queue, jobs, reserved=quick * config.burst_per_quick_kill)
    await feed.enqueue(config.workers * config.concurrency // 2)
    span = sum(f.gap_s + f.hold_s for f in faults) + 2.5 * quick  # a successor's start
    note(f"{len(faults)} faults planned over about {span:.0f} s: "
         + ", ".join(f.kind for f in faults))  # fmt: skip
    schedule_done = asyncio.Event()
    trickle = asyncio.create_task(feed.trickle(span, schedule_done))
    chaos = Chaos(pool, redis, feed, rng, report, note)
    try:
        await asyncio.sleep(rng.uniform(1.0, 2.0))  # let the first answers get going
        await chaos.run(faults)
    finally:
        schedule_done.set()
        await trickle
    note("fault schedule done; all jobs enqueued")


async def check_everything(
    stack: Stack, queue: RedisStreamsQueue, jobs: list[SoakJob], report: SoakReport
) -> None:
    state = await read_queue(queue, jobs)
    rest = rest_client(stack.ably.key, stack.ably.endpoint)
    try:
        channels = sorted({job.job.channel for job in jobs})
        history = {channel: await read_history(rest, channel) for channel in channels}
        versions = {
            m.serial: await read_versions(rest, channel, m.serial)
            for channel, messages in history.items()
            for m in messages
            if m.serial
        }
    finally:
        with contextlib.suppress(Exception):
            await rest.close()
    report.history_messages = sum(len(m) for m in history.values())
    report.message_versions = sum(len(v) for v in versions.values())
    report.completed = sum(1 for r in state.records.values() if r.get("state") == "completed")
    report.attempts = Counter(r.get("attempts", "?") for r in state.records.values())
    report.violations.extend(check_answers(jobs, history, versions))
    report.violations.extend(check_queue(state, jobs))
    report.notes.extend(check_serials(jobs, state, history))


# -- the command -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="the fault schedule's seed")
    parser.add_argument("--log-dir", type=Path, default=None, help="where worker logs go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet_sdk_logs()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    print(f"chaos soak: {args.jobs} jobs, seed {seed}", flush=True)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = asyncio.run(run_soak(args.jobs, seed, log_dir=args.log_dir, progress=progress))
    print(report.render(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
