"""Issue 15, measured: the two claims about how an answer is published, as ratios.

    uv run python bench/patterns.py [--json] [--only appends conversation]

Starts its own local services on loopback: `LocalAbly` (Sockudo; with history pages of up
to 1000 messages as Ably serves them: Sockudo's default, kept by `LocalAbly`, is 100 and
is the only setting changed, see `LocalAblyLongPages`), the fault proxy as a
process (`python -m worker.devstack.fault_proxy --latency-ms 50 --enforce-rate-limits`)
between the publishers and Sockudo, a child process of this script holding the live
subscribers (connected to Sockudo directly, not through the proxy), and for the second
part `LocalRedis` and the local OpenAI server (`python -m worker.devstack.openai_local`).
Every Ably client is ably-python (`worker.transport.client`), as the worker's are.

Part 1, `appends`: un-awaited vs awaited appends, with `--latency-ms` of round trip
between publisher and Sockudo. The same model deltas (one token each, `answer_tokens`:
`--tokens` of them per stream) are streamed into one message per stream two ways:

- `unawaited`: the product's way, the real `ResponseStream` on a connection of the real
  `ConnectionPool` (`worker.app.make_pool` with the worker's default settings: 16 slots,
  4 streams a connection, so 4 connections), paced by the `Lease` the pool gives it (a
  budget of 44 messages/s a connection and a channel, appends coalesced, at most one per
  40 ms rollup window): create, un-awaited appends, one closing update;
- `awaited`: the naive way on the same kind of pool (same connections, same layout of
  streams on them, no budget): the same create, then `await channel.append_message(...)`
  for each delta before sending the next (one append per delta, in order; a delta that
  arrives meanwhile waits in a queue), then the same closing update. A publish Ably
  refuses (42911) is counted and retried after 100 ms, so the text stays whole.

The model produces the deltas in this process, either at `--tokens-per-second` (50:
`paced`) or all at once (`full`: `--tokens` deltas produced in one go), and each stream is
on its own channel, `--streams` of them at once (1 and 8). For each it reports:

- tok/s: model deltas reflected at the subscriber per second, per stream: deltas / (the
  last delta seen at the subscriber - the first delta produced); median over streams;
- delay: model delta to subscriber, p50/p95 over every delta of every stream: from the
  moment the model produced it to the moment a live subscriber (its own connection to
  Sockudo) first held text containing it (whatever message carried it: an append or the
  closing update). Both processes read CLOCK_MONOTONIC, one clock on Linux;
- sent: append messages per stream; counted: Ably-counted messages per stream (create,
  appends rolled up inside 40 ms, close: the proxy's count); peak/s: the highest counted
  in one second on one connection (Ably's limit: 50); refused: publishes the proxy
  refused as Ably would (must be 0 for `unawaited`); ok: streams whose subscriber ended
  with exactly the model's text and `status: complete`;
- ratios un-awaited / awaited (tok/s: higher is better; delay: lower is better).

Part 2, `conversation`: message per response vs message per token, with the real
worker (`worker.app.serve` in this process, default settings, through the proxy with no
added latency). `--answers` (100) jobs are enqueued at once on ONE channel (a
conversation), once with the job pattern `message-per-response` (the default) and once
with `message-per-token` (`worker.jobs.Pattern`); the local model answers `--answer-tokens`
(40) tokens each at `--tokens-per-second`. It reports per pattern:

- msgs/ans: messages the worker published on the channel per answer (the proxy's count
  of messages inside the worker's publishes), and Ably-counted ones;
- history: the channel's history once every job completed: messages, and bytes as the
  REST answers carried them (JSON, as a browser's ably-js asks for: `use_binary_protocol`
  off), and the pages they took;
- late joiner: a fresh REST client (already authenticated) reads the channel's history
  newest first in pages of `--page-size` (1000, the most Ably gives; the project's own
  readers ask for 100: `worker.transport.lookup`, `web/app.js`), paging as `lookup` does,
  until it has every answer (`message-per-response`: every answer's message closed
  `complete`; `message-per-token`: every answer's `start`), then builds the texts oldest
  first with
  `worker.watch.Transcript` (the terminal front end's rule: create sets, append adds,
  update replaces; start resets, token adds, stop replaces) and, for message per token,
  also by concatenating the `token` messages alone. Timed from the first history request
  to the texts built, median of `--late-reads` reads, on loopback and through the proxy
  with `--latency-ms` of round trip (a browser's distance from Ably). Every text is
  checked against `answer_text`;
- ratios per-token / per-response.

Options: `--only appends|conversation` (both by default), `--latency-ms` (50), `--tokens`
(300 deltas per stream in part 1), `--tokens-per-second` (50), `--streams` (1 8),
`--speeds` (paced full), `--answers` (100), `--answer-tokens` (40), `--late-reads` (3),
`--page-size` (1000), `--worker-log` (a file for the worker's JSON log lines; none by
default), `--worker-log-level` (INFO), `--json` (one JSON object on stdout instead of
tables: `meta`; `appends.rows` and `appends.unawaited_over_awaited`;
`conversation.patterns` by pattern and `conversation.per_token_over_per_response`;
`problems`, the failed checks). Progress goes to stderr.

It borrows `helper_process`, `ProxyControl` and `percentiles` from `worker_streams.py`.

Every wait is bounded; a default run takes about 3 minutes. Exit status 1 if a check
failed: a wrong or missing text (either part, either way), a publish of ours refused
(part 1 `unawaited`, part 2 both patterns), a job not completed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ably import AblyException
from cpu_clock import process_cpu_s, system_busy_s  # bench/, the script's folder
from json_child import JsonChild
from worker_streams import ProxyControl, helper_process, percentiles, run_script

import worker.devstack.ably as local_ably
from worker.app import make_pool, serve, wait_connected
from worker.devstack.ably import LocalAbly
from worker.devstack.openai_local.text import answer_text, answer_tokens
from worker.devstack.ports import free_port
from worker.devstack.processes import server_process_options
from worker.devstack.redis_server import LocalRedis
from worker.devstack.sockudo_install import SOCKUDO_VERSION
from worker.jobs import Job, Pattern
from worker.queue import RedisStreamsQueue
from worker.redis_client import connect_redis
from worker.settings import Settings, load_settings
from worker.transport import contract
from worker.transport.client import realtime_client, rest_client
from worker.transport.contract import Headers, Status
from worker.transport.pool import ConnectionPool
from worker.transport.response_stream import ResponseStream
from worker.watch import Transcript

SCRIPT = str(Path(__file__).resolve())
START_TIMEOUT_S = 30.0  # a server, a pool or the worker getting ready
ACK_TIMEOUT_S = 15.0  # one awaited publish
GRACE_S = 30.0  # on top of the expected time of a case
APPEND = 5  # MessageAction.MESSAGE_APPEND
RATE_LIMITED = 42911  # the proxy's NACK for what Ably would refuse
RETRY_REFUSED_S = 0.1
MAX_RETRIES = 50
ABLY_MAX_PAGE = 1000  # the most Ably (and the SDK) give in one history page
HISTORY_CAP = 10_000  # LocalAbly's max_messages_per_channel
MODES = ("unawaited", "awaited")
PATTERNS = (Pattern.MESSAGE_PER_RESPONSE, Pattern.MESSAGE_PER_TOKEN)
REPORT_LIMIT_BYTES = 64 * 1024 * 1024


# --- the local Ably, serving history pages as long as Ably's ---------------------------


class LocalAblyLongPages(LocalAbly):
    """`LocalAbly` with Sockudo's `history.max_page_size` at Ably's 1000 (Sockudo's
    default, which `LocalAbly`'s configuration keeps, is 100: asked for 1000 messages a
    page, it sends 100). Only the history page size differs from the product's dev stack."""

    def start(self) -> None:
        render = local_ably.render_config

        def long_pages(*args: Any, **kwargs: Any) -> str:
            config = render(*args, **kwargs)
            assert "[history]\n" in config, "LocalAbly's configuration has no [history] table"
            return config.replace("[history]\n", f"[history]\nmax_page_size = {ABLY_MAX_PAGE}\n")

        local_ably.render_config = long_pages
        try:
            super().start()
        finally:
            local_ably.render_config = render


