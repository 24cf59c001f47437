"""What a browser sees when a worker streams N answers at once, N = 1, 4, 16, 32 by default.

    uv run python bench/worker_streams.py [--n 1 4 16 32] [--processes P]
        [--arrival burst|steady] [--json]

Starts its own local services on loopback: `LocalRedis`, `LocalAbly` (Sockudo), the local
OpenAI server (`python -m worker.devstack.openai_local`, its own process: 50 tokens/s,
first token after 200 ms, answers of about 200 tokens) and the fault proxy
(`python -m worker.devstack.fault_proxy --enforce-rate-limits`, its own process) between
the worker and Sockudo, which counts every worker connection's messages the way Ably's
rate limits do (appends to one message inside the 40 ms rollup window count once) and
refuses what Ably would refuse.

Where the worker runs (`--processes`):

- 0 (the default): in this process (`worker.app.serve`); `time.process_time` of this
  process is then the worker's CPU (plus this script's own small bookkeeping), and so is
  its memory (VmRSS);
- P >= 1: as real `python -m worker run` processes, `WORKER_PROCESSES=P` under the
  supervisor (`worker/supervisor.py`) once it exists, else P separate processes with
  `WORKER_PROCESSES=1` (`--launch` picks); the worker's CPU and memory are then the sums
  over those processes and their children, read from /proc.

For each N a fresh worker starts with the default settings (STREAMS_PER_CONNECTION=3, a
budget of 44 messages/s per connection; WORKER_CONCURRENCY per process the default 16,
or N when N is larger, in-process; ceil(N / P) with P processes: all N answers run at
once; with `--arrival steady` the same for 1.25 N, see `concurrency`) under a queue
prefix of its own, warms up with short jobs, waits until its CPU has settled, idles for
`--idle-seconds` (its idle CPU and memory), then runs one or more rounds of jobs, each
answering on its own channel, while a live subscriber per channel (one Ably connection
each, as N browsers would have, attached before the round's first enqueue) runs in child
processes of this script (one per 160 channels: `--subscriber-processes`). How a round's
jobs arrive (`--arrival`):

- burst (the default): N jobs enqueued at once, all N answers running together;
- steady: jobs enqueued one by one, one every model_s / N seconds (model_s: one answer's
  model-only time, the median of the round's), so that about N answers are in flight as
  under a steady stream of arrivals. The first N jobs bring it to N in flight ("warm":
  not measured); the next max(N, `--min-samples`) are measured. One round per N
  (unless `--rounds`).

It reports:

- ttft: from the enqueue to the first non-empty text the subscriber receives (p50/p95;
  with `--arrival steady`, this and the next two items are of the measured jobs only);
  `over`: the same minus the model's own first-token delay, i.e. the worker's overhead,
  split into pickup (enqueue to taken, from Redis' timestamps), create+model (the
  worker's own ttft_ms less the model's delay: the create publish and its ACK, the model
  request) and other (the attach that listens for `cancel`, the first append's wait for a
  budget token, delivery to the browser);
- gap: the time between text fragments the subscriber receives within one answer
  (p50/p95): how smooth the stream looks (one fragment per append the worker sent);
- wall: from the first enqueue to the last answer closed (`status: complete`) at the
  subscriber, against the model-only time (the slowest answer's first-token delay plus
  its tokens at the model's pace), as a ratio. With `--arrival steady` the round's wall
  time is mostly the arrival schedule, so w/m is each measured answer's own enqueue to
  closed over its own model-only time, p95 (and `model` one answer's model-only time,
  the median); every answer checked against `answer_text` (`ok`), every job `completed`
  in Redis;
- the worker's Ably connections (open, and publishing in the round), the highest count
  of Ably-counted messages in any one-second window on any one connection, and how many
  the proxy refused (over 50/s per connection or channel);
- CPU: the worker's per answer, per token streamed (µs) and as a share of one core, and
  the other processes' shares (Sockudo, the subscribers (all, and the busiest one), the
  proxy, the model server, Redis, this script, the rest of the machine); with
  `--arrival steady` over the whole round (the warm jobs, and the tail as the last
  answers end, included);
- memory: the worker's resident memory (VmRSS) at idle after the warm-up and its peak
  while the N answers stream (sampled every 0.1 s); (peak - idle) / N is the memory per
  concurrent answer.

Ratios against N=1 close the table. The rounds per N are enough to give `--min-samples`
answers (8: eight rounds of one answer, two of four, one of 16 or more; steady: one round
of N + max(N, 8) jobs, about (N + max(N, 8)) / N answer times long). Every wait is
bounded: an N that fails (a worker that does not start, a round that does not end) is a
row with its error, and the next N runs. A default run takes about 60 s. Exit status 1 if
an answer was wrong, a publish refused or an N failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import itertools
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from cpu_clock import process_cpu_s, system_busy_s  # bench/, the script's folder
from json_child import JsonChild

from worker import eventloop
from worker.app import serve
from worker.devstack.ably import LocalAbly
from worker.devstack.openai_local.text import answer_text, answer_tokens, delta_groups
from worker.devstack.ports import free_port
from worker.devstack.processes import server_process_options
from worker.devstack.redis_server import LocalRedis
from worker.devstack.sockudo_install import SOCKUDO_VERSION
from worker.jobs import Job
from worker.logs import configure_logging
from worker.queue import RedisStreamsQueue
from worker.redis_client import connect_redis
from worker.settings import Settings, load_settings
from worker.transport.client import quiet_sdk_logs, realtime_client

SCRIPT = str(Path(__file__).resolve())
REPO = str(Path(__file__).resolve().parent.parent)
START_TIMEOUT_S = 30.0  # a server or the worker getting ready
ROUND_GRACE_S = 30.0  # on top of the model-only time, for one round to finish
STOP_TIMEOUT_S = 30.0  # a worker draining and exiting
DONE_STATUSES = ("complete", "failed", "cancelled")
APPEND = 5  # MessageAction.MESSAGE_APPEND
REPORT_LIMIT_BYTES = 64 * 1024 * 1024  # the subscribers' report: one line, every text in it
SUBSCRIBERS_PER_PROCESS = 160  # channels one subscriber process holds, by default
MEMORY_SAMPLE_S = 0.1
SETTLE_WINDOW_S = 1.0
STEADY_HEADROOM = 1.25  # --arrival steady: worker slots per answer in flight (concurrency)
ARRIVALS = {
    "burst": "burst: each round's N jobs enqueued at once",
    "steady": "steady: one job every (one answer's model-only time) / N, about N answers in "
    f"flight (slots for {STEADY_HEADROOM:g} N); the first N (warm) not measured, then "
    "max(N, --min-samples) measured",
}


def supervisor_available() -> bool:
    """`worker/supervisor.py` is there: `WORKER_PROCESSES=P` runs P processes under it."""
    return importlib.util.find_spec("worker.supervisor") is not None


# --- /proc: process trees and memory ----------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every process under it (children of children too), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def alive(pids: Iterable[int]) -> list[int]:
    """Those of `pids` that still exist."""
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def rss_kb(pid: int) -> int:
    """A process's resident memory (VmRSS, KB); 0 once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- CPU clocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Meter:
    """The clocks at one moment: wall, the worker, each helper process."""

    wall: float
    worker: float
    workers: dict[int, float]  # by worker process
    others: dict[str, float]  # by role: sockudo, subscribers, proxy, model, redis, bench
    each: dict[int, float]  # by pid: every helper process (the busiest subscriber process)
    busy: float

    @classmethod
    def take(cls, workers: dict[int, float], pids: dict[str, list[int]]) -> Meter:
        each = {pid: process_cpu_s(pid) for role_pids in pids.values() for pid in role_pids}
        return cls(
            time.monotonic(),
            sum(workers.values()),
            workers,
            {role: sum(each[pid] for pid in role_pids) for role, role_pids in pids.items()},
            each,
            system_busy_s(),
        )


