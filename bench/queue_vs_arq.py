"""Our queue against arq 0.28, side by side on one Redis: throughput, idle pickup, crashes.

    uv run --group bench python bench/queue_vs_arq.py [--json] [--skip-crash] ...

Starts its own services on loopback (`LocalRedis`; for the crash phase also `LocalAbly`
(Sockudo) and the local OpenAI server, in this process so that its ledger counts the
model calls per prompt) and runs three phases; Redis is flushed before every run.
arq 0.28 pins redis-py below 6, so its side runs in an environment of its own: the
bench starts `uv run --isolated --no-project --with arq==0.28.0 python bench/arq_jobs.py
serve` once (`--arq-with` names another requirement), which enqueues arq jobs and reads
their results for the bench, and starts arq workers with that environment's interpreter.

1. Throughput, instant job. `--jobs` jobs (5,000) are enqueued first, then one consumer
   process drains them; jobs/s = jobs / (first take to last completion), read from the
   jobs' own timestamps (ours: the job records' `started_at`/`finished_at`; arq: its
   results' start and finish times), so the consumer's start-up does not count. Rows:
   - `ours`: the real runtime (`worker.runtime.Worker`: `--concurrency` slots (16, the
     WORKER_CONCURRENCY default), the reclaim-first take loop, heartbeat, promote and
     cancel polls, with the intervals `worker.app.serve` gives them) on the real
     `RedisStreamsQueue`; the job runner is a no-op that makes the fenced `complete` at
     once (the "instant model"). No Ably: the real `ConnectionPool` hands out null
     clients, so the cancel listener and presence cost nothing. The queue as the runtime
     drives it.
   - `ours+runner`: the same with the real `JobRunner` (its fenced `set_response_serial`
     and `owns`, its log lines), an instant model and a no-op publisher (`FakeModel`,
     `FakePublisher`: the doubles of our own seams in tests/unit/doubles.py).
   - `arq default`: arq 0.28 as shipped (`max_jobs` 10, `poll_delay` 0.5 s), an async
     no-op job function, the worker in its own process (`bench/arq_jobs.py worker`,
     which calls `arq.worker.run_worker` as the `arq` command does).
   - `arq tuned`: the same with `arq_jobs.TUNED` (`max_jobs` 200, `poll_delay` 5 ms,
     `queue_read_limit` 1000), or `--arq-tuned KEY=VALUE ...` instead.
   Both consumers log at `--log-level` (INFO, as each ships) to `--worker-log`
   (/dev/null). Each row also has the requests to Redis per job (counted in the
   consumer, by command: a pipeline or MULTI/EXEC counts once), the Redis commands per
   job (INFO commandstats: those run inside Lua scripts too), the consumer's and Redis'
   CPU per job and their share of a core (/proc), and the rest of the machine's share.
2. Idle pickup. The consumer idles 3 s (the last 2 counting the Redis commands it causes
   a second: `idle cmd/s`), then `--pickups` single jobs (50), each enqueued after a
   random pause (`--pickup-gap`, 0.1 to 0.4 s) once the previous one ran: from just
   before the enqueue call to taken (ours: the record's `started_at`, whole ms) and to
   started (the job function's first line, µs), p50/p95/max, for ours, arq default and
   arq tuned (the enqueue call's own time is shown too).
3. Crash, 10 in-flight jobs of about `--job-seconds` (3 s). Ours: the real `python -m
   worker run` (WORKER_PROCESSES=1, defaults otherwise) against the local Ably and
   OpenAI servers, each answer paced by the model to take about 3 s, one channel per job;
   arq: `slow`, which sleeps 3 s and counts each start and finish in Redis. Once all 10
   are running (ours: each record `running` with its message created and the model asked
   for its answer; arq: each function started) and `--signal-after` (1 s) more, mid-job,
   the worker gets SIGKILL or SIGTERM and a new worker is started at once. Reported:
   jobs run again (ours: taken again, or the model asked again for the prompt; arq: the
   function started again), jobs lost (not finished within `--crash-bound` s of the
   signal, 60), jobs whose side effect happened twice (ours: more than one message for
   the answer in the channel's history, or the answer seen closed `complete` more than
   once by a live subscriber; arq: the function ran to its end twice), the time from the
   signal to the last re-run job running again and to the last of the 10 finished, and
   after a SIGTERM how long the old process took to exit. Rows (`--crash-rows`):
   `ours-kill-30` and `ours-kill-5` (SIGKILL, JOB_VISIBILITY_TIMEOUT_SECONDS 30, the
   default, and 5), `ours-term-30` (SIGTERM); `arq-kill` (SIGKILL, arq's default
   job_timeout of 300 s: its in-progress key, which keeps a killed worker's jobs from
   running again, lives job_timeout + 10 s; the row stops watching once every
   unfinished job waits on a key that outlives the bound, and says when they would run
   again), `arq-kill-jt20` (job_timeout 20 s: a 30 s key, like our default visibility),
   `arq-term` (SIGTERM, defaults: arq cancels the running jobs) and `arq-term-cw20`
   (`job_completion_wait` 20 s, like our grace: arq lets them finish first). About 3
   minutes; `--skip-crash` leaves it out.

Options: `--jobs N`, `--concurrency C`, `--systems NAME...` (throughput and pickup rows:
ours, ours+runner, arq-default, arq-tuned), `--pickups N`, `--pickup-gap MIN MAX`,
`--job-seconds S`, `--signal-after S`, `--crash-bound S`, `--crash-rows NAME...`,
`--skip-throughput`, `--skip-pickup`, `--skip-crash`, `--arq-tuned KEY=VALUE...`,
`--arq-with REQUIREMENT`, `--log-level LEVEL`, `--event-loop uvloop|asyncio` (our
consumer's loop: by default the one `worker run` uses, `worker.eventloop`; arq's worker
runs on asyncio's, as the `arq` command does), `--worker-log FILE`, `--json` (one JSON
object on stdout; progress goes to stderr either way), `--quick` (a smoke test: 500
jobs, 10 pickups, no crashes).

Every wait is bounded; a default run takes about 6 minutes. Exit status 1 if a check
failed: every job completed in phases 1 and 2; the goals, ours at 2,000 jobs/s or more
and ours' idle pickup (enqueue to started) p95 within 10 ms; in every crash row of ours
nothing lost, nothing twice, every answer's text right.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from arq_jobs import (
    DONE,
    FINISHED,
    FINISHES,
    STARTED,
    STARTED_AT,
    STARTS,
    TUNED,
    count_round_trips,
)
from cpu_clock import process_cpu_s, system_busy_s  # bench/, the script's folder
from json_child import read_json_line

from worker.devstack.processes import server_process_options
from worker.devstack.redis_server import LocalRedis
from worker.jobs import Job
from worker.queue import Delivery, JobState, RedisStreamsQueue
from worker.redis_client import connect_redis

SCRIPT = str(Path(__file__).resolve())
ARQ_SCRIPT = str(Path(__file__).resolve().parent / "arq_jobs.py")
ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 30.0  # a consumer or worker getting ready
STOP_TIMEOUT_S = 35.0  # a consumer or worker draining and exiting (ours: 28 s at most)
DRAIN_TIMEOUT_S = 180.0  # the throughput phase's drain, whatever the system
PICKUP_TIMEOUT_S = 5.0  # one idle pickup
CRASH_RUNNING_TIMEOUT_S = 30.0  # all 10 jobs running
ARQ_OBSERVE_S = 10.0  # a crash row watches at least this long before trusting the keys
IDLE_S = 2.0  # idle pickup: the consumer idles this long first (Redis commands counted)
GOAL_JOBS_PER_S = 2000.0
GOAL_PICKUP_MS = 10.0
CRASH_ROWS = ("ours-kill-30", "ours-kill-5", "ours-term-30", "arq-kill", "arq-kill-jt20",
              "arq-term", "arq-term-cw20")  # fmt: skip
SYSTEMS = ("ours", "ours+runner", "arq-default", "arq-tuned")
TOKENS_PER_SECOND = 30.0  # the crash phase's model pace
ARQ_DEFAULTS: dict[str, Any] = {"max_jobs": 10, "poll_delay": 0.5, "job_timeout": 300}
ARQ_QUEUE = "arq:queue"  # arq.constants.default_queue_name
ARQ_IN_PROGRESS = "arq:in-progress:"  # arq.constants.in_progress_key_prefix
ARQ_SETUP_TIMEOUT_S = 300.0  # uv may download arq the first time


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0], "max": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 2), "p95": round(q[94], 2), "max": round(max(values), 2)}


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- our consumer (a child process) ---------------------------------------------------------


class _NullPresence:
    async def enter(self, data: Any = None) -> None: ...
    async def update(self, data: Any = None) -> None: ...
    async def leave(self, data: Any = None) -> None: ...


class _NullChannel:
    presence = _NullPresence()

    async def subscribe(self, *args: Any) -> None: ...
    def unsubscribe(self, *args: Any) -> None: ...


class _NullChannels:
    _channel = _NullChannel()

    def get(self, name: str, *args: Any) -> _NullChannel:
        return self._channel


class NullAbly:
    """An Ably client that sends nothing: the throughput phase measures the queue."""

    channels = _NullChannels()

    async def close(self) -> None: ...


class NoopRunner:
    """The runner seam, instant: the fenced `complete` at once, with the time the job
    started (µs) among its figures; with `notify`, the job id is then pushed on
    `bench:done` (the idle pickup phase waits on it)."""

    def __init__(self, queue: RedisStreamsQueue, notify: bool) -> None:
        self.queue = queue
        self.notify = notify

    async def run(self, delivery: Delivery, lease: Any, control: Any = None) -> None:
        started_us = time.time_ns() // 1000
        figures = {"bench_started_us": started_us}
        await self.queue.complete(delivery, JobState.COMPLETED, figures)
        if self.notify:
            await self.queue.redis.rpush(DONE, delivery.job_id)


async def child_ours(spec: dict[str, Any]) -> None:
    """`--child-ours SPEC`: the runtime on the real queue until SIGTERM; prints
    `{"ready": ...}` once started and `{"round_trips": ...}` when it has stopped."""
    from worker.app import consumer_name
    from worker.job_runner import JobRunner
    from worker.logs import configure_logging
    from worker.runtime import RuntimeOptions, Worker
    from worker.transport.client import quiet_sdk_logs
    from worker.transport.pool import ConnectionPool

    counts = count_round_trips()
    configure_logging("json", spec["log_level"])
    quiet_sdk_logs()
    visibility = 30
    queue = RedisStreamsQueue(
        connect_redis(spec["redis_url"]),
        prefix=spec["prefix"],
        consumer=consumer_name("bench-ours"),
        heartbeat_ttl_s=visibility,
    )
    scripts = {
        getattr(queue, name).sha[:8]: name.lstrip("_")
        for name in vars(queue)
        if hasattr(getattr(queue, name), "sha")
    }
    runner: Any
    if spec["mode"] == "runner":
        sys.path.append(str(ROOT))  # the doubles of our own seams live in tests/
        from tests.unit.doubles import FakeModel, FakePublisher, answer

        def publisher(job: Job, delivery: Delivery, lease: Any, alive: Any) -> Any:
            return FakePublisher().make(job, delivery, lease, alive)

        model: Any = FakeModel(*answer("ok"))
        runner = JobRunner(queue, model, timeout_s=300, make_publisher=publisher)
    else:
        runner = NoopRunner(queue, notify=spec.get("notify", False))
    concurrency = spec["concurrency"]
    pool = ConnectionPool(
        NullAbly, concurrency=concurrency, streams_per_connection=4,
        messages_per_second=44.0, rollup_window_s=0.04,
    )  # fmt: skip
    options = RuntimeOptions(  # as worker.app.serve sets them up, with the defaults
        concurrency=concurrency,
        worker_id="bench-ours",
        presence_channel="agents",
        heartbeat_interval_s=visibility / 3,
        reclaim_interval_s=min(1.0, visibility / 3),
    )
    worker = Worker(queue, runner, pool, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emit({"ready": True, "pid": os.getpid()})
    try:
        await worker.run(stop)
    finally:
        await pool.close()
        await queue.redis.aclose()
        named: Counter[str] = Counter()
        for name, n in counts.items():
            if name.startswith("EVALSHA "):
                name = f"EVALSHA {scripts.get(name.split()[1], name.split()[1])}"
            named[name] += n
        emit({"round_trips": dict(named)})


# --- consumer processes -----------------------------------------------------------------------


class Consumer:
    """A consumer process that prints JSON lines on stdout (ours or arq's)."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.ready_cpu_s = 0.0

    @classmethod
    async def start(cls, argv: list[str], name: str, log: Any, wait_ready: bool = True) -> Consumer:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=log, **server_process_options()
        )
        consumer = cls(proc, name)
        if wait_ready:
            try:
                line = await consumer.read(START_TIMEOUT_S)
            except BaseException:
                await consumer.kill()
                raise
            if not line.get("ready"):
                await consumer.kill()
                raise RuntimeError(f"{name}: unexpected first line {line}")
        consumer.ready_cpu_s = process_cpu_s(proc.pid)
        return consumer

    async def read(self, timeout: float) -> dict[str, Any]:
        return await read_json_line(self.proc, self.name, timeout)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        """SIGTERM, then its last JSON line (round trips) once it has exited."""
        last: dict[str, Any] = {}
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                assert self.proc.stdout is not None
                while line := await self.proc.stdout.readline():
                    with contextlib.suppress(ValueError):
                        last = json.loads(line)
                await self.proc.wait()
        except TimeoutError:
            await self.kill()
        return last

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