# --- CPU: was the machine busy with something else? ------------------------------------


@dataclass(frozen=True)
class Meter:
    wall: float
    own: float  # this process: the publishers (part 1) or the worker (part 2)
    helpers: float  # Sockudo, the proxy, the subscribers, the model server, Redis
    busy: float  # the whole machine

    @classmethod
    def take(cls, pids: list[int]) -> Meter:
        return cls(
            time.monotonic(),
            time.process_time(),
            sum(process_cpu_s(pid) for pid in pids),
            system_busy_s(),
        )


def cpu_pct(start: Meter, end: Meter) -> dict[str, float]:
    """% of one core over the interval: this process, the bench's helpers, the rest."""
    wall = max(end.wall - start.wall, 1e-9)
    own, helpers = end.own - start.own, end.helpers - start.helpers
    rest = max(0.0, end.busy - start.busy - own - helpers)
    return {
        "this_process": round(100 * own / wall, 1),
        "helpers": round(100 * helpers / wall, 1),
        "rest_of_machine": round(100 * rest / wall, 1),
    }


# --- the live subscribers (a child process) ---------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@dataclass
class Reader:
    """One browser on one channel: the text per message serial, and when it grew."""

    timeline: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, chars)
    texts: dict[str, str] = field(default_factory=dict)
    status: str | None = None

    def on_message(self, message: Any) -> None:
        now = time.monotonic()
        serial = str(message.serial)
        data = message.data if isinstance(message.data, str) else None
        if message.action == APPEND:
            self.texts[serial] = self.texts.get(serial, "") + (data or "")
        elif data is not None:
            self.texts[serial] = data
        chars = len(self.texts.get(serial, ""))
        if not self.timeline or chars > self.timeline[-1][1]:
            self.timeline.append((now, chars))
        status = contract.header(message, "status")
        if status and status != Status.STREAMING:
            self.status = status