def cpu_shares(start: Meter, end: Meter) -> dict[str, float]:
    """CPU seconds per role between two meters, `rest` being the rest of the machine."""
    shares = {"worker": end.worker - start.worker}
    shares.update({role: end.others[role] - start.others[role] for role in start.others})
    shares["rest"] = max(0.0, end.busy - start.busy - sum(shares.values()))
    return shares


def busiest(start: Meter, end: Meter, pids: Iterable[int]) -> float:
    """The most CPU seconds any one of `pids` used between two meters."""
    return max((end.each[pid] - start.each[pid] for pid in pids), default=0.0)


def busiest_worker(start: Meter, end: Meter) -> float:
    """The most CPU seconds any one worker process used between two meters."""
    return max((end.workers[pid] - start.workers.get(pid, 0.0) for pid in end.workers), default=0.0)


def percentiles(values: list[float], digits: int = 1) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    if len(values) == 1:
        return {"p50": round(values[0], digits), "p95": round(values[0], digits)}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], digits), "p95": round(q[94], digits)}


# --- the subscribers (a child process) ------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@dataclass
class Watch:
    """One browser's view of one channel: when text arrived, and what it adds up to."""

    first_text_at: float | None = None
    first_text_wall: float | None = None  # time.time(), to compare with Redis' timestamps
    fragments: list[float] = field(default_factory=list)  # appends with text, received at
    done_at: float | None = None
    status: str | None = None
    texts: dict[str, str] = field(default_factory=dict)  # by message serial
    messages: int = 0

    def on_message(self, message: Any) -> None:
        now = time.monotonic()
        self.messages += 1
        data = message.data if isinstance(message.data, str) else ""
        if data and self.first_text_at is None:
            self.first_text_at, self.first_text_wall = now, time.time()
        serial = str(message.serial)
        if message.action == APPEND:
            self.texts[serial] = self.texts.get(serial, "") + data
            if data:
                self.fragments.append(now)
        else:
            self.texts[serial] = data
        status = ((message.extras or {}).get("headers") or {}).get("status")
        if status in DONE_STATUSES and self.done_at is None:
            self.done_at, self.status = now, status

    def report(self) -> dict[str, Any]:
        return {
            "first_text_at": self.first_text_at,
            "first_text_wall": self.first_text_wall,
            "fragments": self.fragments,
            "done_at": self.done_at,
            "status": self.status,
            "texts": list(self.texts.values()),
            "messages": self.messages,
        }


async def child_subscribers(spec: dict[str, Any]) -> None:
    """`--child`: for each command line {"channels": [...], "timeout_s": t,
    "ready_timeout_s": r}, connect one client per channel (or per `channels_per_connection`
    channels), attach, say ready, wait until every answer is closed (or the timeout),
    report what each saw, close the clients. (Its CPU is read from /proc.)"""
    loop = asyncio.get_running_loop()
    per_client = max(1, int(spec.get("channels_per_connection", 1)))
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        channels: list[str] = command["channels"]
        watches = {name: Watch() for name in channels}
        clients = [
            realtime_client(spec["key"], spec["endpoint"])
            for _ in range(math.ceil(len(channels) / per_client))
        ]
        try:
            try:
                async with asyncio.timeout(command.get("ready_timeout_s", START_TIMEOUT_S)):
                    await asyncio.gather(
                        *(
                            clients[i // per_client]
                            .channels.get(name)
                            .subscribe(watches[name].on_message)
                            for i, name in enumerate(channels)
                        )
                    )
            except TimeoutError:
                attached = sum(
                    1
                    for i, name in enumerate(channels)
                    if getattr(clients[i // per_client].channels.get(name).state, "value", "")
                    == "attached"
                )
                _emit({"ready": False, "error": f"{attached}/{len(channels)} channels attached"})
                continue
            # No collector pauses while the round is timed: a full collection over 160
            # connections' objects took 100-440 ms here, and the arrivals it held up
            # were counted as the worker's gaps. (A browser is a process of its own.)
            gc.collect()
            gc.disable()
            try:
                _emit({"ready": True})
                deadline = time.monotonic() + command["timeout_s"]
                while time.monotonic() < deadline:
                    if all(w.done_at is not None for w in watches.values()):
                        break
                    await asyncio.sleep(0.02)
            finally:
                gc.enable()
            _emit({"channels": {name: w.report() for name, w in watches.items()}})
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# --- the helper servers (processes) ------------------------------------------------------------


@contextlib.asynccontextmanager
async def helper_process(*args: str, ready: str) -> AsyncIterator[tuple[int, str]]:
    """`python -m <args>`: yields its pid and the first stdout line starting with `ready`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stdout=asyncio.subprocess.PIPE, **server_process_options()
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"{args[0]} exited ({await proc.wait()})")
                if line.startswith(ready):
                    break
        yield proc.pid, line.strip()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class ProxyControl:
    """The fault proxy's control API (`/_proxy/stats`, `/_proxy/stats/reset`)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def reset(self) -> None:
        async with self.http.post(f"{self.endpoint}/_proxy/stats/reset") as resp:
            resp.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.endpoint}/_proxy/stats") as resp:
            resp.raise_for_status()
            return dict(await resp.json())

    async def close(self) -> None:
        await self.http.close()


# --- the worker under test ------------------------------------------------------------------


class WorkerUnderTest(Protocol):
    """The worker for one N, wherever it runs: its CPU and memory, read while it works."""

    async def start(self) -> None: ...
    def failure(self) -> str | None: ...
    def refresh(self) -> None: ...
    def cpu_s(self) -> dict[int, float]: ...
    def rss_kb(self) -> int: ...
    async def stop(self) -> None: ...


class InProcessWorker:
    """`worker.app.serve` on this event loop: its CPU and memory are this process's (with
    this script's own bookkeeping: the queue client, the proxy's stats, the reports)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.settings = load_settings(Settings, **values)
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(serve(self.settings, self.stopping, handle_signals=False))

    def failure(self) -> str | None:
        if self.task is None or not self.task.done():
            return None
        if self.task.cancelled():
            return "the worker was cancelled"
        exc = self.task.exception()
        return f"the worker stopped: {exc!r}" if exc else "the worker stopped"

    def refresh(self) -> None:
        pass

    def cpu_s(self) -> dict[int, float]:
        return {os.getpid(): time.process_time()}

    def rss_kb(self) -> int:
        return rss_kb(os.getpid())

    async def stop(self) -> None:
        self.stopping.set()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, STOP_TIMEOUT_S)


class WorkerProcesses:
    """`python -m worker run` as real processes: one under the supervisor with
    `WORKER_PROCESSES=P`, or P of them with `WORKER_PROCESSES=1` each. Their CPU and
    memory are the sums over each process's tree (its children too), from /proc."""

    def __init__(self, values: dict[str, Any], processes: int, supervisor: bool, log: Any):
        self.values = values
        self.processes = processes
        self.supervisor = supervisor
        self.log = log
        self.procs: list[asyncio.subprocess.Process] = []
        self.pids: list[int] = []

    def env(self, worker_id: str, processes: int) -> dict[str, str]:
        env = {**os.environ, **{key.upper(): str(v) for key, v in self.values.items()}}
        path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        env.update(WORKER_ID=worker_id, WORKER_PROCESSES=str(processes), PYTHONPATH=path)
        return env

    async def start(self) -> None:
        worker_id = str(self.values["worker_id"])
        launches = (
            [(worker_id, self.processes)]  # the supervisor runs the P processes
            if self.supervisor
            else [(f"{worker_id}-{i}", 1) for i in range(self.processes)]
        )
        for name, processes in launches:
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "worker", "run", env=self.env(name, processes),
                    stdin=asyncio.subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                    **server_process_options(),
                )
            )  # fmt: skip
        self.refresh()

    def failure(self) -> str | None:
        for proc in self.procs:
            if proc.returncode is not None:
                return f"worker process {proc.pid} exited with status {proc.returncode}"
        return None

    def refresh(self) -> None:
        self.pids = sorted({pid for proc in self.procs for pid in process_tree(proc.pid)})

    def cpu_s(self) -> dict[int, float]:
        return {pid: process_cpu_s(pid) for pid in self.pids}

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self.pids)

    async def stop(self) -> None:
        if not self.procs:
            return
        self.refresh()
        tree = set(self.pids) - {proc.pid for proc in self.procs}
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.procs)), STOP_TIMEOUT_S)
        except TimeoutError:
            for proc in self.procs:
                if proc.returncode is None:
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in self.procs))
        # A supervisor's children go with it; any left after 5 s are killed (by pid).
        for _ in range(50):
            if not (left := alive(tree)):
                break
            await asyncio.sleep(0.1)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class PeakSampler:
    """The highest value of `read()` while it runs, sampled every MEMORY_SAMPLE_S."""

    def __init__(self, read: Any) -> None:
        self.read = read
        self.peak = 0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.read())
            await asyncio.sleep(MEMORY_SAMPLE_S)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> int:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.peak = max(self.peak, self.read())
        return self.peak


