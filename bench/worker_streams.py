"""What a browser sees when one worker process streams N answers at once, N = 1, 4, 16, 32.

    uv run python bench/worker_streams.py [--n 1 4 16 32] [--json]

Starts its own local services on loopback: `LocalRedis`, `LocalAbly` (Sockudo), the local
OpenAI server (`python -m worker.devstack.openai_local`, its own process: 60 tokens/s,
first token after 200 ms, answers of about 200 tokens) and the fault proxy
(`python -m worker.devstack.fault_proxy --enforce-rate-limits`, its own process) between
the worker and Sockudo, which counts every worker connection's messages the way Ably's
rate limits do (appends to one message inside the 40 ms rollup window count once) and
refuses what Ably would refuse.

For each N it runs the real worker in this process (`worker.app.serve`, default settings:
STREAMS_PER_CONNECTION=4, a budget of 45 messages/s per connection; WORKER_CONCURRENCY
the default 16, or N when N is larger, so that all N answers run at once), warms it up
with one short job, then for one or more rounds enqueues N jobs, each answering on its
own channel, while a live subscriber per channel (one Ably connection each, as N
browsers would have) runs in a child process of this script. It reports:

- ttft: from the enqueue to the first non-empty text the subscriber receives (p50/p95);
  `over`: the same minus the model's own first-token delay, i.e. the worker's overhead,
  split into pickup (enqueue to taken, from Redis' timestamps), create+model (the
  worker's own ttft_ms less the model's delay: the create publish and its ACK, the model
  request) and other (the attach that listens for `cancel`, the first append's wait for a
  budget token, delivery to the browser);
- gap: the time between text fragments the subscriber receives within one answer
  (p50/p95): how smooth the stream looks (one fragment per append the worker sent);
- wall: from the first enqueue to the last answer closed (`status: complete`) at the
  subscriber, against the model-only time (the slowest answer's first-token delay plus
  its tokens at the model's pace), as a ratio; every answer checked against
  `answer_text` (`ok`), every job `completed` in Redis;
- the worker's Ably connections (open, and publishing in the round), the highest count
  of Ably-counted messages in any one-second window on any one connection, and how many
  the proxy refused (over 50/s per connection or channel);
- CPU: the worker's (this process, `time.process_time`: the worker alone, since the
  subscribers, the model server and the proxy are other processes) per answer and as a
  share of one core, and the other processes' shares (Sockudo, the subscribers, the
  proxy, the model server, Redis, the rest of the machine).

Ratios against N=1 close the table. The rounds per N are enough to give `--min-samples`
answers (8: eight rounds of one answer, two of four, one of 16 or 32). Every wait is
bounded; a default run takes about 60 s. Exit status 1 if an answer was wrong or a
publish refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cpu_clock import process_cpu_s, system_busy_s  # bench/, the script's folder
from json_child import JsonChild

from worker.app import serve
from worker.devstack.ably import LocalAbly
from worker.devstack.openai_local.text import answer_text, delta_groups
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
START_TIMEOUT_S = 30.0  # a server or the worker getting ready
ROUND_GRACE_S = 30.0  # on top of the model-only time, for one round to finish
DONE_STATUSES = ("complete", "failed", "cancelled")
APPEND = 5  # MessageAction.MESSAGE_APPEND
REPORT_LIMIT_BYTES = 64 * 1024 * 1024  # the subscribers' report: one line, every text in it


# --- CPU clocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Meter:
    """The clocks at one moment: wall, this process (the worker), each helper process."""

    wall: float
    worker: float
    others: dict[str, float]  # by role: sockudo, subscribers, proxy, model, redis
    busy: float

    @classmethod
    def take(cls, pids: dict[str, int]) -> Meter:
        return cls(
            time.monotonic(),
            time.process_time(),
            {role: process_cpu_s(pid) for role, pid in pids.items()},
            system_busy_s(),
        )


def cpu_shares(start: Meter, end: Meter) -> dict[str, float]:
    """CPU seconds per role between two meters, `rest` being the rest of the machine."""
    shares = {"worker": end.worker - start.worker}
    shares.update({role: end.others[role] - start.others[role] for role in start.others})
    shares["rest"] = max(0.0, end.busy - start.busy - sum(shares.values()))
    return shares


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    if len(values) == 1:
        return {"p50": round(values[0], 1), "p95": round(values[0], 1)}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 1), "p95": round(q[94], 1)}


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
    """`--child`: for each command line {"channels": [...], "timeout_s": t}, connect one
    client per channel, attach, say ready, wait until every answer is closed (or the
    timeout), report what each saw, close the clients. (Its CPU is read from /proc.)"""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        channels: list[str] = command["channels"]
        watches = {name: Watch() for name in channels}
        clients = [realtime_client(spec["key"], spec["endpoint"]) for _ in channels]
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.gather(
                    *(
                        c.channels.get(name).subscribe(watches[name].on_message)
                        for c, name in zip(clients, channels, strict=True)
                    )
                )
            _emit({"ready": True})
            deadline = time.monotonic() + command["timeout_s"]
            while time.monotonic() < deadline:
                if all(w.done_at is not None for w in watches.values()):
                    break
                await asyncio.sleep(0.02)
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


# --- one N ---------------------------------------------------------------------------------


@dataclass
class Services:
    redis: LocalRedis
    ably: LocalAbly
    proxy: ProxyControl
    model_base_url: str
    pids: dict[str, int]
    child: JsonChild


@dataclass
class RoundResult:
    n: int
    wall_s: float
    model_s: float
    ttft_ms: list[float]
    # Where the overhead went, from Redis' timestamps and the worker's own ttft_ms: pickup
    # (enqueue to taken), create_model (the worker's ttft less the model's first-token
    # delay: the create publish and its ACK, the model request), other (the rest: the
    # attach that listens for `cancel`, the first append's wait for a token, delivery).
    ttft_parts_ms: dict[str, list[float]]
    fragment_gaps_ms: list[float]
    fragments: int
    ok: int
    completed: int
    cpu: dict[str, float]
    connections_open: int
    connections_publishing: int
    peak_per_connection: int
    refused: int
    problems: list[str]


def model_seconds(prompt: str, tokens: int, tps: float, first_token_ms: float) -> float:
    """When the local model sends its last delta: first token, then the rest at its pace."""
    groups = delta_groups(prompt, tokens)
    before_last = sum(len(g) for g in groups[:-1])
    return first_token_ms / 1000 + (before_last / tps if tps > 0 else 0.0)


def concurrency(n: int, args: argparse.Namespace) -> int:
    """WORKER_CONCURRENCY for N answers: --concurrency, else the default or N if larger."""
    return int(args.concurrency or max(n, Settings.model_fields["worker_concurrency"].default))


class Bench:
    def __init__(self, services: Services, args: argparse.Namespace) -> None:
        self.s = services
        self.args = args
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"

    def settings(self, n: int) -> Settings:
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
        return load_settings(Settings, **values)

    def queue(self) -> RedisStreamsQueue:
        return RedisStreamsQueue(connect_redis(self.s.redis.url), prefix=self.prefix, consumer="b")

    async def wait_final(
        self, queue: RedisStreamsQueue, job_ids: Iterable[str], timeout: float
    ) -> dict[str, dict[str, str]]:
        """Each job's record once its state is final (or as it is at the timeout)."""
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
            await asyncio.sleep(0.05)
        return records

    async def warm_up(self, queue: RedisStreamsQueue) -> None:
        """One short, fast job: the worker is connected and its code paths are warm."""
        meta = {"local_tokens": "20", "local_tokens_per_second": "0", "local_first_token_ms": "0"}
        job = Job(channel=f"bench:warm-{uuid.uuid4().hex[:8]}", input="warm up", metadata=meta)
        assert await queue.enqueue(job)
        records = await self.wait_final(queue, [job.id], START_TIMEOUT_S)
        if records[job.id].get("state") != "completed":
            raise RuntimeError(f"the worker did not complete a warm-up job: {records}")

    async def run_n(self, n: int, rounds: int) -> tuple[float, list[RoundResult]]:
        """Start a worker for N, warm it up, measure its idle CPU (share of a core), then
        run the rounds; the worker is stopped (drained) at the end."""
        stop = asyncio.Event()
        task = asyncio.create_task(serve(self.settings(n), stop, handle_signals=False))
        queue = self.queue()
        try:
            await queue.ensure_group()
            warm = asyncio.create_task(self.warm_up(queue))
            done, _ = await asyncio.wait({task, warm}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                warm.cancel()
                task.result()  # raises what stopped the worker
                raise RuntimeError("the worker stopped during the warm-up")
            warm.result()
            idle_start = Meter.take({})
            await asyncio.sleep(self.args.idle_seconds)
            idle_end = Meter.take({})
            idle_wall = idle_end.wall - idle_start.wall
            idle = (idle_end.worker - idle_start.worker) / idle_wall if idle_wall > 0.1 else 0.0
            return idle, [await self.one_round(queue, n, r) for r in range(rounds)]
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
            await queue.redis.aclose()

    async def one_round(self, queue: RedisStreamsQueue, n: int, index: int) -> RoundResult:
        a = self.args
        tag = uuid.uuid4().hex[:8]
        jobs = [
            Job(channel=f"bench:{tag}-{i}", input=f"bench {n}x{index} {i} {tag}") for i in range(n)
        ]
        expected = {job.channel: answer_text(str(job.input), a.tokens) for job in jobs}
        model_s = max(
            model_seconds(str(j.input), a.tokens, a.tokens_per_second, a.first_token_ms)
            for j in jobs
        )
        timeout_s = model_s + ROUND_GRACE_S
        await self.s.child.send(
            json.dumps({"channels": [j.channel for j in jobs], "timeout_s": timeout_s})
        )
        await self.s.child.read(START_TIMEOUT_S)  # attached
        await self.s.proxy.reset()
        start = Meter.take(self.s.pids)
        enqueued: dict[str, float] = {}
        for job in jobs:
            enqueued[job.channel] = time.monotonic()
            assert await queue.enqueue(job)
        report = await self.s.child.read(timeout_s + 10)
        records = await self.wait_final(queue, [j.id for j in jobs], 10)
        end = Meter.take(self.s.pids)
        stats = await self.s.proxy.stats()

        problems: list[str] = []
        ttft, gaps, ok, fragments, done_at = [], [], 0, 0, []
        parts: dict[str, list[float]] = {"pickup": [], "create_model": [], "other": []}
        for job in jobs:
            seen = report["channels"][job.channel]
            texts = seen["texts"]
            if texts == [expected[job.channel]] and seen["status"] == "complete":
                ok += 1
            else:
                problems.append(
                    f"{job.channel}: status {seen['status']}, {len(texts)} message(s), text "
                    f"{'right' if expected[job.channel] in texts else 'wrong'}"
                )
            if seen["first_text_at"] is not None:
                ttft.append((seen["first_text_at"] - enqueued[job.channel]) * 1000)
            record = records[job.id]
            with contextlib.suppress(KeyError, ValueError, TypeError):
                started, worker_ttft = float(record["started_at"]), float(record["ttft_ms"])
                parts["pickup"].append(started - float(record["enqueued_at"]))
                parts["create_model"].append(worker_ttft - a.first_token_ms)
                parts["other"].append(seen["first_text_wall"] * 1000 - started - worker_ttft)
            times = seen["fragments"]
            fragments += len(times)
            gaps.extend((b - a_) * 1000 for a_, b in itertools.pairwise(times))
            done_at.append(seen["done_at"] or end.wall)
        states = [record.get("state", "missing") for record in records.values()]
        completed = states.count("completed")
        if completed < n:
            problems.append(f"job states: {sorted(states)}")
        connections = stats["connections"].values()
        publishing = [c for c in connections if c["total"]["messages"] > 0]
        cpu = cpu_shares(start, end)
        return RoundResult(
            n=n,
            wall_s=max(done_at) - min(enqueued.values()),
            model_s=model_s,
            ttft_ms=ttft,
            ttft_parts_ms=parts,
            fragment_gaps_ms=gaps,
            fragments=fragments,
            ok=ok,
            completed=completed,
            cpu={**cpu, "wall": end.wall - start.wall},
            connections_open=sum(1 for c in connections if c["open"]),
            connections_publishing=len(publishing),
            peak_per_connection=max((c["total"]["peak_counted_per_s"] for c in publishing),
                                    default=0),
            refused=sum(c["total"]["refused"] for c in connections),
            problems=problems,
        )  # fmt: skip


# --- report --------------------------------------------------------------------------------


def summarise(
    n: int, idle: float, rounds: list[RoundResult], first_token_ms: float
) -> dict[str, Any]:
    """One row: every round of one N together; `idle`: the worker's CPU share when idle."""
    ttft = [t for r in rounds for t in r.ttft_ms]
    over = [t - first_token_ms for t in ttft]
    gaps = [g for r in rounds for g in r.fragment_gaps_ms]
    walls = [r.wall_s for r in rounds]
    ratios = [r.wall_s / r.model_s for r in rounds]
    cpu_wall = sum(r.cpu["wall"] for r in rounds)
    cpu = {role: sum(r.cpu[role] for r in rounds) for role in rounds[0].cpu if role != "wall"}
    answers = n * len(rounds)
    return {
        "n": n,
        "rounds": len(rounds),
        "answers": answers,
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
        "wall_over_model": round(statistics.median(ratios), 3),
        "ok": sum(r.ok for r in rounds),
        "completed": sum(r.completed for r in rounds),
        "refused": sum(r.refused for r in rounds),
        "connections_open": max(r.connections_open for r in rounds),
        "connections_publishing": max(r.connections_publishing for r in rounds),
        "peak_counted_per_s_per_connection": max(r.peak_per_connection for r in rounds),
        "worker_cpu_ms_per_answer": round(cpu["worker"] / answers * 1000, 1),
        "worker_idle_pct_of_core": round(100 * idle, 1),
        "worker_cpu_ms_per_answer_net": round(
            max(0.0, cpu["worker"] - idle * cpu_wall) / answers * 1000, 1
        ),
        "cpu_pct_of_core": {role: round(100 * s / cpu_wall, 1) for role, s in cpu.items()},
        "problems": [p for r in rounds for p in r.problems],
    }


def with_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's figures against the N=1 row (the first row if there is no N=1)."""
    base = next((r for r in rows if r["n"] == 1), rows[0])

    def ratio(value: float | None, reference: float | None) -> float | None:
        return None if value is None or not reference else round(value / reference, 2)

    for row in rows:
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
        f"\nworker in-process; Sockudo {meta['sockudo']}, ably-python {meta['ably']}, "
        f"{meta['cpus']} CPUs, load average at start {meta['loadavg']}\n"
        f"model: {meta['tokens']} tokens at {meta['tokens_per_second']:g}/s, first token "
        f"{meta['first_token_ms']:g} ms; streams per connection "
        f"{meta['streams_per_connection']}, budget {meta['messages_per_second']:g} msgs/s "
        "per connection\n"
    )
    head = (
        f"{'N':>3} {'conc':>4} {'rnd':>3} {'conns':>5} {'ttft ms':>9} {'over ms':>9} "
        f"{'gap ms':>9} {'frag':>5} {'wall s':>6} {'model':>5} {'w/m':>5} {'peak/s':>6} "
        f"{'refu':>4} {'ok':>7} {'cpu ms':>6} {'net':>5} {'wrk%':>4} {'idle%':>5}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['n']:>3} {r['concurrency']:>4} {r['rounds']:>3} "
            f"{r['connections_publishing']:>2}/{r['connections_open']:<2} "
            f"{_pq(r['ttft_ms']):>9} {_pq(r['overhead_ms']):>9} {_pq(r['gap_ms']):>9} "
            f"{r['fragments_per_answer']:>5.0f} {r['wall_s']:>6.2f} {r['model_s']:>5.2f} "
            f"{r['wall_over_model']:>5.2f} {r['peak_counted_per_s_per_connection']:>6} "
            f"{r['refused']:>4} {r['ok']:>3}/{r['answers']:<3} "
            f"{r['worker_cpu_ms_per_answer']:>6.0f} {r['worker_cpu_ms_per_answer_net']:>5.0f} "
            f"{r['cpu_pct_of_core']['worker']:>4.0f} {r['worker_idle_pct_of_core']:>5.1f}"
        )
    print("\nagainst N=1 (p50 unless said)")
    print(
        f"{'N':>3} {'ttft':>6} {'over':>6} {'gap':>6} {'gap95':>6} {'w/m':>6} {'cpu/ans':>7} "
        f"{'net':>6}"
    )
    for r in rows:
        v = r["vs_n1"]
        print(
            f"{r['n']:>3} {_x(v['ttft_p50']):>6} {_x(v['overhead_p50']):>6} "
            f"{_x(v['gap_p50']):>6} {_x(v['gap_p95']):>6} {_x(v['wall_over_model']):>6} "
            f"{_x(v['worker_cpu_per_answer']):>7} {_x(v['worker_cpu_per_answer_net']):>6}"
        )
    print("\nwhere the overhead goes (ms, p50/p95; wall clocks, so +-1 ms)")
    print(f"{'N':>3} {'over':>9} {'pickup':>9} {'create+model':>13} {'other':>9}")
    for r in rows:
        parts = r["overhead_parts_ms"]
        print(
            f"{r['n']:>3} {_pq(r['overhead_ms']):>9} {_pq(parts['pickup']):>9} "
            f"{_pq(parts['create_model']):>13} {_pq(parts['other']):>9}"
        )
    roles = [k for k in rows[0]["cpu_pct_of_core"] if k != "worker"]
    print("\nCPU while the answers streamed, % of one core")
    print(f"{'N':>3} " + " ".join(f"{role:>11}" for role in ["worker", *roles]))
    for r in rows:
        shares = r["cpu_pct_of_core"]
        print(f"{r['n']:>3} " + " ".join(f"{shares[k]:>11.0f}" for k in ["worker", *roles]))
    print(
        "\nconns: worker connections publishing in the round / open (the pool). ttft: enqueue "
        "to the first text at a live\nsubscriber, p50/p95; over: ttft minus the model's "
        "first-token delay (the worker's share). gap: between text\nfragments of one answer "
        "at the subscriber, p50/p95; frag: fragments per answer. wall: first enqueue to the\n"
        "last answer closed at the subscriber (median over rounds); model: the slowest "
        "answer's model-only time;\nw/m: their ratio. peak/s: the highest Ably-counted "
        "messages in one second on one connection (limit 50);\nrefu: publishes the proxy "
        "refused as Ably would. ok: answers whose text equals answer_text, closed complete.\n"
        "cpu ms: the worker's CPU per answer (this process: the subscribers, model server and "
        "proxy run elsewhere);\nnet: the same less what the worker burns when idle (idle%, "
        "measured before the rounds); wrk%: the\nworker's CPU over the rounds' wall time. "
        "rest: every other process on the machine.\npickup: enqueue to taken (Redis "
        "timestamps); create+model: the worker's ttft_ms (the create publish and its ACK,\n"
        "the model request) less the model's first-token delay; other: the rest (the attach "
        "that listens for\n`cancel`, the first append's wait for a budget token, delivery "
        "to the browser)."
    )
    for r in rows:
        for problem in r["problems"][:5]:
            print(f"  N={r['n']}: {problem}")


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent answers")
    p.add_argument("--tokens", type=int, default=200, help="answer length in tokens (about)")
    p.add_argument("--tokens-per-second", type=float, default=60.0, help="the model's pace")
    p.add_argument("--first-token-ms", type=float, default=200.0, help="the model's first token")
    p.add_argument(
        "--min-samples", type=int, default=8, help="rounds per N: enough for this many answers"
    )
    p.add_argument("--rounds", type=int, default=0, help="rounds per N (0: from --min-samples)")
    p.add_argument(
        "--concurrency", type=int, default=0, help="WORKER_CONCURRENCY (0: max(N, default 16))"
    )
    p.add_argument("--streams-per-connection", type=int, default=0, help="0: the default (4)")
    p.add_argument("--messages-per-second", type=float, default=0, help="0: the default (45)")
    p.add_argument(
        "--idle-seconds", type=float, default=1.0, help="the worker's idle CPU, measured per N"
    )
    p.add_argument("--worker-log-level", default="INFO", help="the worker's LOG_LEVEL")
    p.add_argument("--worker-log", default=os.devnull, help="file for the worker's JSON log lines")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.set_defaults(proxy_port=0)
    return p.parse_args(argv)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    defaults = Settings.model_fields
    return {
        "sockudo": SOCKUDO_VERSION,
        "ably": version("ably"),
        "openai": version("openai"),
        "cpus": os.cpu_count(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "tokens": args.tokens,
        "tokens_per_second": args.tokens_per_second,
        "first_token_ms": args.first_token_ms,
        "streams_per_connection": args.streams_per_connection
        or defaults["streams_per_connection"].default,
        "messages_per_second": args.messages_per_second
        or defaults["ably_messages_per_second"].default,
        "subscribers": "a child process, one Ably connection per channel",
        "worker_cpu": "time.process_time of this process (the worker alone)",
    }


def progress(text: str, args: argparse.Namespace, stream: Any) -> None:
    if not args.json:
        print(text, file=stream, flush=True)


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
                ready="http",
            )
        )  # fmt: skip
        proxy_pid, _ = await stack.enter_async_context(
            helper_process(
                "worker.devstack.fault_proxy", "--upstream", ably.endpoint,
                "--port", str(args.proxy_port), "--enforce-rate-limits",
                ready="fault proxy ready",
            )
        )  # fmt: skip
        proxy = ProxyControl(f"http://127.0.0.1:{args.proxy_port}")
        stack.push_async_callback(proxy.close)
        spec = {"key": ably.key, "endpoint": ably.endpoint}
        child = await JsonChild.start(
            SCRIPT, spec, "subscriber process", limit=REPORT_LIMIT_BYTES, **server_process_options()
        )
        stack.push_async_callback(child.stop, 15)
        assert redis._proc is not None and ably._proc is not None
        pids = {
            "sockudo": ably._proc.pid,
            "subscribers": child.proc.pid,
            "proxy": proxy_pid,
            "model": model_pid,
            "redis": redis._proc.pid,
        }
        services = Services(redis, ably, proxy, model_url, pids, child)
        bench = Bench(services, args)
        meta = _meta(args)
        log_file = args.log_stream
        for n in args.n:
            rounds = args.rounds or max(1, math.ceil(args.min_samples / n))
            progress(f"... N={n}: {rounds} round(s)", args, console)
            # The worker logs to stderr: send its lines to --worker-log meanwhile.
            sys.stderr = log_file
            try:
                idle, results = await bench.run_n(n, rounds)
            finally:
                sys.stderr = console
            row = summarise(n, idle, results, args.first_token_ms)
            row["concurrency"] = concurrency(n, args)
            rows.append(row)
    with_ratios(rows)
    if args.json:
        print(json.dumps({**meta, "rows": rows}, indent=2))
    else:
        print_report(rows, meta)
    return 0 if all(r["ok"] == r["answers"] and not r["refused"] for r in rows) else 1


def main() -> int:
    args = parse_args()
    quiet_sdk_logs()
    if not args.child:
        configure_logging("json", args.worker_log_level)
        quiet_sdk_logs()
    try:
        with open(args.worker_log, "a") as args.log_stream:
            return asyncio.run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


if __name__ == "__main__":
    sys.exit(main())