async def child_subscribers(spec: dict[str, Any]) -> None:
    """`--child`: per command line {"channels": [...], "timeout_s": t}, one client per
    channel (straight to Sockudo), attached; say ready; wait until every message is
    closed (or the timeout); report each channel's timeline, texts and status."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        channels: list[str] = command["channels"]
        readers = {name: Reader() for name in channels}
        clients = [realtime_client(spec["key"], spec["endpoint"]) for _ in channels]
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.gather(
                    *(
                        c.channels.get(name).subscribe(readers[name].on_message)
                        for c, name in zip(clients, channels, strict=True)
                    )
                )
            _emit({"ready": True})
            deadline = time.monotonic() + command["timeout_s"]
            while time.monotonic() < deadline:
                if all(r.status is not None for r in readers.values()):
                    break
                await asyncio.sleep(0.02)
            _emit({
                "channels": {
                    name: {"timeline": r.timeline, "texts": list(r.texts.values()),
                           "status": r.status}
                    for name, r in readers.items()
                }
            })  # fmt: skip
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# --- part 1: un-awaited vs awaited appends ---------------------------------------------------


async def produce(deltas: list[str], tps: float, sink: Callable[[str], None]) -> list[float]:
    """The model: delta i at i / tps seconds (all at once when tps is 0); returns when
    each was produced (time.monotonic)."""
    produced: list[float] = []
    start = time.monotonic()
    for i, delta in enumerate(deltas):
        if tps > 0 and (wait := start + i / tps - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        produced.append(time.monotonic())
        sink(delta)
    return produced


@dataclass
class StreamRun:
    channel: str
    deltas: list[str]
    produced: list[float] = field(default_factory=list)
    sent: int = 0  # append messages sent for the deltas
    refused_seen: int = 0  # refusals the publisher saw (awaited: then retried)
    failures: int = 0  # sends that failed for good
    error: str | None = None


async def unawaited_stream(pool: ConnectionPool, run: StreamRun, tps: float) -> None:
    """The product: `ResponseStream` paced by the pool's lease."""
    lease = pool.acquire(run.channel)
    try:
        channel = lease.client.channels.get(run.channel)
        stream = ResponseStream(channel, Headers(response_id=run.channel, model="local"), lease)
        await stream.open()
        run.produced = await produce(run.deltas, tps, stream.append)
        run.failures = await stream.close(Status.COMPLETE)
        run.sent = stream.appends
    finally:
        pool.release(lease)


async def awaited_send(operation: Callable[[], Awaitable[Any]], run: StreamRun) -> Any:
    """One awaited publish; a refusal (42911) is counted and retried after a pause."""
    for _ in range(MAX_RETRIES):
        try:
            return await asyncio.wait_for(operation(), ACK_TIMEOUT_S)
        except AblyException as exc:
            if exc.code != RATE_LIMITED:
                raise
            run.refused_seen += 1
            await asyncio.sleep(RETRY_REFUSED_S)
    raise RuntimeError(f"refused {MAX_RETRIES} times")


async def awaited_stream(pool: ConnectionPool, run: StreamRun, tps: float) -> None:
    """The naive way: the same messages, each append awaited before the next delta goes."""
    lease = pool.acquire(run.channel)  # the same connection layout; its budget unused
    try:
        channel = lease.client.channels.get(run.channel)
        headers = Headers(response_id=run.channel, model="local")
        result = await awaited_send(lambda: channel.publish(contract.response_create(headers)), run)
        serial = str(result.serials[0])
        waiting: asyncio.Queue[str] = asyncio.Queue()
        producing = asyncio.create_task(produce(run.deltas, tps, waiting.put_nowait))
        text = ""
        try:
            for _ in run.deltas:
                delta = await waiting.get()
                message = contract.response_append(serial, delta, headers)
                try:
                    await awaited_send(functools.partial(channel.append_message, message), run)
                except Exception:
                    run.failures += 1
                run.sent += 1
                text += delta
        finally:
            if not producing.done():
                producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                run.produced = await producing
        closing = contract.response_replace(serial, text, headers.with_status(Status.COMPLETE))
        await awaited_send(lambda: channel.update_message(closing), run)
    finally:
        pool.release(lease)


class Proxy(ProxyControl):
    """The fault proxy's control API, with the latency knob."""

    async def set_latency(self, ms: float) -> None:
        async with self.http.post(f"{self.endpoint}/_proxy/latency?ms={ms}") as resp:
            resp.raise_for_status()