# --- one N ---------------------------------------------------------------------------------


@dataclass
class Services:
    redis: LocalRedis
    ably: LocalAbly
    proxy: ProxyControl
    model_base_url: str
    pids: dict[str, list[int]]  # by role: sockudo, proxy, model, redis


@dataclass
class RoundResult:
    n: int
    answers: int  # the round's jobs (steady: the warm ones too)
    wall_s: float
    model_s: float
    # Each measured answer's enqueue to closed at its subscriber over its own model time.
    answer_wall_over_model: list[float]
    in_flight: float  # steady: answers open on average while the measured jobs arrived
    ttft_ms: list[float]
    # Where the overhead went, from Redis' timestamps and the worker's own ttft_ms: pickup
    # (enqueue to taken), create_model (the worker's ttft less the model's first-token
    # delay: the create publish and its ACK, the model request), other (the rest: the
    # attach that listens for `cancel`, the first append's wait for a token, delivery).
    ttft_parts_ms: dict[str, list[float]]
    fragment_gaps_ms: list[float]
    fragments: int
    tokens: int  # the model's tokens in the round's answers
    ok: int
    retried: int  # jobs with more than one attempt: the worker failed them once
    completed: int
    cpu: dict[str, float]
    subscriber_busiest_s: float  # CPU seconds of the busiest subscriber process
    worker_busiest_s: float  # CPU seconds of the busiest worker process
    rss_peak_kb: int  # the worker's highest resident memory while the round ran
    connections_open: int
    connections_publishing: int
    peak_per_connection: int
    refused: int
    problems: list[str]


@dataclass
class NRun:
    """One N: the worker's idle figures, then its rounds."""

    idle_cpu: float  # share of a core
    idle_rss_kb: int
    subscriber_processes: int
    rounds: list[RoundResult]
    settle_s: float  # how long the fresh worker took to settle after its warm-up


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def worker_errors(log: Any, limit: int = 5) -> dict[str, int]:
    """The worker's `job.error` lines in its log, counted by error (the commonest first)."""
    counts: dict[str, int] = {}
    with contextlib.suppress(Exception):
        log.flush()
        log.seek(0)
        for line in log:
            if "job.error" not in line:
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("event") == "job.error":
                    error = str(entry.get("error", "?"))[:160]
                    counts[error] = counts.get(error, 0) + 1
        log.seek(0, os.SEEK_END)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])


def model_seconds(prompt: str, tokens: int, tps: float, first_token_ms: float) -> float:
    """When the local model sends its last delta: first token, then the rest at its pace."""
    groups = delta_groups(prompt, tokens)
    before_last = sum(len(g) for g in groups[:-1])
    return first_token_ms / 1000 + (before_last / tps if tps > 0 else 0.0)


def concurrency(n: int, args: argparse.Namespace) -> int:
    """WORKER_CONCURRENCY (per process) for N answers: --concurrency, else in-process the
    default or N if larger, with P processes ceil(N / P): all N answers run at once.
    Steady arrivals: slots for STEADY_HEADROOM x N answers. An answer holds its slot a
    little longer than its model-only time, so jobs arriving at N per model time keep a
    few more than N in the worker; with N slots they would queue for one, ever longer."""
    if args.concurrency:
        return int(args.concurrency)
    slots = math.ceil(n * STEADY_HEADROOM) if args.arrival == "steady" else n
    if args.processes:
        return math.ceil(slots / args.processes)
    return max(slots, int(Settings.model_fields["worker_concurrency"].default))


def arrivals(n: int, args: argparse.Namespace) -> tuple[int, int]:
    """A round's jobs and how many of them come first unmeasured: a burst is N jobs at
    once, all measured; steady is N warm jobs (to reach N in flight), then max(N,
    --min-samples) measured ones."""
    if args.arrival == "steady":
        return n + max(n, args.min_samples), n
    return n, 0


def rounds_for(n: int, args: argparse.Namespace) -> int:
    """--rounds, else enough rounds for --min-samples answers (steady: one is enough)."""
    if args.rounds:
        return int(args.rounds)
    return 1 if args.arrival == "steady" else max(1, math.ceil(args.min_samples / n))


def subscriber_processes(n: int, args: argparse.Namespace) -> int:
    channels = arrivals(n, args)[0]
    return int(args.subscriber_processes or math.ceil(channels / SUBSCRIBERS_PER_PROCESS))


