"""The arq side of `queue_vs_arq.py`: job functions, a worker process, and a producer.

arq 0.28 pins redis-py below 6, so it lives in an environment of its own, never the
project's (pyproject.toml, the `bench` group):

    uv run --isolated --no-project --with arq==0.28.0 python bench/arq_jobs.py serve
    .../python bench/arq_jobs.py worker --redis-url redis://127.0.0.1:PORT/0 \
        [--profile default|tuned] [--set KEY=VALUE ...] [--job-timeout S] [--log-level L]

Only the standard library is imported at the top of this file (the benchmark imports
its constants and `count_round_trips`); arq and redis-py are imported where used.

`worker` runs one arq worker (`arq.worker.run_worker`, as the `arq` command does, signal
handlers and all) until SIGTERM or SIGINT, logging as the `arq` command sets it up
(`arq.logs.default_log_config`: INFO, on stderr). On stdout it prints one JSON line
`{"ready": true, "pid": ...}` once the worker has started (arq's `on_startup`) and one
`{"round_trips": {...}}` line when it exits: every request this process sent to Redis,
counted on the client (a pipeline or MULTI/EXEC counts once). Profiles: `default` is arq
as shipped (`max_jobs` 10, `poll_delay` 0.5 s, `queue_read_limit` max(5 x max_jobs, 100),
`job_timeout` 300 s, `keep_result` 3600 s); `tuned` is `TUNED` below; `--set` changes any
`arq.worker.Worker` argument on top (a JSON value: `--set max_jobs=50`).
`--job-timeout` sets `job_timeout`, which also sets how long arq's in-progress key
outlives a killed worker (job_timeout + 10 s): when its jobs can run again.

`serve` is the benchmark's producer and its way into this environment: it prints
`{"ready": true, "python": sys.executable}` (the benchmark starts workers with that
interpreter, with no `uv` in between, while `serve` keeps the environment alive) and
the versions of arq and redis-py, then
answers one JSON line per command line on stdin:

- `{"op": "enqueue", "redis_url": U, "function": F, "ids": [...], "args": [...]}`:
  `ArqRedis.enqueue_job(F, *args, _job_id=id)` for each id (200 at a time); answers
  `{"enqueued": n, "t0": time.time() before the first call, "call_ms": the whole}`;
- `{"op": "results", "redis_url": U, "ids": [...]}`: arq's stored results; answers
  `{"succeeded": n, "first_start": ..., "last_finish": ...}` (epoch seconds).

Job functions:

- `noop`: returns at once (the throughput phase's "instant model");
- `stamp`: writes the time it started (`time.time()`) to `bench:started:<job id>`, then
  pushes its job id on `bench:done` (the idle pickup phase);
- `slow(seconds)`: counts each start (`INCR bench:starts:<job id>`) and records when
  (`ZADD bench:started_at`, the latest), sleeps, then counts the finish
  (`INCR bench:finishes:<job id>`) and records when (`ZADD bench:finished`); the crash
  phase reads the counts to see what ran twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging.config
import os
import sys
import time
from collections import Counter
from typing import Any, ClassVar, cast

# What "tuned" changes from arq's defaults (tried on this machine; the report prints
# them): more jobs at once, a much shorter sleep between polls of the queue, and more
# job ids read per poll.
TUNED: dict[str, Any] = {"max_jobs": 200, "poll_delay": 0.005, "queue_read_limit": 1000}

STARTED = "bench:started:"
DONE = "bench:done"
STARTS = "bench:starts:"
STARTED_AT = "bench:started_at"
FINISHES = "bench:finishes:"
FINISHED = "bench:finished"


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def stamp(ctx: dict[str, Any]) -> None:
    started = time.time()
    job_id = ctx["job_id"]
    async with ctx["redis"].pipeline(transaction=False) as pipe:
        pipe.set(STARTED + job_id, repr(started), ex=600)
        pipe.rpush(DONE, job_id)
        await pipe.execute()


async def slow(ctx: dict[str, Any], seconds: float) -> None:
    job_id = ctx["job_id"]
    async with ctx["redis"].pipeline(transaction=False) as pipe:
        pipe.incr(STARTS + job_id)
        pipe.zadd(STARTED_AT, {job_id: time.time()})
        await pipe.execute()
    await asyncio.sleep(seconds)
    async with ctx["redis"].pipeline(transaction=False) as pipe:
        pipe.incr(FINISHES + job_id)
        pipe.zadd(FINISHED, {job_id: time.time()})
        await pipe.execute()


class WorkerSettings:
    functions: ClassVar[list[Any]] = [noop, stamp, slow]


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _ready(ctx: dict[str, Any]) -> None:
    _emit({"ready": True, "pid": os.getpid()})


def count_round_trips() -> Counter[str]:
    """Count every request redis-py's asyncio client sends from this process, by command
    (a pipeline, transactional or not, counts once as `pipeline`; a Lua script call as
    `EVALSHA` and the first 8 hex digits of its SHA-1)."""
    from redis.asyncio.client import Pipeline, Redis

    counts: Counter[str] = Counter()
    plain = Redis.execute_command
    immediate = Pipeline.immediate_execute_command
    execute = Pipeline.execute

    def name(args: tuple[Any, ...]) -> str:
        command = str(args[0]).upper()
        return f"{command} {str(args[1])[:8]}" if command == "EVALSHA" else command

    async def counted(self: Any, *args: Any, **options: Any) -> Any:
        counts[name(args)] += 1
        return await plain(self, *args, **options)

    async def counted_immediate(self: Any, *args: Any, **options: Any) -> Any:
        counts[name(args)] += 1
        return await immediate(self, *args, **options)

    async def counted_execute(self: Any, raise_on_error: bool = True) -> Any:
        if self.command_stack:
            counts["pipeline"] += 1
        return await execute(self, raise_on_error)

    Redis.execute_command = counted  # type: ignore[method-assign]
    Pipeline.immediate_execute_command = counted_immediate  # type: ignore[method-assign]
    Pipeline.execute = counted_execute  # type: ignore[method-assign]
    return counts


def settings_for(
    profile: str, job_timeout: float | None, sets: list[str] | None = None
) -> dict[str, Any]:
    """The keyword arguments `run_worker` gets on top of `WorkerSettings`."""
    overrides: dict[str, Any] = dict(TUNED) if profile == "tuned" else {}
    for item in sets or []:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    if job_timeout is not None:
        overrides["job_timeout"] = job_timeout
    return overrides


def worker(args: argparse.Namespace) -> int:
    from arq.connections import RedisSettings
    from arq.logs import default_log_config
    from arq.worker import run_worker

    config = default_log_config(verbose=False)
    config["handlers"]["arq.standard"]["level"] = args.log_level
    config["loggers"]["arq"]["level"] = args.log_level
    logging.config.dictConfig(config)
    counts = count_round_trips()
    try:
        run_worker(
            cast(Any, WorkerSettings),  # arq types it as its own settings protocol
            redis_settings=RedisSettings.from_dsn(args.redis_url),
            on_startup=_ready,
            **settings_for(args.profile, args.job_timeout, args.set),
        )
    finally:
        _emit({"round_trips": dict(counts)})
    return 0


async def _enqueue(pool: Any, command: dict[str, Any]) -> dict[str, Any]:
    ids, fn, fn_args = command["ids"], command["function"], command.get("args", [])
    t0 = time.time()
    enqueued = 0
    for i in range(0, len(ids), 200):
        chunk = ids[i : i + 200]
        jobs = await asyncio.gather(*(pool.enqueue_job(fn, *fn_args, _job_id=j) for j in chunk))
        enqueued += sum(job is not None for job in jobs)
    return {"enqueued": enqueued, "t0": t0, "call_ms": (time.time() - t0) * 1000}


async def _results(pool: Any, command: dict[str, Any]) -> dict[str, Any]:
    from arq.constants import result_key_prefix
    from arq.jobs import deserialize_result

    starts: list[float] = []
    finishes: list[float] = []
    ids = command["ids"]
    for i in range(0, len(ids), 1000):
        raw = await pool.mget(*(result_key_prefix + j for j in ids[i : i + 1000]))
        for value in raw:
            if value is None:
                continue
            result = deserialize_result(value)
            if result.success:
                starts.append(result.start_time.timestamp())
                finishes.append(result.finish_time.timestamp())
    return {
        "succeeded": len(starts),
        "first_start": min(starts, default=None),
        "last_finish": max(finishes, default=None),
    }


async def serve() -> int:
    import arq
    import redis
    from arq import create_pool
    from arq.connections import RedisSettings

    versions = {"arq": arq.VERSION, "redis": redis.__version__}
    _emit({"ready": True, "python": sys.executable, "pid": os.getpid(), "versions": versions})
    pools: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            url = command["redis_url"]
            if url not in pools:
                pools[url] = await create_pool(RedisSettings.from_dsn(url))
            if command["op"] == "enqueue":
                _emit(await _enqueue(pools[url], command))
            elif command["op"] == "results":
                _emit(await _results(pools[url], command))
            else:
                _emit({"error": f"unknown op {command['op']!r}"})
    finally:
        for pool in pools.values():
            await pool.aclose()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run one arq worker until SIGTERM")
    w.add_argument("--redis-url", required=True)
    w.add_argument("--profile", choices=("default", "tuned"), default="default")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an arq Worker argument, JSON value")  # fmt: skip
    w.add_argument("--job-timeout", type=float, default=None, help="arq's job_timeout (s)")
    w.add_argument("--log-level", default="INFO", help="arq's loggers (the arq command: INFO)")
    sub.add_parser("serve", help="the benchmark's producer (JSON lines on stdin/stdout)")
    args = p.parse_args()
    if args.command == "serve":
        return asyncio.run(serve())
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