@dataclass
class Bench:
    args: argparse.Namespace
    ably: LocalAbly
    proxy: Proxy
    child: JsonChild
    pids: list[int]
    redis_url: str = "redis://127.0.0.1:6379/0"
    model_base_url: str = "http://127.0.0.1:1/v1"
    prefix: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:8]}")

    def settings(self) -> Settings:
        values: dict[str, Any] = {
            "redis_url": self.redis_url,
            "queue_prefix": self.prefix,
            "ably_api_key": self.ably.key,
            "ably_endpoint": self.proxy.endpoint,
            "openai_api_key": "sk-local",
            "openai_base_url": self.model_base_url,
            "openai_model": "local",
            "openai_api": "responses",
            "worker_id": f"bench-{uuid.uuid4().hex[:6]}",
            "presence_channel": f"agents:{self.prefix}",
            "shutdown_grace_seconds": 5,
            "job_timeout_seconds": 300,
            "log_format": "json",
            "log_level": self.args.worker_log_level,
        }  # fmt: skip
        return load_settings(Settings, **values)

    async def stream_case(self, speed: str, n: int, mode: str) -> dict[str, Any]:
        """N streams at once, one way, each on its own channel; a fresh pool."""
        a = self.args
        tps = a.tokens_per_second if speed == "paced" else 0.0
        tag = uuid.uuid4().hex[:8]
        runs = [
            StreamRun(
                channel=f"bench:patterns-{tag}-{i}",
                deltas=answer_tokens(f"patterns {speed} {n} {mode} {i} {tag}", a.tokens),
            )
            for i in range(n)
        ]
        # The naive way takes a round trip (and Sockudo's ack) per delta.
        per_delta_s = a.latency_ms / 1000 + 0.05
        timeout_s = len(runs[0].deltas) * max(per_delta_s, 1 / tps if tps else 0) + GRACE_S
        pool = make_pool(self.settings())
        try:
            await asyncio.wait_for(pool.wait_connected(wait_connected), START_TIMEOUT_S)
            await self.child.send(
                json.dumps({"channels": [r.channel for r in runs], "timeout_s": timeout_s})
            )
            await self.child.read(START_TIMEOUT_S)  # attached
            await self.proxy.reset()
            start = Meter.take(self.pids)
            streaming = unawaited_stream if mode == "unawaited" else awaited_stream
            outcomes = await asyncio.gather(
                *(asyncio.wait_for(streaming(pool, r, tps), timeout_s) for r in runs),
                return_exceptions=True,
            )
            for run, outcome in zip(runs, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    run.error = f"{type(outcome).__name__}: {outcome}"
            report = await self.child.read(timeout_s + 10)
            end = Meter.take(self.pids)
            stats = await self.proxy.stats()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 10)
        return summarise_streams(speed, n, mode, tps, runs, report, stats, cpu_pct(start, end))

    # --- part 2: message per response vs message per token -----------------------------

    async def conversation(self) -> dict[str, Any]:
        """One worker; per pattern, `--answers` jobs on one channel, then the late joiner."""
        await self.proxy.set_latency(0)  # the worker's side: as worker_streams.py
        stop = asyncio.Event()
        worker = asyncio.create_task(serve(self.settings(), stop, handle_signals=False))
        queue = RedisStreamsQueue(connect_redis(self.redis_url), prefix=self.prefix, consumer="b")
        results: dict[str, Any] = {}
        try:
            await queue.ensure_group()
            warm = Job(channel=f"bench:warm-{uuid.uuid4().hex[:8]}", input="warm up",
                       metadata={"local_tokens": "5", "local_tokens_per_second": "0"})  # fmt: skip
            await self.run_jobs(queue, worker, [warm], START_TIMEOUT_S)
            for pattern in PATTERNS:
                progress(f"... conversation: {self.args.answers} answers, {pattern}", self.args)
                results[str(pattern)] = await self.one_conversation(queue, worker, pattern)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker, 30)
            await queue.redis.aclose()
        return {"patterns": results, "per_token_over_per_response": conversation_ratios(results)}

    async def run_jobs(
        self, queue: RedisStreamsQueue, worker: asyncio.Task[None], jobs: list[Job], timeout: float
    ) -> dict[str, dict[str, str]]:
        """Enqueue the jobs in order; each job's record once final (or at the timeout)."""
        for job in jobs:
            assert await queue.enqueue(job)
        records: dict[str, dict[str, str]] = {}
        deadline = time.monotonic() + timeout
        pending = [job.id for job in jobs]
        while pending and time.monotonic() < deadline:
            if worker.done():
                worker.result()  # raises what stopped the worker
                raise RuntimeError("the worker stopped")
            for job_id in list(pending):
                records[job_id] = (await queue.status(job_id)) or {"state": "missing"}
                if records[job_id].get("state") in ("completed", "dead", "cancelled"):
                    pending.remove(job_id)
            await asyncio.sleep(0.1)
        return records

    async def one_conversation(
        self, queue: RedisStreamsQueue, worker: asyncio.Task[None], pattern: Pattern
    ) -> dict[str, Any]:
        a = self.args
        tag = uuid.uuid4().hex[:8]
        channel = f"bench:conversation-{tag}"
        jobs = [
            Job(channel=channel, input=f"question {i} of {tag}", pattern=pattern)
            for i in range(a.answers)
        ]
        expected = {job.id: answer_text(str(job.input), a.answer_tokens) for job in jobs}
        # Message per token is held to the channel's budget (44/s): one message a delta.
        deltas = a.answers * a.answer_tokens
        timeout = deltas / 40 + a.answer_tokens / a.tokens_per_second * a.answers / 16 + 60
        await self.proxy.reset()
        start = Meter.take(self.pids)
        records = await self.run_jobs(queue, worker, jobs, timeout)
        states = {job_id: record.get("state", "missing") for job_id, record in records.items()}
        end = Meter.take(self.pids)
        generation_s = end.wall - start.wall
        stats = await self.proxy.stats()
        counts = stats["channels"].get(channel) or {}
        reads = []
        for endpoint, latency in ((self.ably.endpoint, None), (self.proxy.endpoint, a.latency_ms)):
            if latency is not None:
                await self.proxy.set_latency(latency)
            try:
                for _ in range(a.late_reads):
                    read = await late_joiner(
                        self.ably.key, endpoint, channel, pattern, expected, a.page_size
                    )
                    reads.append((latency, read))
            finally:
                if latency is not None:
                    await self.proxy.set_latency(0)
        first = reads[0][1]
        problems = list(dict.fromkeys(p for _, r in reads for p in r["problems"]))
        completed = sum(1 for s in states.values() if s == "completed")
        if completed < len(jobs):
            problems.append(f"job states: {sorted(set(states.values()))}")
        messages = int(counts.get("messages", 0))
        return {
            "answers": len(jobs),
            "jobs_completed": completed,
            # Jobs run more than once (a failed attempt, e.g. a refused closing update:
            # the retry reopens the message and regenerates the answer).
            "jobs_retried": sum(1 for r in records.values() if int(r.get("attempts") or 0) > 1),
            "answers_ok_at_late_joiner": min(r["ok"] for _, r in reads),
            "generation_s": round(generation_s, 2),
            "messages_published": messages,
            "messages_published_per_answer": round(messages / len(jobs), 2),
            "ably_counted_per_answer": round(int(counts.get("counted", 0)) / len(jobs), 2),
            "refused": int(counts.get("refused", 0)),
            "peak_counted_per_s_channel": int(counts.get("peak_counted_per_s", 0)),
            "peak_counted_per_s_per_connection": max(
                (
                    c["channels"].get(channel, {}).get("peak_counted_per_s", 0)
                    for c in stats["connections"].values()
                ),
                default=0,
            ),
            "history_messages": first["history_messages"],
            "history_bytes": first["history_bytes"],
            "history_pages": first["pages"],
            "history_content_type": first["content_type"],
            "late_joiner_ms": _median([r["ms"] for lat, r in reads if lat is None]),
            "late_joiner_ms_at_latency": _median([r["ms"] for lat, r in reads if lat]),
            "late_joiner_reads_each": a.late_reads,  # loopback, and again at the latency
            "cpu_pct_of_core": cpu_pct(start, end),
            "problems": problems,
        }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