def launch_mode(args: argparse.Namespace) -> str:
    """in-process, supervisor (one `worker run`, WORKER_PROCESSES=P) or separate."""
    if not args.processes:
        return "in-process"
    if args.processes == 1 and args.launch != "supervisor":
        return "one process"
    if args.launch == "auto":
        return "supervisor" if supervisor_available() else "separate"
    return str(args.launch)


class Bench:
    def __init__(self, services: Services, args: argparse.Namespace) -> None:
        self.s = services
        self.args = args
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"

    def values(self, n: int) -> dict[str, Any]:
        """The worker's settings for N (as Settings fields; upper-cased, its environment)."""
        a = self.args
        values: dict[str, Any] = {
            "redis_url": self.s.redis.url,
            "queue_prefix": self.prefix,
            "ably_api_key": self.s.ably.key,
            "ably_endpoint": f"http://127.0.0.1:{a.proxy_port}",
            "openai_api_key": "sk-local",
            "openai_base_url": self.s.model_base_url,
            "openai_model": "local",
            "openai_api": "responses",
            "worker_id": f"bench-{uuid.uuid4().hex[:6]}",
            "presence_channel": f"agents:{self.prefix}",
            "worker_concurrency": concurrency(n, a),
            "shutdown_grace_seconds": 5,
            "job_timeout_seconds": 120,
            "log_format": "json",
            "log_level": a.worker_log_level,
        }  # fmt: skip
        if a.streams_per_connection:
            values["streams_per_connection"] = a.streams_per_connection
        if a.messages_per_second:
            values["ably_messages_per_second"] = a.messages_per_second
        return values

    def worker(self, n: int, log: Any) -> WorkerUnderTest:
        mode = launch_mode(self.args)
        if mode == "in-process":
            return InProcessWorker(self.values(n))
        return WorkerProcesses(self.values(n), self.args.processes, mode == "supervisor", log)

    def queue(self) -> RedisStreamsQueue:
        return RedisStreamsQueue(connect_redis(self.s.redis.url), prefix=self.prefix, consumer="b")

    async def wait_final(
        self,
        queue: RedisStreamsQueue,
        job_ids: Iterable[str],
        timeout: float,
        worker: WorkerUnderTest | None = None,
    ) -> dict[str, dict[str, str]]:
        """Each job's record once its state is final (or as it is at the timeout, or when
        the worker has stopped)."""
        records: dict[str, dict[str, str]] = {}
        deadline = time.monotonic() + timeout
        pending = list(job_ids)
        while pending:
            for job_id in list(pending):
                records[job_id] = await queue.status(job_id) or {}
                if records[job_id].get("state") in ("completed", "dead", "cancelled"):
                    pending.remove(job_id)
            if not pending or time.monotonic() > deadline:
                break
            if worker is not None and (failure := worker.failure()):
                raise RuntimeError(failure)
            await asyncio.sleep(0.05)
        return records

    async def until_ready(self, queue: RedisStreamsQueue, worker: WorkerUnderTest) -> None:
        """Worker processes: until each has said it is alive (its heartbeat in Redis)."""
        if not self.args.processes:
            return
        deadline = time.monotonic() + 2 * START_TIMEOUT_S
        while len(await queue.live_workers()) < self.args.processes:
            if failure := worker.failure():
                raise RuntimeError(failure)
            if time.monotonic() > deadline:
                live = len(await queue.live_workers())
                raise RuntimeError(
                    f"{live} of {self.args.processes} worker processes alive after "
                    f"{2 * START_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(0.1)

    async def warm_up(self, queue: RedisStreamsQueue, worker: WorkerUnderTest) -> None:
        """Short, fast jobs (two per process): the worker is connected and its code paths
        are warm."""
        meta = {"local_tokens": "20", "local_tokens_per_second": "0", "local_first_token_ms": "0"}
        jobs = [
            Job(channel=f"bench:warm-{uuid.uuid4().hex[:8]}", input="warm up", metadata=meta)
            for _ in range(2 * self.args.processes or 1)
        ]
        for job in jobs:
            assert await queue.enqueue(job)
        records = await self.wait_final(queue, [j.id for j in jobs], START_TIMEOUT_S, worker)
        if failure := worker.failure():
            raise RuntimeError(f"{failure} during the warm-up")
        states = [records[j.id].get("state") for j in jobs]
        if states.count("completed") < len(jobs):
            raise RuntimeError(f"the worker did not complete its warm-up jobs: {states}")

    async def settle(self, worker: WorkerUnderTest) -> float:
        """Wait until the fresh worker's CPU has settled (below 5 % of a core, or no longer
        falling: within 3 points of the previous second's), at most --settle-seconds: a
        worker with many connections is busy for seconds after its start. Returns the wait."""
        started = time.monotonic()
        previous = None
        while time.monotonic() - started < self.args.settle_seconds:
            cpu, at = sum(worker.cpu_s().values()), time.monotonic()
            await asyncio.sleep(SETTLE_WINDOW_S)
            share = (sum(worker.cpu_s().values()) - cpu) / (time.monotonic() - at)
            if share < 0.05 or (previous is not None and abs(share - previous) < 0.03):
                break
            previous = share
        return round(time.monotonic() - started, 1)

    async def run_n(self, n: int, rounds: int, log: Any) -> NRun:
        """Start a worker for N, warm it up, measure its idle CPU (share of a core) and
        memory, then run the rounds; the worker is stopped (drained) at the end. Each N has
        a queue prefix of its own: a fresh worker would otherwise take over, as sessions,
        the channels of every earlier N's jobs (their attach and history reads)."""
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        worker = self.worker(n, log)
        queue = self.queue()
        spec = {
            "key": self.s.ably.key,
            "endpoint": self.s.ably.endpoint,
            "channels_per_connection": self.args.channels_per_connection,
            "event_loop": self.args.harness_loop,
        }
        subscribers: list[JsonChild] = []
        try:
            await queue.ensure_group()
            await worker.start()
            await self.until_ready(queue, worker)
            await self.warm_up(queue, worker)
            worker.refresh()
            settle_s = await self.settle(worker)
            idle_start = Meter.take(worker.cpu_s(), {})
            await asyncio.sleep(self.args.idle_seconds)
            idle_end = Meter.take(worker.cpu_s(), {})
            idle_rss = worker.rss_kb()
            idle_wall = idle_end.wall - idle_start.wall
            idle = (idle_end.worker - idle_start.worker) / idle_wall if idle_wall > 0.1 else 0.0
            for i in range(subscriber_processes(n, self.args)):
                subscribers.append(
                    await JsonChild.start(
                        SCRIPT, spec, f"subscriber process {i}", limit=REPORT_LIMIT_BYTES,
                        **server_process_options(),
                    )
                )  # fmt: skip
            results = []
            for r in range(rounds):
                if failure := worker.failure():
                    raise RuntimeError(failure)
                results.append(await self.one_round(queue, n, r, worker, subscribers))
            return NRun(idle, idle_rss, len(subscribers), results, settle_s)
        finally:
            await asyncio.gather(*(c.stop(15) for c in subscribers), return_exceptions=True)
            await worker.stop()
            await queue.redis.aclose()

    async def one_round(
        self,
        queue: RedisStreamsQueue,
        n: int,
        index: int,
        worker: WorkerUnderTest,
        subscribers: list[JsonChild],
    ) -> RoundResult:
        a = self.args
        tag = uuid.uuid4().hex[:8]
        count, warm = arrivals(n, a)
        jobs = [
            Job(channel=f"bench:{tag}-{i}", input=f"bench {n}x{index} {i} {tag}")
            for i in range(count)
        ]
        expected = {job.channel: answer_text(str(job.input), a.tokens) for job in jobs}
        tokens = sum(len(answer_tokens(str(job.input), a.tokens)) for job in jobs)
        models = {
            j.channel: model_seconds(str(j.input), a.tokens, a.tokens_per_second, a.first_token_ms)
            for j in jobs
        }
        # A burst: the slowest answer's model-only time, all enqueued at once. Steady: one
        # answer's (the median), and one job every model_s / N: about N in flight.
        steady = a.arrival == "steady"
        model_s = statistics.median(models.values()) if steady else max(models.values())
        interval = model_s / n if steady else 0.0
        timeout_s = interval * (count - 1) + max(models.values()) + ROUND_GRACE_S
        groups = [[j.channel for j in jobs[i :: len(subscribers)]] for i in range(len(subscribers))]
        ready_timeout_s = START_TIMEOUT_S + max(len(g) for g in groups) / 10
        for child, group in zip(subscribers, groups, strict=True):
            command = {
                "channels": group,
                "timeout_s": timeout_s,
                "ready_timeout_s": ready_timeout_s,
            }
            await child.send(json.dumps(command))
        readies = await asyncio.gather(*(c.read(ready_timeout_s + 10) for c in subscribers))
        if not_ready := [r.get("error", "?") for r in readies if not r.get("ready")]:
            raise RuntimeError(f"subscribers not attached in {ready_timeout_s:.0f} s: {not_ready}")
        await self.s.proxy.reset()
        worker.refresh()
        pids = {**self.s.pids, "subscribers": [c.proc.pid for c in subscribers]}
        if a.processes:
            pids["bench"] = [os.getpid()]
        memory = PeakSampler(worker.rss_kb)
        start = Meter.take(worker.cpu_s(), pids)
        memory.start()
        try:
            enqueued: dict[str, float] = {}
            first = time.monotonic()
            for i, job in enumerate(jobs):
                if (wait := first + i * interval - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                enqueued[job.channel] = time.monotonic()
                assert await queue.enqueue(job)
            report: dict[str, Any] = {"channels": {}}
            for part in await asyncio.gather(*(c.read(timeout_s + 10) for c in subscribers)):
                report["channels"].update(part["channels"])
            records = await self.wait_final(queue, [j.id for j in jobs], 10, worker)
            end = Meter.take(worker.cpu_s(), pids)
        finally:
            rss_peak = await memory.stop()
        stats = await self.s.proxy.stats()

        problems: list[str] = []
        ttft, gaps, ok, fragments, done_at, ratios = [], [], 0, 0, [], []
        parts: dict[str, list[float]] = {"pickup": [], "create_model": [], "other": []}
        for i, job in enumerate(jobs):
            seen = report["channels"][job.channel]
            texts = seen["texts"]
            if texts == [expected[job.channel]] and seen["status"] == "complete":
                ok += 1
            else:
                problems.append(
                    f"{job.channel}: status {seen['status']}, {len(texts)} message(s), text "
                    f"{'right' if expected[job.channel] in texts else 'wrong'}"
                )
            times = seen["fragments"]
            fragments += len(times)
            done_at.append(seen["done_at"] or end.wall)
            if i < warm:
                continue  # steady: on the way to N in flight, not measured
            ratios.append((done_at[-1] - enqueued[job.channel]) / models[job.channel])
            gaps.extend((b - a_) * 1000 for a_, b in itertools.pairwise(times))
            if seen["first_text_at"] is not None:
                ttft.append((seen["first_text_at"] - enqueued[job.channel]) * 1000)
            record = records[job.id]
            with contextlib.suppress(KeyError, ValueError, TypeError):
                started, worker_ttft = float(record["started_at"]), float(record["ttft_ms"])
                parts["pickup"].append(started - float(record["enqueued_at"]))
                parts["create_model"].append(worker_ttft - a.first_token_ms)
                parts["other"].append(seen["first_text_wall"] * 1000 - started - worker_ttft)
        states = [record.get("state", "missing") for record in records.values()]
        completed = states.count("completed")
        if completed < count:
            problems.append(f"job states: {sorted(states)}")
        retried = sum(1 for record in records.values() if _int(record.get("attempts")) > 1)
        if retried:
            problems.append(f"{retried} job(s) ran more than once (the worker's errors)")
        in_flight = float(n)  # a burst: N by construction
        t0, t1 = enqueued[jobs[warm].channel], enqueued[jobs[-1].channel]
        if steady and t1 > t0:
            # Each answer's time open (enqueued, not yet closed at its subscriber) within
            # the measured arrivals, over their span: how many were in flight, on average.
            open_s = sum(
                max(0.0, min(done, t1) - max(enqueued[job.channel], t0))
                for job, done in zip(jobs, done_at, strict=True)
            )
            in_flight = open_s / (t1 - t0)
        connections = stats["connections"].values()
        publishing = [c for c in connections if c["total"]["messages"] > 0]
        cpu = cpu_shares(start, end)
        return RoundResult(
            n=n,
            answers=count,
            wall_s=max(done_at) - min(enqueued.values()),
            model_s=model_s,
            answer_wall_over_model=ratios,
            in_flight=in_flight,
            ttft_ms=ttft,
            ttft_parts_ms=parts,
            fragment_gaps_ms=gaps,
            fragments=fragments,
            tokens=tokens,
            ok=ok,
            retried=retried,
            completed=completed,
            cpu={**cpu, "wall": end.wall - start.wall},
            subscriber_busiest_s=busiest(start, end, pids["subscribers"]),
            worker_busiest_s=busiest_worker(start, end),
            rss_peak_kb=rss_peak,
            connections_open=sum(1 for c in connections if c["open"]),
            connections_publishing=len(publishing),
            peak_per_connection=max((c["total"]["peak_counted_per_s"] for c in publishing),
                                    default=0),
            refused=sum(c["total"]["refused"] for c in connections),
            problems=problems,
        )  # fmt: skip


# --- report --------------------------------------------------------------------------------


def summarise(n: int, run: NRun, first_token_ms: float, arrival: str) -> dict[str, Any]:
    """One row: every round of one N together, with the worker's idle CPU and memory.
    Steady arrivals: wall/model is the measured answers' own (enqueue to closed over
    their model-only time), p95; a burst's is the round's (median over rounds)."""
    rounds, idle = run.rounds, run.idle_cpu
    ttft = [t for r in rounds for t in r.ttft_ms]
    over = [t - first_token_ms for t in ttft]
    gaps = [g for r in rounds for g in r.fragment_gaps_ms]
    walls = [r.wall_s for r in rounds]
    ratios = [r.wall_s / r.model_s for r in rounds]
    each = percentiles([x for r in rounds for x in r.answer_wall_over_model], 3)
    cpu_wall = sum(r.cpu["wall"] for r in rounds)
    cpu = {role: sum(r.cpu[role] for r in rounds) for role in rounds[0].cpu if role != "wall"}
    answers = sum(r.answers for r in rounds)
    tokens = sum(r.tokens for r in rounds)
    net_cpu = max(0.0, cpu["worker"] - idle * cpu_wall)
    rss_peak = max(r.rss_peak_kb for r in rounds)
    return {
        "n": n,
        "rounds": len(rounds),
        "answers": answers,
        "answers_measured": sum(len(r.answer_wall_over_model) for r in rounds),
        "in_flight": round(statistics.median(r.in_flight for r in rounds), 1),
        "ttft_ms": percentiles(ttft),
        "overhead_ms": percentiles(over),
        "overhead_parts_ms": {
            part: percentiles([v for r in rounds for v in r.ttft_parts_ms[part]])
            for part in rounds[0].ttft_parts_ms
        },
        "gap_ms": percentiles(gaps),
        "fragments_per_answer": round(sum(r.fragments for r in rounds) / answers, 1),
        "wall_s": round(statistics.median(walls), 2),
        "model_s": round(statistics.median(r.model_s for r in rounds), 2),
        "wall_over_model": each["p95"]
        if arrival == "steady"
        else round(statistics.median(ratios), 3),
        "answer_wall_over_model": each,
        "ok": sum(r.ok for r in rounds),
        "completed": sum(r.completed for r in rounds),
        "retried": sum(r.retried for r in rounds),
        "refused": sum(r.refused for r in rounds),
        "connections_open": max(r.connections_open for r in rounds),
        "connections_publishing": max(r.connections_publishing for r in rounds),
        "peak_counted_per_s_per_connection": max(r.peak_per_connection for r in rounds),
        "tokens": tokens,
        "worker_cpu_ms_per_answer": round(cpu["worker"] / answers * 1000, 1),
        "worker_idle_pct_of_core": round(100 * idle, 1),
        "worker_settle_s": run.settle_s,
        "worker_cpu_ms_per_answer_net": round(net_cpu / answers * 1000, 1),
        "worker_cpu_us_per_token": round(cpu["worker"] / tokens * 1e6, 1) if tokens else None,
        "worker_cpu_us_per_token_net": round(net_cpu / tokens * 1e6, 1) if tokens else None,
        "worker_rss_mb": {
            "idle": round(run.idle_rss_kb / 1024, 1),
            "peak": round(rss_peak / 1024, 1),
        },
        "memory_kb_per_answer": round((rss_peak - run.idle_rss_kb) / n, 1),
        "cpu_pct_of_core": {role: round(100 * s / cpu_wall, 1) for role, s in cpu.items()},
        "subscriber_processes": run.subscriber_processes,
        "subscriber_busiest_pct_of_core": round(
            100 * sum(r.subscriber_busiest_s for r in rounds) / cpu_wall, 1
        ),
        "worker_busiest_pct_of_core": round(
            100 * sum(r.worker_busiest_s for r in rounds) / cpu_wall, 1
        ),
        "problems": [p for r in rounds for p in r.problems],
    }


def with_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's figures against the N=1 row (the first row if there is no N=1)."""
    measured = [r for r in rows if "error" not in r]
    if not measured:
        return
    base = next((r for r in measured if r["n"] == 1), measured[0])

    def ratio(value: float | None, reference: float | None) -> float | None:
        return None if value is None or not reference else round(value / reference, 2)

    for row in measured:
        row["vs_n1"] = {
            "ttft_p50": ratio(row["ttft_ms"]["p50"], base["ttft_ms"]["p50"]),
            "overhead_p50": ratio(row["overhead_ms"]["p50"], base["overhead_ms"]["p50"]),
            "gap_p50": ratio(row["gap_ms"]["p50"], base["gap_ms"]["p50"]),
            "gap_p95": ratio(row["gap_ms"]["p95"], base["gap_ms"]["p95"]),
            "wall_over_model": ratio(row["wall_over_model"], base["wall_over_model"]),
            "worker_cpu_per_answer": ratio(
                row["worker_cpu_ms_per_answer"], base["worker_cpu_ms_per_answer"]
            ),
            "worker_cpu_per_answer_net": ratio(
                row["worker_cpu_ms_per_answer_net"], base["worker_cpu_ms_per_answer_net"]
            ),
        }


def _pq(p: dict[str, float | None]) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return f"{num(p['p50'])}/{num(p['p95'])}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(
        f"\nworker: {meta['worker']}; Sockudo {meta['sockudo']}, ably-python {meta['ably']}, "
        f"{meta['cpus']} CPUs, load average at start {meta['loadavg']}\n"
        f"arrival: {meta['arrival_detail']}\n"
        f"model: {meta['tokens']} tokens at {meta['tokens_per_second']:g}/s, first token "
        f"{meta['first_token_ms']:g} ms; streams per connection "
        f"{meta['streams_per_connection']}, budget {meta['messages_per_second']:g} msgs/s "
        "per connection\n"
    )
    good = [r for r in rows if "error" not in r]
    head = (
        f"{'N':>3} {'conc':>4} {'rnd':>3} {'conns':>7} {'ttft ms':>9} {'over ms':>9} "
        f"{'gap ms':>9} {'frag':>5} {'wall s':>6} {'model':>5} {'w/m':>5} {'peak/s':>6} "
        f"{'refu':>4} {'ok':>7} {'cpu ms':>6} {'net':>5} {'us/tok':>6} {'wrk%':>4} "
        f"{'idle%':>5} {'KB/ans':>6}"
    )
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['n']:>3} failed: {r['error']}")
            continue
        conns = f"{r['connections_publishing']}/{r['connections_open']}"
        print(
            f"{r['n']:>3} {r['concurrency']:>4} {r['rounds']:>3} {conns:>7} "
            f"{_pq(r['ttft_ms']):>9} {_pq(r['overhead_ms']):>9} {_pq(r['gap_ms']):>9} "
            f"{r['fragments_per_answer']:>5.0f} {r['wall_s']:>6.2f} {r['model_s']:>5.2f} "
            f"{r['wall_over_model']:>5.2f} {r['peak_counted_per_s_per_connection']:>6} "
            f"{r['refused']:>4} {r['ok']:>3}/{r['answers']:<3} "
            f"{r['worker_cpu_ms_per_answer']:>6.0f} {r['worker_cpu_ms_per_answer_net']:>5.0f} "
            f"{r['worker_cpu_us_per_token'] or 0:>6.0f} {r['cpu_pct_of_core']['worker']:>4.0f} "
            f"{r['worker_idle_pct_of_core']:>5.1f} {r['memory_kb_per_answer']:>6.0f}"
        )
    if not good:
        return
    print("\nagainst N=1 (p50 unless said)")
    print(
        f"{'N':>3} {'ttft':>6} {'over':>6} {'gap':>6} {'gap95':>6} {'w/m':>6} {'cpu/ans':>7} "
        f"{'net':>6}"
    )
    for r in good:
        v = r["vs_n1"]
        print(
            f"{r['n']:>3} {_x(v['ttft_p50']):>6} {_x(v['overhead_p50']):>6} "
            f"{_x(v['gap_p50']):>6} {_x(v['gap_p95']):>6} {_x(v['wall_over_model']):>6} "
            f"{_x(v['worker_cpu_per_answer']):>7} {_x(v['worker_cpu_per_answer_net']):>6}"
        )
    print("\nwhere the overhead goes (ms, p50/p95; wall clocks, so +-1 ms)")
    print(f"{'N':>3} {'over':>9} {'pickup':>9} {'create+model':>13} {'other':>9}")
    for r in good:
        parts = r["overhead_parts_ms"]
        print(
            f"{r['n']:>3} {_pq(r['overhead_ms']):>9} {_pq(parts['pickup']):>9} "
            f"{_pq(parts['create_model']):>13} {_pq(parts['other']):>9}"
        )
    print(
        "\nthe worker's memory (VmRSS, MB), memory per concurrent answer, and how long the "
        "fresh worker took to settle"
    )
    print(f"{'N':>3} {'idle':>7} {'peak':>7} {'KB/ans':>7} {'settle s':>8}")
    for r in good:
        m = r["worker_rss_mb"]
        print(
            f"{r['n']:>3} {m['idle']:>7.1f} {m['peak']:>7.1f} {r['memory_kb_per_answer']:>7.0f} "
            f"{r['worker_settle_s']:>8.1f}"
        )
    roles = [k for k in good[0]["cpu_pct_of_core"] if k != "worker"]
    print(
        "\nCPU while the answers streamed, % of one core (sub max: the busiest subscriber process)"
    )
    print(
        f"{'N':>3} "
        + " ".join(f"{role:>11}" for role in ["worker", *roles])
        + f" {'sub procs':>9} {'sub max':>7}"
    )
    for r in good:
        shares = r["cpu_pct_of_core"]
        print(
            f"{r['n']:>3} "
            + " ".join(f"{shares[k]:>11.0f}" for k in ["worker", *roles])
            + f" {r['subscriber_processes']:>9} {r['subscriber_busiest_pct_of_core']:>7.0f}"
        )
    print(
        "\nconc: WORKER_CONCURRENCY per worker process. conns: worker connections publishing in "
        "the round / open (the pool).\nttft: enqueue to the first text at a live subscriber, "
        "p50/p95; over: ttft minus the model's first-token delay\n(the worker's share). gap: "
        "between text fragments of one answer at the subscriber, p50/p95; frag: fragments\n"
        "per answer. wall: first enqueue to the last answer closed at the subscriber (median "
        "over rounds); model: the\nslowest answer's model-only time; w/m: their ratio. "
        "peak/s: the highest Ably-counted messages in one second on\none connection (limit "
        "50); refu: publishes the proxy refused as Ably would. ok: answers whose text equals\n"
        "answer_text, closed complete. cpu ms: the worker's CPU per answer; net: the same less "
        "what the worker burns\nwhen idle (idle%, measured before the rounds); us/tok: the "
        "worker's CPU per token streamed; wrk%: the worker's\nCPU over the rounds' wall time. "
        "KB/ans: (the worker's peak VmRSS while the answers streamed - its idle VmRSS) / N.\n"
        "rest: every other process on the machine. pickup: enqueue to taken (Redis timestamps);"
        " create+model: the\nworker's ttft_ms (the create publish and its ACK, the model "
        "request) less the model's first-token delay;\nother: the rest (the attach that "
        "listens for `cancel`, the first append's wait for a budget token, delivery\nto the "
        f"browser). The worker's CPU and memory: {meta['worker_cpu']}."
    )
    if meta["arrival"] == "steady":
        print(
            "Steady arrivals: ttft, over, its parts and gap are of the measured jobs only (ok, "
            "CPU and memory of the whole round); wall: first enqueue to the last answer "
            "closed;\nmodel: one answer's model-only time (the median; the pace is one job "
            "every model / N s); w/m: each measured answer's\nown enqueue to closed at its "
            "subscriber over its own model-only time, p95."
        )
        for r in good:
            print(
                f"  N={r['n']}: {r['in_flight']:.1f} answers open on average (enqueued, not yet "
                "closed at the subscriber) while the measured jobs arrived"
            )
    for r in good:
        for problem in r["problems"][:5]:
            print(f"  N={r['n']}: {problem}")
    for r in rows:
        for error, count in (r.get("worker_errors") or {}).items():
            print(f"  N={r['n']}: the worker logged job.error x{count}: {error}")


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent answers")
    p.add_argument("--tokens", type=int, default=200, help="answer length in tokens (about)")
    p.add_argument("--tokens-per-second", type=float, default=50.0, help="the model's pace")
    p.add_argument("--first-token-ms", type=float, default=200.0, help="the model's first token")
    p.add_argument(
        "--min-samples", type=int, default=8, help="rounds per N: enough for this many answers"
    )
    p.add_argument("--rounds", type=int, default=0, help="rounds per N (0: from --min-samples)")
    p.add_argument(
        "--arrival",
        choices=["burst", "steady"],
        default="burst",
        help="burst: N jobs enqueued at once; steady: one every model time / N (about N in "
        "flight), N warm jobs then max(N, --min-samples) measured",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help="0: the worker in this process; P: `python -m worker run` with P processes",
    )
    p.add_argument(
        "--launch",
        choices=["auto", "supervisor", "separate"],
        default="auto",
        help="P processes: one `worker run` with WORKER_PROCESSES=P (supervisor) or P of them "
        "(separate); auto: the supervisor if worker/supervisor.py exists",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="WORKER_CONCURRENCY per process (0: in-process max(N, default 16), else ceil(N/P))",
    )
    p.add_argument("--streams-per-connection", type=int, default=0, help="0: the default (3)")
    p.add_argument("--messages-per-second", type=float, default=0, help="0: the default (44)")
    p.add_argument(
        "--subscriber-processes",
        type=int,
        default=0,
        help=f"0: one per {SUBSCRIBERS_PER_PROCESS} channels",
    )
    p.add_argument(
        "--channels-per-connection",
        type=int,
        default=1,
        help="channels per subscriber Ably connection (1: one connection per browser)",
    )
    p.add_argument(
        "--settle-seconds",
        type=float,
        default=30.0,
        help="at most this long for a fresh worker's CPU to settle before the idle figures",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=2.0,
        help="the worker's idle CPU and memory, measured per N (after it settled)",
    )
    p.add_argument("--worker-log-level", default="INFO", help="the worker's LOG_LEVEL")
    p.add_argument("--worker-log", default=os.devnull, help="file for the worker's JSON log lines")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--harness-loop",
        choices=typing.get_args(eventloop.Kind),
        default="uvloop",
        help="the event loop of the local model server, the fault proxy and the subscribers",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.set_defaults(proxy_port=0)
    args = p.parse_args(argv)
    if args.processes < 0:
        p.error("--processes must be 0 or more")
    return args


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    defaults = Settings.model_fields
    mode = launch_mode(args)
    worker = {
        "in-process": "in the bench's process (worker.app.serve)",
        "one process": "`python -m worker run` with WORKER_PROCESSES=1",
        "supervisor": f"`python -m worker run` with WORKER_PROCESSES={args.processes}",
        "separate": f"{args.processes} x `python -m worker run` with WORKER_PROCESSES=1",
    }[mode]
    worker_cpu = (
        "time.process_time and VmRSS of the bench's own process (the worker, with the bench's "
        "small bookkeeping)"
        if mode == "in-process"
        else "the sums over the worker processes and their children, from /proc"
    )
    return {
        "sockudo": SOCKUDO_VERSION,
        "ably": version("ably"),
        "openai": version("openai"),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "processes": args.processes,
        "launch": mode,
        "arrival": args.arrival,
        "arrival_detail": ARRIVALS[args.arrival],
        "worker": worker,
        "tokens": args.tokens,
        "tokens_per_second": args.tokens_per_second,
        "harness_loop": args.harness_loop,
        "first_token_ms": args.first_token_ms,
        "streams_per_connection": args.streams_per_connection
        or defaults["streams_per_connection"].default,
        "messages_per_second": args.messages_per_second
        or defaults["ably_messages_per_second"].default,
        "subscribers": (
            f"child processes (one per {SUBSCRIBERS_PER_PROCESS} channels unless "
            f"--subscriber-processes), {args.channels_per_connection} channel(s) per Ably "
            "connection"
        ),
        "worker_cpu": worker_cpu,
        "memory": "VmRSS, idle after the warm-up and the peak while the answers stream, "
        f"sampled every {MEMORY_SAMPLE_S:g} s",
    }