class ArqSide:
    """arq's environment (`uv run --isolated --no-project --with arq==0.28.0`, kept alive
    by `arq_jobs.py serve`, which is also the producer); workers run on its interpreter."""

    def __init__(self, proc: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self.proc = proc
        self.python: str = ready["python"]
        self.versions: dict[str, str] = ready.get("versions", {})
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, requirement: str) -> ArqSide:
        uv = os.environ.get("UV") or shutil.which("uv") or "uv"
        proc = await asyncio.create_subprocess_exec(
            uv, "run", "--isolated", "--no-project", "--with", requirement, "python",
            ARQ_SCRIPT, "serve", cwd=str(ROOT), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, **server_process_options(),
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ARQ_SETUP_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            raise
        if not line:
            raise RuntimeError(f"arq's environment did not start ({await proc.wait()})")
        return cls(proc, json.loads(line))

    async def call(self, timeout: float = DRAIN_TIMEOUT_S, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(json.dumps(command).encode() + b"\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"arq's producer exited ({await self.proc.wait()})")
        answer = dict(json.loads(line))
        if "error" in answer:
            raise RuntimeError(f"arq's producer: {answer['error']}")
        return answer

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def ours_argv(env: Env, prefix: str, **spec: Any) -> list[str]:
    args = env.args
    spec = {"redis_url": env.redis.url, "prefix": prefix, "concurrency": args.concurrency,
            "log_level": args.log_level, "mode": "queue", "event_loop": args.event_loop,
            **spec}  # fmt: skip
    return [sys.executable, SCRIPT, "--child-ours", json.dumps(spec)]


def arq_argv(env: Env, profile: str, **extra: Any) -> list[str]:
    # "tuned" is arq's defaults with --set for each tuned setting.
    args = env.args
    argv = [env.arq.python, ARQ_SCRIPT, "worker", "--redis-url", env.redis.url,
            "--profile", "default", "--log-level", args.log_level]  # fmt: skip
    if profile == "tuned":
        for key, value in args.arq_tuned_settings.items():
            argv += ["--set", f"{key}={json.dumps(value)}"]
    if extra.get("job_timeout") is not None:
        argv += ["--job-timeout", str(extra["job_timeout"])]
    if extra.get("completion_wait") is not None:
        argv += ["--set", f"job_completion_wait={int(extra['completion_wait'])}"]
    return argv


# --- phase 1: throughput --------------------------------------------------------------------


@dataclass
class Env:
    redis: LocalRedis
    args: argparse.Namespace
    log: Any  # where consumers' stderr goes
    arq: ArqSide

    def client(self) -> Any:
        return connect_redis(self.redis.url)


async def flush(redis: Any) -> None:
    await redis.flushall()
    await redis.config_resetstat()


async def gather_chunked(calls: list[Callable[[], Awaitable[Any]]], chunk: int = 50) -> list[Any]:
    results: list[Any] = []
    for i in range(0, len(calls), chunk):
        results += await asyncio.gather(*(c() for c in calls[i : i + chunk]))
    return results


async def commandstats(redis: Any) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def wait_zero(measure: Callable[[], Awaitable[int]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await measure() == 0:
            return True
        await asyncio.sleep(0.02)
    return False


@dataclass
class Drain:
    """What the bench saw while one consumer drained the queue."""

    consumer_cpu_s: float
    redis_cpu_s: float
    busy_s: float  # the whole machine
    wall_s: float
    commands: int
    round_trips: dict[str, int]
    drained: bool


async def drain(
    env: Env,
    redis: Any,
    consumer_argv: list[str],
    name: str,
    remaining: Callable[[], Awaitable[int]],
) -> Drain:
    redis_pid = env.redis.pid
    await redis.config_resetstat()
    consumer = await Consumer.start(consumer_argv, name, env.log)
    start_cpu, start_redis = consumer.ready_cpu_s, process_cpu_s(redis_pid)
    start_busy, start_wall = system_busy_s(), time.monotonic()
    try:
        drained = await wait_zero(remaining, DRAIN_TIMEOUT_S)
        end_cpu, end_redis = process_cpu_s(consumer.proc.pid), process_cpu_s(redis_pid)
        end_busy, end_wall = system_busy_s(), time.monotonic()
        commands = await commandstats(redis)
    finally:
        last = await consumer.stop()
    return Drain(
        consumer_cpu_s=end_cpu - start_cpu,
        redis_cpu_s=end_redis - start_redis,
        busy_s=end_busy - start_busy,
        wall_s=end_wall - start_wall,
        commands=commands,
        round_trips=last.get("round_trips", {}),
        drained=drained,
    )


def throughput_row(
    name: str, concurrency: int, n: int, done: int, first: float, last: float, d: Drain
) -> dict[str, Any]:
    span = max(last - first, 1e-6)
    trips = sum(d.round_trips.values())
    per_job = {k: round(v / n, 2) for k, v in sorted(d.round_trips.items(), key=lambda kv: -kv[1])}
    return {
        "system": name,
        "concurrency": concurrency,
        "jobs": n,
        "completed": done,
        "span_s": round(span, 3),
        "jobs_per_s": round(n / span, 1),
        "round_trips_per_job": round(trips / n, 2),
        "round_trips_by_command_per_job": {k: v for k, v in per_job.items() if v >= 0.01},
        "redis_commands_per_job": round(d.commands / n, 2),
        "consumer_cpu_us_per_job": round(d.consumer_cpu_s / n * 1e6),
        "redis_cpu_us_per_job": round(d.redis_cpu_s / n * 1e6),
        "consumer_pct_of_core": round(100 * d.consumer_cpu_s / d.wall_s),
        "redis_pct_of_core": round(100 * d.redis_cpu_s / d.wall_s),
        "rest_pct_of_core": round(
            100 * max(0.0, d.busy_s - d.consumer_cpu_s - d.redis_cpu_s) / d.wall_s
        ),
        "drained": d.drained,
    }


async def throughput_ours(env: Env, mode: str) -> dict[str, Any]:
    n, redis = env.args.jobs, env.client()
    prefix = "bench"
    queue = RedisStreamsQueue(redis, prefix=prefix, consumer="bench-producer")
    try:
        await flush(redis)
        await queue.ensure_group()
        jobs = [Job(id=f"t{i}", channel="bench:throughput", input="x") for i in range(n)]
        await gather_chunked([functools.partial(queue.enqueue, j) for j in jobs])
        d = await drain(
            env, redis, ours_argv(env, prefix, mode=mode),
            f"ours ({mode})", lambda: redis.xlen(queue.stream),
        )  # fmt: skip
        async with redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.hmget(queue.record_key(job.id), "state", "started_at", "finished_at")
            records = await pipe.execute()
        done = [r for r in records if r[0] == "completed"]
        first = min((int(r[1]) for r in done), default=0) / 1000
        last = max((int(r[2]) for r in done), default=0) / 1000
        name = "ours" if mode == "queue" else "ours+runner"
        return throughput_row(name, env.args.concurrency, n, len(done), first, last, d)
    finally:
        await redis.aclose()


async def throughput_arq(env: Env, profile: str) -> dict[str, Any]:
    n, redis = env.args.jobs, env.client()
    try:
        await flush(redis)
        ids = [f"t{i}" for i in range(n)]
        await env.arq.call(op="enqueue", redis_url=env.redis.url, function="noop", ids=ids)
        d = await drain(
            env, redis, arq_argv(env, profile), f"arq ({profile})", lambda: redis.zcard(ARQ_QUEUE)
        )
        results = await env.arq.call(op="results", redis_url=env.redis.url, ids=ids)
        first, last = results["first_start"] or 0.0, results["last_finish"] or 0.0
        concurrency = arq_setting(env.args, profile, "max_jobs")
        return throughput_row(
            f"arq {profile}", concurrency, n, results["succeeded"], first, last, d
        )
    finally:
        await redis.aclose()


def arq_setting(args: argparse.Namespace, profile: str, key: str) -> Any:
    if profile == "tuned" and key in args.arq_tuned_settings:
        return args.arq_tuned_settings[key]
    return ARQ_DEFAULTS[key]


# --- phase 2: idle pickup ---------------------------------------------------------------------


async def pickups(
    env: Env,
    enqueue: Callable[[str], Awaitable[tuple[float, float]]],
    started: Callable[[str], Awaitable[tuple[float | None, float | None]]],
    redis: Any,
) -> dict[str, Any]:
    """Enqueue one job at a time into an idle consumer: `enqueue` says when it began the
    enqueue call (epoch s) and how long the call took (ms); `started` when the job was
    taken and when it started (epoch s, None if unknown)."""
    a = env.args
    taken_ms: list[float] = []
    started_ms: list[float] = []
    call_ms: list[float] = []
    missing = 0
    await asyncio.sleep(1.0)  # settled
    await redis.config_resetstat()
    idle_from = time.monotonic()
    await asyncio.sleep(IDLE_S)  # idle: what the consumer asks of Redis meanwhile
    idle_commands = await commandstats(redis)
    idle_rate = idle_commands / (time.monotonic() - idle_from)
    for i in range(a.pickups):
        await asyncio.sleep(random.uniform(*a.pickup_gap))
        job_id = f"p{i}-{uuid.uuid4().hex[:6]}"
        t0, call = await enqueue(job_id)
        call_ms.append(call)
        if await redis.blpop([DONE], timeout=PICKUP_TIMEOUT_S) is None:
            missing += 1
            continue
        taken, start = await started(job_id)
        if taken is not None:
            taken_ms.append((taken - t0) * 1000)
        if start is not None:
            started_ms.append((start - t0) * 1000)
    return {
        "pickups": a.pickups,
        "missing": missing,
        "taken_ms": percentiles(taken_ms),
        "started_ms": percentiles(started_ms),
        "enqueue_call_ms": percentiles(call_ms),
        "idle_redis_commands_per_s": round(idle_rate, 1),
    }


async def pickup_ours(env: Env) -> dict[str, Any]:
    redis = env.client()
    queue = RedisStreamsQueue(redis, prefix="bench", consumer="bench-producer")
    try:
        await flush(redis)
        await queue.ensure_group()
        consumer = await Consumer.start(ours_argv(env, "bench", notify=True), "ours", env.log)
        try:

            async def enqueue(job_id: str) -> tuple[float, float]:
                t0 = time.time()
                await queue.enqueue(Job(id=job_id, channel="bench:pickup", input="x"))
                return t0, (time.time() - t0) * 1000

            async def started(job_id: str) -> tuple[float | None, float | None]:
                record = await queue.status(job_id) or {}
                taken = int(record["started_at"]) / 1000 if "started_at" in record else None
                us = record.get("bench_started_us")
                return taken, (int(us) / 1e6 if us else None)

            row = await pickups(env, enqueue, started, redis)
        finally:
            await consumer.stop()
        return {"system": "ours", **row}
    finally:
        await redis.aclose()


async def pickup_arq(env: Env, profile: str) -> dict[str, Any]:
    redis = env.client()
    try:
        await flush(redis)
        consumer = await Consumer.start(arq_argv(env, profile), "arq", env.log)
        try:

            async def enqueue(job_id: str) -> tuple[float, float]:
                sent = await env.arq.call(
                    op="enqueue", redis_url=env.redis.url, function="stamp", ids=[job_id]
                )
                return float(sent["t0"]), float(sent["call_ms"])

            async def started(job_id: str) -> tuple[float | None, float | None]:
                value = await redis.get(STARTED + job_id)
                return None, (float(value) if value else None)

            row = await pickups(env, enqueue, started, redis)
        finally:
            await consumer.stop()
        return {"system": f"arq {profile}", **row}
    finally:
        await redis.aclose()


# --- phase 3: crashes -------------------------------------------------------------------------


@dataclass
class CrashStack:
    """The local Ably and OpenAI servers, for our worker's crash rows."""

    ably: Any
    model: Any  # worker.devstack.openai_local.OpenAILocalServer, in this process


@dataclass
class LiveView:
    """A live subscriber's view: how often each answer was seen closed `complete`."""

    statuses: dict[str, list[str]] = field(default_factory=dict)  # per message serial
    response_of: dict[str, str] = field(default_factory=dict)  # serial -> responseId

    def on_message(self, message: Any) -> None:
        headers = (message.extras or {}).get("headers") or {}
        status, rid = headers.get("status"), headers.get("responseId")
        if not status or not rid:
            return
        serial = str(message.serial)
        self.response_of[serial] = rid
        seen = self.statuses.setdefault(serial, [])
        if not seen or seen[-1] != status:
            seen.append(status)

    def completes(self, response_id: str) -> int:
        return sum(
            seen.count("complete")
            for serial, seen in self.statuses.items()
            if self.response_of.get(serial) == response_id
        )


def crash_tokens(seconds: float) -> int:
    return max(10, round(seconds * TOKENS_PER_SECOND))


def worker_env(env: Env, crash: CrashStack, prefix: str, visibility: int) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": env.redis.url,
        "QUEUE_PREFIX": prefix,
        "ABLY_API_KEY": crash.ably.key,
        "ABLY_ENDPOINT": crash.ably.endpoint,
        "OPENAI_API_KEY": crash.model.api_key,
        "OPENAI_BASE_URL": crash.model.base_url,
        "OPENAI_MODEL": "local",
        "WORKER_ID": "bench-crash.1",  # a restarted dyno keeps its name
        "WORKER_PROCESSES": "1",
        "PRESENCE_CHANNEL": f"agents:{prefix}",
        "JOB_VISIBILITY_TIMEOUT_SECONDS": str(visibility),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),
    }


async def start_worker(env: Env, worker_env_: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=worker_env_, cwd=str(ROOT),
        stdout=asyncio.subprocess.DEVNULL, stderr=env.log, **server_process_options(),
    )  # fmt: skip


async def end_process(proc: asyncio.subprocess.Process, timeout: float = STOP_TIMEOUT_S) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def timed_exit(proc: asyncio.subprocess.Process, since: float) -> float | None:
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S + 5)
    except TimeoutError:
        return None
    return time.monotonic() - since


async def crash_ours(
    env: Env, crash: CrashStack, sig: signal.Signals, visibility: int
) -> dict[str, Any]:
    from worker.devstack.openai_local.text import answer_text
    from worker.transport.client import realtime_client, rest_client

    a = env.args
    prefix = f"crash{uuid.uuid4().hex[:6]}"
    redis = env.client()
    queue = RedisStreamsQueue(redis, prefix=prefix, consumer="bench-producer")
    tokens = crash_tokens(a.job_seconds)
    meta = {"local_tokens": str(tokens), "local_tokens_per_second": str(TOKENS_PER_SECOND),
            "local_first_token_ms": "0"}  # fmt: skip
    tag = uuid.uuid4().hex[:6]
    jobs = [Job(channel=f"crash:{tag}-{i}", input=f"crash {tag} {i}", metadata=meta)
            for i in range(10)]  # fmt: skip
    view = LiveView()
    subscriber = realtime_client(crash.ably.key, crash.ably.endpoint)
    procs: list[asyncio.subprocess.Process] = []
    row: dict[str, Any] = {"system": "ours", "signal": sig.name,
                           "knob": f"visibility {visibility} s"}  # fmt: skip
    try:
        await flush(redis)
        crash.model.reset()
        async with asyncio.timeout(START_TIMEOUT_S):
            await asyncio.gather(
                *(subscriber.channels.get(j.channel).subscribe(view.on_message) for j in jobs)
            )
        wenv = worker_env(env, crash, prefix, visibility)
        procs.append(await start_worker(env, wenv))
        await queue.ensure_group()
        for job in jobs:
            await queue.enqueue(job)

        # Running: each record `running` with its message created, and the model asked
        # (the local server's ledger) for every prompt.
        def asked(record: dict[str, str], job: Job) -> bool:
            return running_with_message(record) and crash.model.attempts(str(job.input)) > 0

        running = wait_records(queue, jobs, asked, CRASH_RUNNING_TIMEOUT_S)
        if not await until_exit(running, procs[0]):
            raise RuntimeError(
                f"the 10 jobs never all ran at once within {CRASH_RUNNING_TIMEOUT_S:g} s"
                + (f" (the worker exited: {procs[0].returncode}; see --worker-log)"
                   if procs[0].returncode is not None else "")
            )  # fmt: skip
        await asyncio.sleep(a.signal_after)  # mid-answer
        signalled, signalled_wall = time.monotonic(), time.time()
        procs[0].send_signal(sig)
        procs.append(await start_worker(env, wenv))  # the successor, at once
        exit_task = asyncio.create_task(timed_exit(procs[0], signalled))
        bound = a.crash_bound - (time.monotonic() - signalled)
        await wait_records(queue, jobs, lambda r, _job: finished(r), bound)
        records = [await queue.status(j.id) or {} for j in jobs]
        exit_s = await exit_task
        await asyncio.sleep(0.5)  # the last closing updates reach the subscriber
        rest = rest_client(crash.ably.key, crash.ably.endpoint)
        histories = [list((await rest.channels.get(j.channel).history()).items) for j in jobs]
        with contextlib.suppress(Exception):
            await rest.close()
    finally:
        for proc in procs:
            await end_process(proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(subscriber.close(), 10)
        await redis.aclose()
    done = [r for r in records if r.get("state") == "completed"]
    model_calls = [crash.model.attempts(str(j.input)) for j in jobs]
    messages = [
        [m for m in h if ((m.extras or {}).get("headers") or {}).get("responseId") == j.id]
        for j, h in zip(jobs, histories, strict=True)
    ]
    text_ok = sum(
        len(ms) == 1 and ms[0].data == answer_text(str(j.input), tokens)
        and ms[0].extras["headers"].get("status") == "complete"
        for j, ms in zip(jobs, messages, strict=True)
    )  # fmt: skip
    twice = sum(
        len(ms) > 1 or view.completes(j.id) > 1 for j, ms in zip(jobs, messages, strict=True)
    )
    finished_at = [int(r["finished_at"]) / 1000 for r in done]
    # A retaken job's record says when its last attempt was taken.
    again = [int(r["started_at"]) / 1000 for r in records if int(r.get("attempts", 0)) > 1]
    row.update(
        # Taken again (attempt 2), or the model asked again (a requeue keeps the attempt).
        rerun=sum(
            int(r.get("attempts", 0)) > 1 or c > 1
            for r, c in zip(records, model_calls, strict=True)
        ),
        running_again_s=round(max(again) - signalled_wall, 1) if again else None,
        lost=10 - len(done),
        twice=twice,
        recovered_s=round(max(finished_at) - signalled_wall, 1) if len(done) == 10 else None,
        exit_s=round(exit_s, 1) if exit_s is not None and sig == signal.SIGTERM else None,
        attempts=sorted(int(r.get("attempts", 0)) for r in records),
        model_calls=sorted(model_calls),
        text_ok=text_ok,
        complete_closes_seen=sorted(view.completes(j.id) for j in jobs),
        bound_s=a.crash_bound,
        note="",
    )
    return row


async def until_exit(wait: Awaitable[bool], proc: asyncio.subprocess.Process) -> bool:
    """`wait`'s answer, or False as soon as `proc` exits."""
    waiting = asyncio.ensure_future(wait)
    exited = asyncio.ensure_future(proc.wait())
    await asyncio.wait({waiting, exited}, return_when=asyncio.FIRST_COMPLETED)
    exited.cancel()
    if not waiting.done():
        waiting.cancel()
        return False
    return waiting.result()


def running_with_message(record: dict[str, str]) -> bool:
    return record.get("state") == "running" and bool(record.get("response_serial"))


def finished(record: dict[str, str]) -> bool:
    return record.get("state") in ("completed", "dead", "cancelled")


async def wait_records(
    queue: RedisStreamsQueue,
    jobs: list[Job],
    test: Callable[[dict[str, str], Job], bool],
    timeout: float,
) -> bool:
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        records = [await queue.status(j.id) or {} for j in jobs]
        if all(test(r, j) for r, j in zip(records, jobs, strict=True)):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)


async def crash_arq(
    env: Env, sig: signal.Signals, job_timeout: float | None, completion_wait: float | None
) -> dict[str, Any]:
    a = env.args
    redis = env.client()
    ids = [f"crash-{i}" for i in range(10)]
    if completion_wait is not None:
        knob = f"job_completion_wait {completion_wait:g} s"
    else:
        timeout_s = job_timeout if job_timeout is not None else ARQ_DEFAULTS["job_timeout"]
        knob = f"job_timeout {timeout_s:g} s" + (" (default)" if job_timeout is None else "")
    row: dict[str, Any] = {"system": "arq", "signal": sig.name, "knob": knob}
    argv = arq_argv(env, "default", job_timeout=job_timeout, completion_wait=completion_wait)
    consumers: list[Consumer] = []
    note = ""
    try:
        await flush(redis)
        consumers.append(await Consumer.start(argv, "arq", env.log))
        await env.arq.call(op="enqueue", redis_url=env.redis.url, function="slow", ids=ids,
                           args=[a.job_seconds])  # fmt: skip

        async def counts(prefix: str) -> list[int]:
            return [int(v or 0) for v in await redis.mget(*(prefix + i for i in ids))]

        deadline = time.monotonic() + CRASH_RUNNING_TIMEOUT_S
        while min(await counts(STARTS)) < 1:
            if time.monotonic() > deadline or consumers[0].proc.returncode is not None:
                raise RuntimeError(
                    f"the 10 jobs never all ran at once (worker exit code "
                    f"{consumers[0].proc.returncode}; see --worker-log)"
                )
            await asyncio.sleep(0.05)
        await asyncio.sleep(a.signal_after)  # mid-job
        signalled, signalled_wall = time.monotonic(), time.time()
        consumers[0].proc.send_signal(sig)
        successor = await Consumer.start(argv, "arq successor", env.log, wait_ready=False)
        consumers.append(successor)
        exit_task = asyncio.create_task(timed_exit(consumers[0].proc, signalled))
        key_ttls = [int(await redis.pttl(ARQ_IN_PROGRESS + i)) for i in ids]
        starts_then = await counts(STARTS)
        end = signalled + a.crash_bound
        while time.monotonic() < end:
            finishes = await counts(FINISHES)
            if min(finishes) >= 1:
                break
            if time.monotonic() - signalled >= ARQ_OBSERVE_S:
                # A job not started again cannot start before its in-progress key
                # expires: stop watching when every unfinished job is one of those and its
                # key outlives the bound.
                starts = await counts(STARTS)
                left_ms = (end - time.monotonic()) * 1000
                rows = zip(ids, finishes, starts_then, starts, strict=True)
                waiting = [i for i, f, s0, s1 in rows if f < 1 and s1 == s0]
                ttls = [int(await redis.pttl(ARQ_IN_PROGRESS + i)) for i in waiting]
                if len(waiting) == sum(f < 1 for f in finishes) and ttls and min(ttls) > left_ms:
                    since = time.monotonic() - signalled
                    note = (
                        f"stopped watching {since:.0f} s after the kill: the in-progress keys "
                        f"of the {len(ttls)} unfinished jobs expire {min(ttls) / 1000:.0f} s "
                        f"later, {since + min(ttls) / 1000:.0f} s after it, when they run again"
                    )
                    break
            await asyncio.sleep(0.1)
        starts, finishes = await counts(STARTS), await counts(FINISHES)
        finish_times = [await redis.zscore(FINISHED, i) for i in ids]
        start_times = [await redis.zscore(STARTED_AT, i) for i in ids]
        exit_s = await exit_task
    finally:
        for consumer in consumers:
            await consumer.stop()
        await redis.aclose()
    done = [t for t in finish_times if t is not None]
    again = [t for t, n in zip(start_times, starts, strict=True) if t is not None and n > 1]
    row.update(
        rerun=sum(s > 1 for s in starts),
        running_again_s=round(max(again) - signalled_wall, 1) if again else None,
        lost=sum(f < 1 for f in finishes),
        twice=sum(f > 1 for f in finishes),
        recovered_s=round(max(done) - signalled_wall, 1) if len(done) == 10 else None,
        exit_s=round(exit_s, 1) if exit_s is not None and sig == signal.SIGTERM else None,
        starts=sorted(starts),
        finishes=sorted(finishes),
        # PTTL: -2 once the key is gone (SIGTERM: arq deletes it as it re-queues the job).
        in_progress_ttl_s_at_signal=[round(t / 1000, 1) if t >= 0 else None for t in key_ttls],
        bound_s=a.crash_bound,
        note=note,
    )
    return row


async def crash_phase(
    env: Env, rows: list[str], progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    from worker.devstack.ably import LocalAbly
    from worker.devstack.openai_local import OpenAILocalServer
    from worker.transport.client import quiet_sdk_logs

    quiet_sdk_logs()
    out: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        crash: CrashStack | None = None
        if any(r.startswith("ours") for r in rows):
            ably = await stack.enter_async_context(LocalAbly())
            model = await stack.enter_async_context(OpenAILocalServer(port=0))
            crash = CrashStack(ably, model)
        for name in rows:
            progress(f"... crash: {name}")
            system, kind, *rest = name.split("-")
            sig = signal.SIGKILL if kind == "kill" else signal.SIGTERM
            started = time.monotonic()
            try:
                if system == "ours":
                    assert crash is not None
                    row = await crash_ours(env, crash, sig, int(rest[0]) if rest else 30)
                else:
                    # "jt20": job_timeout 20 s; "cw20": job_completion_wait 20 s
                    knobs = {r[:2]: float(r[2:]) for r in rest}
                    row = await crash_arq(env, sig, knobs.get("jt"), knobs.get("cw"))
            except Exception as exc:  # one row's failure is reported; the others still run
                progress(f"... crash: {name} failed: {exc}")
                row = {"system": system, "signal": sig.name, "knob": "", "error": str(exc)}
            row["row"] = name
            row["row_wall_s"] = round(time.monotonic() - started, 1)
            out.append(row)
    return out


# --- report -----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _p(p: dict[str, float | None]) -> str:
    return f"{_f(p['p50'])}/{_f(p['p95'])}/{_f(p['max'])}"


def print_report(report: dict[str, Any]) -> None:
    m = report["meta"]
    print(
        f"\nour queue against arq {m['arq']} on one Redis {m['redis']} (redis-py {m['redis_py']}), "
        f"{m['cpus']} CPUs, load average at start {m['loadavg']}\n"
        f"arq tuned: {m['arq_tuned']}; consumers log at {m['log_level']}; our consumer on "
        f"{m['ours_event_loop']}, arq's on asyncio (as each runs)"
    )
    rows = report["throughput"]
    if rows:
        print(f"\nthroughput: {rows[0]['jobs']} instant jobs enqueued first, one consumer process")
        print(
            f"{'system':<12} {'conc':>4} {'done':>5} {'jobs/s':>7} {'x arq':>6} {'x tuned':>7} "
            f"{'req/job':>7} {'cmd/job':>7} {'cpu µs':>6} {'redis µs':>8} {'cons%':>5} "
            f"{'redis%':>6} {'rest%':>5}"
        )
        for r in rows:
            vs = r.get("vs", {})
            print(
                f"{r['system']:<12} {r['concurrency']:>4} {r['completed']:>5} "
                f"{r['jobs_per_s']:>7.0f} {_f(vs.get('arq default'), 2):>6} "
                f"{_f(vs.get('arq tuned'), 2):>7} {r['round_trips_per_job']:>7.2f} "
                f"{r['redis_commands_per_job']:>7.1f} {r['consumer_cpu_us_per_job']:>6} "
                f"{r['redis_cpu_us_per_job']:>8} {r['consumer_pct_of_core']:>5} "
                f"{r['redis_pct_of_core']:>6} {r['rest_pct_of_core']:>5}"
            )
        print("requests to Redis per job, by command:")
        for r in rows:
            parts = ", ".join(f"{k} {v:g}" for k, v in r["round_trips_by_command_per_job"].items())
            print(f"  {r['system']:<12} {parts}")
    picks = report["pickup"]
    if picks:
        print(f"\nidle pickup: {picks[0]['pickups']} single jobs into an idle consumer (ms)")
        print(
            f"{'system':<12} {'taken p50/p95/max':>20} {'started p50/p95/max':>22} "
            f"{'enqueue call p50':>16} {'missing':>7} {'idle cmd/s':>10}"
        )
        for r in picks:
            print(
                f"{r['system']:<12} {_p(r['taken_ms']):>20} {_p(r['started_ms']):>22} "
                f"{_f(r['enqueue_call_ms']['p50'], 2):>16} {r['missing']:>7} "
                f"{r['idle_redis_commands_per_s']:>10.0f}"
            )
    crashes = report["crash"]
    if crashes:
        print(
            "\ncrash: 10 in-flight jobs of about "
            f"{report['meta']['job_seconds']:g} s, signal, a new worker started at once"
        )
        print(
            f"{'system':<6} {'signal':<7} {'knob':<26} {'re-run':>6} {'lost':>4} {'twice':>5} "
            f"{'again s':>7} {'all done s':>10} {'exit s':>6}  detail"
        )
        for r in crashes:
            if r.get("error"):
                print(f"{r['system']:<6} {r['signal']:<7} {r['row']}: FAILED: {r['error']}")
                continue
            if r["system"] == "ours":
                detail = (
                    f"attempts {compact(r['attempts'])}, model calls {compact(r['model_calls'])}, "
                    f"texts right {r['text_ok']}/10, closed complete (live) "
                    f"{compact(r['complete_closes_seen'])}"
                )
            else:
                detail = (
                    f"starts {compact(r['starts'])}, finishes {compact(r['finishes'])}, "
                    "in-progress key at the signal "
                    + compact(
                        [
                            ("gone" if t is None else f"{t:g} s")
                            for t in r["in_progress_ttl_s_at_signal"]
                        ]
                    )
                )
            print(
                f"{r['system']:<6} {r['signal']:<7} {r['knob']:<26} {r['rerun']:>6} "
                f"{r['lost']:>4} {r['twice']:>5} {_f(r['running_again_s']):>7} "
                f"{_f(r['recovered_s']):>10} "
                f"{_f(r['exit_s']):>6}  {detail}"
            )
            if r.get("note"):
                print(f"{'':<6} {r['note']}")
        print(
            f"lost: not finished within {report['meta']['crash_bound_s']:g} s of the signal. "
            "re-run: ours, "
            "taken again or the model asked again; arq, the function started again.\n"
            "twice: ours, more than one message for the answer in history or the answer seen "
            "closed complete more than once\nby a live subscriber; arq, the function ran to its "
            "end twice. again: signal to the last re-run job running again. all done: signal\n"
            "to the last of the 10 finished. exit: SIGTERM to the old process gone."
        )
    print("\nchecks:" if report["checks"] else "\nchecks: none in these phases")
    for check in report["checks"]:
        print(f"  {'ok    ' if check['ok'] else 'FAILED'} {check['what']}")


def compact(values: list[Any]) -> str:
    """`[1, 1, 2]` as `1 (x2) 2 (x1)`: each value, and for how many jobs."""
    counts = Counter(values)
    ordered = sorted(counts.items(), key=lambda kv: str(kv[0]))
    return " ".join(f"{v} (x{n})" for v, n in ordered)


def checks_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in report["throughput"]:
        out.append({"what": f"throughput {r['system']}: {r['completed']}/{r['jobs']} completed",
                    "ok": r["completed"] == r["jobs"]})  # fmt: skip
    ours = next((r for r in report["throughput"] if r["system"] == "ours"), None)
    if ours:
        out.append({"what": f"goal: ours {ours['jobs_per_s']:.0f} jobs/s >= {GOAL_JOBS_PER_S:g}",
                    "ok": ours["jobs_per_s"] >= GOAL_JOBS_PER_S})  # fmt: skip
    for r in report["pickup"]:
        out.append({"what": f"pickup {r['system']}: {r['pickups'] - r['missing']}/{r['pickups']}"
                    " jobs ran", "ok": r["missing"] == 0})  # fmt: skip
        if r["system"] == "ours":
            p95 = r["started_ms"]["p95"]
            out.append({"what": f"goal: ours idle pickup p95 {_f(p95)} ms <= {GOAL_PICKUP_MS:g}",
                        "ok": p95 is not None and p95 <= GOAL_PICKUP_MS})  # fmt: skip
    for r in report["crash"]:
        if r.get("error"):
            out.append({"what": f"crash {r['row']}: {r['error']}", "ok": False})
        elif r["system"] == "ours":
            out.append({
                "what": f"crash {r['row']}: lost {r['lost']}, twice {r['twice']}, texts right "
                        f"{r['text_ok']}/10",
                "ok": r["lost"] == 0 and r["twice"] == 0 and r["text_ok"] == 10,
            })  # fmt: skip
    return out


def ratios(rows: list[dict[str, Any]]) -> None:
    by = {r["system"]: r["jobs_per_s"] for r in rows}
    for r in rows:
        r["vs"] = {k: round(r["jobs_per_s"] / by[k], 2) for k in ("arq default", "arq tuned")
                   if by.get(k)}  # fmt: skip


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=5000, help="throughput: jobs enqueued first")
    p.add_argument("--concurrency", type=int, default=16, help="ours: WORKER_CONCURRENCY")
    p.add_argument("--pickups", type=int, default=50, help="idle pickup: single jobs")
    p.add_argument("--pickup-gap", type=float, nargs=2, default=[0.1, 0.4], metavar=("MIN", "MAX"),
                   help="idle pickup: random pause before each job (s)")  # fmt: skip
    p.add_argument("--job-seconds", type=float, default=3.0, help="crash: each job's length")
    p.add_argument("--signal-after", type=float, default=1.0,
                   help="crash: the signal comes this long after all 10 began")  # fmt: skip
    p.add_argument("--crash-bound", type=float, default=60.0,
                   help="crash: a job not finished this long after the signal is lost")  # fmt: skip
    p.add_argument("--crash-rows", nargs="+", default=list(CRASH_ROWS), choices=CRASH_ROWS)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS,
                   help="throughput and pickup rows (pickup has no ours+runner)")  # fmt: skip
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-pickup", action="store_true")
    p.add_argument("--skip-crash", action="store_true")
    p.add_argument("--arq-tuned", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"arq tuned settings instead of {TUNED}")  # fmt: skip
    p.add_argument("--arq-with", default="arq==0.28.0", help="the arq uv installs for arq's side")
    p.add_argument("--log-level", default="INFO", help="both consumers' log level")
    p.add_argument("--event-loop", choices=("uvloop", "asyncio"), default=default_event_loop(),
                   help="our consumer's loop (default: as `worker run`)")  # fmt: skip
    p.add_argument("--worker-log", default=os.devnull, help="consumers' and workers' stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: --jobs 500 --pickups 10 --skip-crash")  # fmt: skip
    p.add_argument("--child-ours", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.pickups = min(args.jobs, 500), min(args.pickups, 10)
        args.skip_crash = True
    args.arq_tuned_settings = dict(TUNED)
    if args.arq_tuned:  # instead of TUNED, not on top of it
        pairs = (item.partition("=") for item in args.arq_tuned)
        args.arq_tuned_settings = {key: json.loads(value) for key, _, value in pairs}
    return args


def default_event_loop() -> str:
    """The loop `worker run` uses unless EVENT_LOOP says otherwise."""
    from worker.settings import Settings

    field_ = Settings.model_fields.get("event_loop")
    return str(field_.default) if field_ is not None else "asyncio"


def meta(args: argparse.Namespace, redis_version: str, arq: ArqSide) -> dict[str, Any]:
    return {
        "arq": arq.versions.get("arq", args.arq_with),
        "arq_redis_py": arq.versions.get("redis"),
        "redis": redis_version,
        "redis_py": version("redis"),
        "cpus": os.cpu_count(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "arq_defaults": ARQ_DEFAULTS,
        "arq_tuned": args.arq_tuned_settings,
        "log_level": args.log_level,
        "ours_event_loop": args.event_loop,
        "job_seconds": args.job_seconds,
        "crash_bound_s": args.crash_bound,
    }


async def run_phases(env: Env, report: dict[str, Any], progress: Callable[[str], None]) -> None:
    args = env.args
    throughput = {
        "ours": lambda: throughput_ours(env, "queue"),
        "ours+runner": lambda: throughput_ours(env, "runner"),
        "arq-default": lambda: throughput_arq(env, "default"),
        "arq-tuned": lambda: throughput_arq(env, "tuned"),
    }
    pickup = {
        "ours": lambda: pickup_ours(env),
        "arq-default": lambda: pickup_arq(env, "default"),
        "arq-tuned": lambda: pickup_arq(env, "tuned"),
    }
    if not args.skip_throughput:
        for name, run in throughput.items():
            if name in args.systems:
                progress(f"... throughput: {name}")
                report["throughput"].append(await run())
        ratios(report["throughput"])
    if not args.skip_pickup:
        for name, run in pickup.items():
            if name in args.systems:
                progress(f"... idle pickup: {name}")
                report["pickup"].append(await run())
    if not args.skip_crash:
        report["crash"] = await crash_phase(env, args.crash_rows, progress)


async def amain(args: argparse.Namespace, log: Any) -> int:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)

    def progress(text: str) -> None:  # on stderr, so also with --json
        print(text, file=sys.stderr, flush=True)

    report: dict[str, Any] = {"throughput": [], "pickup": [], "crash": []}
    progress(f"... arq's environment: {args.arq_with}")
    arq = await ArqSide.start(args.arq_with)
    try:
        async with LocalRedis() as local_redis:
            env = Env(local_redis, args, log, arq)
            client = env.client()
            info = await client.info("server")
            await client.aclose()
            report["meta"] = meta(args, str(info.get("redis_version")), arq)
            await run_phases(env, report, progress)
    finally:
        await arq.stop()
    report["checks"] = checks_of(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if all(c["ok"] for c in report["checks"]) else 1


def main() -> int:
    args = parse_args()
    if args.child_ours:  # on the loop `worker run` uses (worker.eventloop)
        from worker import eventloop

        spec = json.loads(args.child_ours)
        eventloop.run(child_ours(spec), spec.get("event_loop", "uvloop"))
        return 0
    try:
        with open(args.worker_log, "a") as log:
            return asyncio.run(amain(args, log))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


if __name__ == "__main__":
    sys.exit(main())