# --- the late joiner ----------------------------------------------------------------------


def _has_all(pattern: Pattern, items: list[Any], answers: int) -> bool:
    """Every answer is in what was read (newest first): message per response, every
    answer's message closed complete; message per token, every answer's `start` (its
    oldest message: everything after it has been read)."""
    if pattern == Pattern.MESSAGE_PER_RESPONSE:
        closed = {
            contract.header(m, "responseId")
            for m in items
            if m.name == contract.RESPONSE and contract.header(m, "status") == Status.COMPLETE
        }
        return len(closed) >= answers
    starts = {contract.header(m, "responseId") for m in items if m.name == contract.TOKEN_START}
    return len(starts) >= answers


async def late_joiner(
    key: str,
    endpoint: str,
    channel: str,
    pattern: Pattern,
    expected: dict[str, str],
    page_size: int,
) -> dict[str, Any]:
    """A fresh client shows the finished conversation: history in pages of `page_size`,
    newest first, until it has every answer; the texts built and checked."""
    client = rest_client(key, endpoint, use_binary_protocol=False)  # JSON, as ably-js
    try:
        await client.auth.authorize()  # a page has its token before it reads
        started = time.monotonic()
        history = client.channels.get(channel)
        page = await history.history(limit=page_size)
        items: list[Any] = []
        pages, size = 1, len(page.response.content)
        content_type = page.response.headers.get("content-type", "")
        while True:
            items.extend(page.items or [])
            if _has_all(pattern, items, len(expected)) or not page.has_next():
                break
            page = await page.next()
            pages += 1
            size += len(page.response.content)
        transcript = Transcript()
        tokens: dict[str, str] = {}
        for message in reversed(items):  # oldest first
            transcript.on_message(message)
            response_id = contract.header(message, "responseId") or ""
            if message.name == contract.TOKEN_START:
                tokens[response_id] = ""
            elif message.name == contract.TOKEN:
                tokens[response_id] = tokens.get(response_id, "") + (message.data or "")
        shown = {answer.response_id: answer.text for answer in transcript.answers.values()}
        elapsed_ms = (time.monotonic() - started) * 1000
    finally:
        await client.close()
    problems = []
    ok = 0
    for response_id, text in expected.items():
        wrong = []
        if shown.get(response_id) != text:
            wrong.append("shown (Transcript)")
        if pattern == Pattern.MESSAGE_PER_TOKEN and tokens.get(response_id) != text:
            got = tokens.get(response_id)
            wrong.append(
                "its tokens joined (missing)" if got is None
                else f"its tokens joined ({len(got)} of {len(text)} chars)"
            )  # fmt: skip
        ok += not wrong
        if wrong:
            repaired = shown.get(response_id) == text  # message per token: by its `stop`
            problems.append(
                f"answer {response_id}: wrong text at the late joiner: {', '.join(wrong)}"
                + (" (the whole text its `stop` carries is right)" if repaired else "")
            )
    return {
        "ms": elapsed_ms,
        "ok": ok,
        "pages": pages,
        "history_messages": len(items),
        "history_bytes": size,
        "content_type": content_type.split(";")[0],
        "problems": problems,
    }


# --- summaries ------------------------------------------------------------------------------