def progress(text: str, args: argparse.Namespace, stream: Any) -> None:
    print(text, file=stream, flush=True)  # stderr: with --json too (stdout is the JSON)


def n_timeout_s(n: int, rounds: int, args: argparse.Namespace) -> float:
    """The most one N may take, everything included: a backstop behind each bounded wait."""
    model_s = args.first_token_ms / 1000 + args.tokens * 1.3 / max(args.tokens_per_second, 1)
    jobs = arrivals(n, args)[0]
    arriving = model_s * (jobs - 1) / n if args.arrival == "steady" else 0.0
    per_round = model_s + arriving + ROUND_GRACE_S + 2 * START_TIMEOUT_S + jobs / 10 + 30
    idle = args.settle_seconds + SETTLE_WINDOW_S + args.idle_seconds
    return 4 * START_TIMEOUT_S + idle + rounds * per_round + STOP_TIMEOUT_S + 30


def _last_error(log: Any) -> str:
    """The last error-level line of the worker's log, for a failed N's row."""
    with contextlib.suppress(Exception):
        log.flush()
        log.seek(0)
        lines = [line.strip() for line in log.read().splitlines() if line.strip()]
        errors = [line for line in lines if '"level": "error"' in line or "Error" in line]
        if errors or lines:
            return (errors or lines)[-1][:300]
    return ""