def summarise_streams(
    speed: str,
    n: int,
    mode: str,
    tps: float,
    runs: list[StreamRun],
    report: dict[str, Any],
    stats: dict[str, Any],
    cpu: dict[str, float],
) -> dict[str, Any]:
    delays: list[float] = []
    rates: list[float] = []
    walls: list[float] = []
    problems: list[str] = []
    ok = undelivered = 0
    for run in runs:
        seen = report["channels"][run.channel]
        expected = "".join(run.deltas)
        if seen["texts"] == [expected] and seen["status"] == Status.COMPLETE and not run.error:
            ok += 1
        else:
            problems.append(
                f"{run.channel}: {run.error or ''} status {seen['status']}, "
                f"{len(seen['texts'])} message(s), text "
                f"{'right' if expected in seen['texts'] else 'wrong'}"
            )
        timeline = seen["timeline"]
        at, end = 0, 0
        seen_at: list[float] = []
        for delta, produced in zip(run.deltas, run.produced, strict=False):
            end += len(delta)
            while at < len(timeline) and timeline[at][1] < end:
                at += 1
            if at == len(timeline):
                undelivered += 1
                continue
            seen_at.append(timeline[at][0])
            delays.append((timeline[at][0] - produced) * 1000)
        if seen_at and run.produced and len(seen_at) == len(run.deltas):
            span = seen_at[-1] - run.produced[0]
            walls.append(span)
            rates.append(len(run.deltas) / span if span > 0 else float("inf"))
    connections = stats["connections"].values()
    publishing = [c for c in connections if c["total"]["messages"] > 0]
    counted = sum(c["total"]["counted"] for c in connections)
    return {
        "speed": speed,
        "model_tokens_per_second": tps or None,  # None: all at once
        "streams": n,
        "mode": mode,
        "deltas_per_stream": round(sum(len(r.deltas) for r in runs) / n, 1),
        "delivered_tokens_per_s_per_stream": round(statistics.median(rates), 1) if rates else None,
        "delay_ms": percentiles(delays),
        "delay_max_ms": round(max(delays), 1) if delays else None,
        "wall_s": round(max(walls), 2) if walls else None,
        "appends_per_stream": round(sum(r.sent for r in runs) / n, 1),
        "ably_counted_per_stream": round(counted / n, 1),
        "peak_counted_per_s_per_connection": max(
            (c["total"]["peak_counted_per_s"] for c in publishing), default=0
        ),
        "connections_publishing": len(publishing),
        "refused": sum(c["total"]["refused"] for c in connections),
        "refused_seen_by_publisher": sum(r.refused_seen for r in runs),
        "failed_sends": sum(r.failures for r in runs),
        "undelivered_deltas": undelivered,
        "ok": ok,
        "cpu_pct_of_core": cpu,
        "problems": problems,
    }


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 3)