async def amain(args: argparse.Namespace) -> int:
    if args.child:
        await child_subscribers(json.loads(args.child))
        return 0
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    console = sys.stderr
    args.proxy_port = free_port()
    rows: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        redis = await stack.enter_async_context(LocalRedis())
        ably = await stack.enter_async_context(LocalAbly())
        model_pid, model_url = await stack.enter_async_context(
            helper_process(
                "worker.devstack.openai_local", "--port", "0",
                "--tokens", str(args.tokens),
                "--tokens-per-second", str(args.tokens_per_second),
                "--first-token-ms", str(args.first_token_ms),
                "--event-loop", args.harness_loop,
                ready="http",
            )
        )  # fmt: skip
        proxy_pid, _ = await stack.enter_async_context(
            helper_process(
                "worker.devstack.fault_proxy", "--upstream", ably.endpoint,
                "--port", str(args.proxy_port), "--enforce-rate-limits",
                "--event-loop", args.harness_loop,
                ready="fault proxy ready",
            )
        )  # fmt: skip
        proxy = ProxyControl(f"http://127.0.0.1:{args.proxy_port}")
        stack.push_async_callback(proxy.close)
        assert redis._proc is not None and ably._proc is not None
        pids = {
            "sockudo": [ably._proc.pid],
            "proxy": [proxy_pid],
            "model": [model_pid],
            "redis": [redis._proc.pid],
        }
        bench = Bench(Services(redis, ably, proxy, model_url, pids), args)
        meta = _meta(args)
        for n in args.n:
            rounds = rounds_for(n, args)
            progress(f"... N={n}: {rounds} round(s)", args, console)
            base = {"n": n, "processes": args.processes, "concurrency": concurrency(n, args)}
            with tempfile.TemporaryFile("w+") as worker_log:
                # An in-process worker logs to stderr: its lines go to --worker-log meanwhile.
                sys.stderr = worker_log
                try:
                    async with asyncio.timeout(n_timeout_s(n, rounds, args)):
                        run = await bench.run_n(n, rounds, worker_log)
                    rows.append({**base, **summarise(n, run, args.first_token_ms, args.arrival)})
                    rows[-1]["worker_errors"] = worker_errors(worker_log)
                except Exception as exc:  # the row says what failed; the next N runs
                    error = f"{type(exc).__name__}: {exc}"
                    if last := _last_error(worker_log):
                        error += f" (worker log: {last})"
                    rows.append(
                        {**base, "error": error, "worker_errors": worker_errors(worker_log)}
                    )
                finally:
                    sys.stderr = console
                    if args.worker_log != os.devnull:
                        worker_log.flush()
                        worker_log.seek(0)
                        args.log_stream.write(worker_log.read())
            if "error" in rows[-1]:
                progress(f"    N={n} failed: {rows[-1]['error']}", args, console)
    with_ratios(rows)
    if args.json:
        print(json.dumps({**meta, "rows": rows}, indent=2))
    else:
        print_report(rows, meta)
    return 0 if all(passed(r) for r in rows) else 1


def passed(row: dict[str, Any]) -> bool:
    """Every answer exact and complete, nothing refused, the N measured at all."""
    return "error" not in row and row["ok"] == row["answers"] and not row["refused"]


def run_script(amain: Callable[[argparse.Namespace], Awaitable[int]], args: Any) -> int:
    """A bench script's `main` once its arguments are read: the worker's JSON logs go to
    `--worker-log` (the SDK's INFO lines stay off), then `amain(args)`; 130 on Ctrl-C."""
    quiet_sdk_logs()
    if not args.child:
        configure_logging("json", args.worker_log_level)
        quiet_sdk_logs()
    try:
        with open(args.worker_log, "a") as args.log_stream:
            # The subscribers stand in for browsers: the loop they run on is the harness's.
            loop = json.loads(args.child).get("event_loop", "uvloop") if args.child else "asyncio"
            return eventloop.run(amain(args), loop)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


def main() -> int:
    return run_script(amain, parse_args())


if __name__ == "__main__":
    sys.exit(main())