def stream_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Un-awaited over awaited, per speed and number of streams."""
    out = []
    for row in rows:
        if row["mode"] != "unawaited":
            continue
        other = next(
            (r for r in rows if r["mode"] == "awaited" and r["speed"] == row["speed"]
             and r["streams"] == row["streams"]),
            None,
        )  # fmt: skip
        if other is None:
            continue
        out.append({
            "speed": row["speed"],
            "streams": row["streams"],
            "delivered_tokens_per_s": _ratio(row["delivered_tokens_per_s_per_stream"],
                                             other["delivered_tokens_per_s_per_stream"]),
            "delay_p50": _ratio(row["delay_ms"]["p50"], other["delay_ms"]["p50"]),
            "delay_p95": _ratio(row["delay_ms"]["p95"], other["delay_ms"]["p95"]),
            "wall": _ratio(row["wall_s"], other["wall_s"]),
            "ably_counted": _ratio(row["ably_counted_per_stream"],
                                   other["ably_counted_per_stream"]),
        })  # fmt: skip
    return out


def conversation_ratios(results: dict[str, Any]) -> dict[str, float | None]:
    per_response = results.get(str(Pattern.MESSAGE_PER_RESPONSE))
    per_token = results.get(str(Pattern.MESSAGE_PER_TOKEN))
    if not per_response or not per_token:
        return {}
    keys = (
        "messages_published_per_answer", "ably_counted_per_answer", "history_messages",
        "history_bytes", "history_pages", "late_joiner_ms", "late_joiner_ms_at_latency",
        "generation_s",
    )  # fmt: skip
    return {key: _ratio(per_token[key], per_response[key]) for key in keys}


# --- report ---------------------------------------------------------------------------------


def _pq(p: dict[str, float | None]) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return f"{num(p['p50'])}/{num(p['p95'])}"


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(
        f"\nSockudo {meta['sockudo']}, ably-python {meta['ably']}, {meta['cpus']} CPUs, "
        f"load average at start {meta['loadavg']}"
    )
    appends = result.get("appends")
    if appends:
        print(
            f"\n1. un-awaited vs awaited appends: {meta['latency_ms']:g} ms round trip between "
            f"publisher and Sockudo (fault proxy), subscriber direct;\n   "
            f"{meta['tokens']} deltas of one token per stream, model at "
            f"{meta['tokens_per_second']:g} tokens/s (paced) or all at once (full)\n"
        )
        print(
            f"{'speed':>5} {'N':>2} {'mode':>9} {'tok/s':>7} {'delay ms':>11} {'max':>6} "
            f"{'wall s':>6} {'sent':>5} {'counted':>7} {'peak/s':>6} {'conns':>5} {'refu':>4} "
            f"{'ok':>5} {'rest%':>5}"
        )
        for r in appends["rows"]:
            print(
                f"{r['speed']:>5} {r['streams']:>2} {r['mode']:>9} "
                f"{_x(r['delivered_tokens_per_s_per_stream'], 1):>7} {_pq(r['delay_ms']):>11} "
                f"{_x(r['delay_max_ms'], 0):>6} {_x(r['wall_s']):>6} "
                f"{r['appends_per_stream']:>5.0f} {r['ably_counted_per_stream']:>7.0f} "
                f"{r['peak_counted_per_s_per_connection']:>6} {r['connections_publishing']:>5} "
                f"{r['refused']:>4} {r['ok']:>2}/{r['streams']:<2} "
                f"{r['cpu_pct_of_core']['rest_of_machine']:>5.0f}"
            )
        print("\nun-awaited / awaited")
        print(
            f"{'speed':>5} {'N':>2} {'tok/s':>8} {'delay p50':>9} {'delay p95':>9} "
            f"{'wall':>6} {'counted':>7}"
        )
        for q in appends["unawaited_over_awaited"]:
            print(
                f"{q['speed']:>5} {q['streams']:>2} {_x(q['delivered_tokens_per_s']):>8} "
                f"{_x(q['delay_p50'], 3):>9} {_x(q['delay_p95'], 3):>9} {_x(q['wall'], 3):>6} "
                f"{_x(q['ably_counted']):>7}"
            )
        print(
            "\ntok/s: model deltas reflected at the subscriber per second per stream (median). "
            "delay: model delta to\nsubscriber, p50/p95 (max) over all deltas. wall: first "
            "delta produced to last delta seen (slowest stream).\nsent: append messages per "
            "stream; counted: Ably-counted messages per stream (create, appends rolled\nup in "
            "40 ms, close); peak/s: most counted in one second on one connection (limit 50); "
            "conns: connections\npublishing; refu: publishes refused as Ably would; ok: texts "
            "right and complete at the subscriber;\nrest%: CPU of processes outside the bench, "
            "% of a core (high: a noisy run)."
        )
    conversation = result.get("conversation")
    if conversation:
        print(
            f"\n2. message per response vs message per token: the worker in-process, "
            f"{meta['answers']} answers of about {meta['answer_tokens']} tokens in ONE "
            f"channel,\n   model at {meta['tokens_per_second']:g} tokens/s; late joiner: REST "
            f"history in pages of {meta['page_size']}, loopback and at {meta['latency_ms']:g} ms "
            "round trip\n"
        )
        print(
            f"{'pattern':>20} {'gen s':>6} {'msgs/ans':>8} {'counted':>7} {'peak/s':>6} "
            f"{'refu':>4} {'retr':>4} {'history':>7} {'KiB':>7} {'pages':>5} {'late ms':>8} "
            f"{'at rtt':>7} {'ok':>7}"
        )
        for name, r in conversation["patterns"].items():
            print(
                f"{name:>20} {r['generation_s']:>6.1f} "
                f"{r['messages_published_per_answer']:>8.1f} {r['ably_counted_per_answer']:>7.1f} "
                f"{r['peak_counted_per_s_channel']:>6} {r['refused']:>4} {r['jobs_retried']:>4} "
                f"{r['history_messages']:>7} {r['history_bytes'] / 1024:>7.0f} "
                f"{r['history_pages']:>5} {_x(r['late_joiner_ms'], 0):>8} "
                f"{_x(r['late_joiner_ms_at_latency'], 0):>7} "
                f"{r['answers_ok_at_late_joiner']:>3}/{r['answers']:<3}"
            )
        q = conversation["per_token_over_per_response"]
        if q:
            print(
                f"{'per-token/per-resp':>20} {_x(q['generation_s']):>6} "
                f"{_x(q['messages_published_per_answer'], 1):>8} "
                f"{_x(q['ably_counted_per_answer'], 1):>7} {'':>6} {'':>4} {'':>4} "
                f"{_x(q['history_messages'], 1):>7} {_x(q['history_bytes'], 1):>7} "
                f"{_x(q['history_pages'], 1):>5} {_x(q['late_joiner_ms'], 1):>8} "
                f"{_x(q['late_joiner_ms_at_latency'], 1):>7}"
            )
        print(
            "\ngen s: first enqueue to every job completed; msgs/ans: messages the worker "
            "published per answer (proxy);\ncounted: the same as Ably counts them; peak/s: the "
            "most counted in one second on the channel (limit 50);\nrefu: publishes refused as "
            "Ably would; retr: jobs run more than once (a failed attempt);\nhistory: messages in "
            "the channel's history; KiB: its size as JSON REST pages; late ms: a fresh\n"
            "(authenticated) client reads history until it has every answer and builds the texts, "
            "median of reads,\nloopback; at rtt: the same through the proxy; ok: answers right at "
            "the late joiner."
        )
    for problem in result["problems"][:10]:
        print(f"  problem: {problem}")


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=("appends", "conversation"),
                   default=["appends", "conversation"], help="the parts to run")  # fmt: skip
    p.add_argument("--latency-ms", type=float, default=50.0, help="round trip via the proxy")
    p.add_argument("--tokens", type=int, default=300, help="part 1: deltas per stream")
    p.add_argument("--tokens-per-second", type=float, default=50.0, help="the model's pace")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8], help="part 1: at once")
    p.add_argument("--speeds", nargs="+", choices=("paced", "full"), default=["paced", "full"])
    p.add_argument("--answers", type=int, default=100, help="part 2: answers in the channel")
    p.add_argument("--answer-tokens", type=int, default=40, help="part 2: tokens per answer")
    p.add_argument("--late-reads", type=int, default=3, help="part 2: late-joiner reads each")
    p.add_argument("--page-size", type=int, default=ABLY_MAX_PAGE, choices=range(1, 1001),
                   metavar="1-1000", help="part 2: the late joiner's history page")  # fmt: skip
    p.add_argument("--worker-log-level", default="INFO", help="the worker's LOG_LEVEL")
    p.add_argument("--worker-log", default=os.devnull, help="file for the worker's JSON log lines")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def progress(text: str, args: argparse.Namespace) -> None:
    if not args.json:
        print(text, file=sys.__stderr__, flush=True)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "sockudo": SOCKUDO_VERSION,
        "ably": version("ably"),
        "cpus": os.cpu_count(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "latency_ms": args.latency_ms,
        "tokens": args.tokens,
        "tokens_per_second": args.tokens_per_second,
        "answers": args.answers,
        "answer_tokens": args.answer_tokens,
        "late_reads": args.late_reads,
        "page_size": args.page_size,
        "sockudo_history_max_page_size": ABLY_MAX_PAGE,
        "worker_settings": "defaults (WORKER_CONCURRENCY 16, STREAMS_PER_CONNECTION 3, "
        "ABLY_MESSAGES_PER_SECOND 44)",
    }


async def amain(args: argparse.Namespace) -> int:
    if args.child:
        await child_subscribers(json.loads(args.child))
        return 0
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    result: dict[str, Any] = {"meta": _meta(args)}
    proxy_port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        ably = await stack.enter_async_context(LocalAblyLongPages())
        proxy_pid, _ = await stack.enter_async_context(
            helper_process(
                "worker.devstack.fault_proxy", "--upstream", ably.endpoint,
                "--port", str(proxy_port), "--latency-ms", str(args.latency_ms),
                "--enforce-rate-limits", ready="fault proxy ready",
            )
        )  # fmt: skip
        proxy = Proxy(f"http://127.0.0.1:{proxy_port}")
        stack.push_async_callback(proxy.close)
        child = await JsonChild.start(
            SCRIPT, {"key": ably.key, "endpoint": ably.endpoint}, "subscriber process",
            limit=REPORT_LIMIT_BYTES, **server_process_options(),
        )  # fmt: skip
        stack.push_async_callback(child.stop, 15)
        assert ably._proc is not None
        bench = Bench(args, ably, proxy, child, [ably._proc.pid, proxy_pid, child.proc.pid])
        if "appends" in args.only:
            rows = []
            for speed in args.speeds:
                for n in args.streams:
                    for mode in MODES:
                        progress(f"... appends: {speed}, {n} stream(s), {mode}", args)
                        rows.append(await bench.stream_case(speed, n, mode))
            result["appends"] = {"rows": rows, "unawaited_over_awaited": stream_ratios(rows)}
        if "conversation" in args.only:
            redis = await stack.enter_async_context(LocalRedis())
            model_pid, model_url = await stack.enter_async_context(
                helper_process(
                    "worker.devstack.openai_local", "--port", "0",
                    "--tokens", str(args.answer_tokens),
                    "--tokens-per-second", str(args.tokens_per_second),
                    "--first-token-ms", "0", ready="http",
                )
            )  # fmt: skip
            assert redis._proc is not None
            bench.pids += [redis._proc.pid, model_pid]
            bench.redis_url, bench.model_base_url = redis.url, model_url
            per_token = args.answers * (args.answer_tokens + 2)
            if per_token > HISTORY_CAP:
                progress(f"warning: up to {per_token} messages, over the history cap", args)
            sys.stderr = args.log_stream  # the worker logs to stderr
            try:
                result["conversation"] = await bench.conversation()
            finally:
                sys.stderr = sys.__stderr__
    result["problems"] = problems(result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 1 if result["problems"] else 0


def problems(result: dict[str, Any]) -> list[str]:
    """The failed checks: wrong texts anywhere, a refused publish of ours, jobs undone."""
    found: list[str] = []
    for row in (result.get("appends") or {}).get("rows", []):
        where = f"appends {row['speed']} N={row['streams']} {row['mode']}"
        found += [f"{where}: {p}" for p in row["problems"]]
        if row["undelivered_deltas"]:
            found.append(f"{where}: {row['undelivered_deltas']} deltas never seen")
        if row["mode"] == "unawaited" and (row["refused"] or row["failed_sends"]):
            found.append(f"{where}: {row['refused']} refused, {row['failed_sends']} failed")
    for name, r in ((result.get("conversation") or {}).get("patterns") or {}).items():
        found += [f"conversation {name}: {p}" for p in r["problems"]]
        if r["refused"]:
            found.append(f"conversation {name}: {r['refused']} publishes refused")
    return found


def main() -> int:
    return run_script(amain, parse_args())


if __name__ == "__main__":
    sys.exit(main())
