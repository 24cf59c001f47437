"""Throughput of the local OpenAI server: many concurrent streams through AsyncOpenAI.

    uv run python bench/openai_local_throughput.py [--streams 200] [--tokens 200]
        [--tokens-per-second 1000] [--first-token-ms 0] [--rounds 5] [--clients 2]
        [--client sdk|raw]

Starts the server as its own process (`python -m worker.devstack.openai_local`), then
`--clients` processes each keep their share of `--streams` streams open, back to
back for `--rounds` rounds. Reports the aggregate tokens/s achieved against the
requested (streams x tokens/s), each stream's own rate, time to first token p50/p95,
and the CPU the server and the clients used: a server well below one core is not
the bottleneck. `--client raw` reads the SSE bytes with aiohttp instead of the SDK,
to measure the server without the SDK's parsing cost.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
from cpu_clock import process_cpu_s  # bench/, the script's folder

from worker.devstack.openai_local import answer_tokens


@dataclass(frozen=True)
class StreamStats:
    started: float  # wall clock, comparable across processes
    first_token_s: float
    last_token_s: float
    tokens: int


@dataclass(frozen=True)
class Job:
    base_url: str
    streams: int
    rounds: int
    tokens: int
    start_at: float
    client: str


def main() -> int:
    args = parse_args()
    if args.base_url:  # a server already running, started with matching options
        return run(args, None, args.base_url)
    server, base_url = start_server(args)
    try:
        return run(args, server.pid, base_url)
    finally:
        server.terminate()
        server.wait(10)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    parser.add_argument("--tokens-per-second", type=float, default=1000.0)
    parser.add_argument("--first-token-ms", type=float, default=0.0)
    parser.add_argument("--batch-interval-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5, help="streams in a row per slot")
    parser.add_argument("--clients", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--client", choices=("sdk", "raw"), default="sdk")
    parser.add_argument("--base-url", help="use this running server instead of starting one")
    return parser.parse_args()


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable,
        "-m",
        "worker.devstack.openai_local",
        "--port",
        "0",
        "--tokens",
        str(args.tokens),
        "--tokens-per-second",
        str(args.tokens_per_second),
        "--first-token-ms",
        str(args.first_token_ms),
        "--batch-interval-ms",
        str(args.batch_interval_ms),
    ]
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    return server, server.stdout.readline().strip()


def run(args: argparse.Namespace, server_pid: int | None, base_url: str) -> int:
    shares = [
        args.streams // args.clients + (i < args.streams % args.clients)
        for i in range(args.clients)
    ]
    start_at = time.time() + 3.0  # time for every client process to import and connect
    jobs = [Job(base_url, n, args.rounds, args.tokens, start_at, args.client) for n in shares if n]
    cpu_before = server_cpu_s(server_pid)
    with ProcessPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run_client, jobs))
    server_cpu = server_cpu_s(server_pid) - cpu_before
    stats = [s for stream_stats, _ in results for s in stream_stats]
    client_cpu = sum(cpu for _, cpu in results)
    report(args, stats, start_at, server_cpu, client_cpu)
    return 0


def run_client(job: Job) -> tuple[list[StreamStats], float]:
    """One client process: its share of the streams, in its own event loop."""
    return asyncio.run(client_main(job))


async def client_main(job: Job) -> tuple[list[StreamStats], float]:
    """The streams' stats and the CPU seconds this process spent on them."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sdk = openai.AsyncOpenAI(base_url=job.base_url, api_key="bench", max_retries=0)

        async def stream_once(prompt: str) -> StreamStats:
            if job.client == "sdk":
                return await sdk_stream(sdk, prompt)
            tokens = len(answer_tokens(prompt, job.tokens))
            return await raw_stream(session, job.base_url, prompt, tokens)

        async def slot(index: int) -> list[StreamStats]:
            prompt = f"slot {os.getpid()}-{index} round"
            return [await stream_once(f"{prompt} {r}") for r in range(job.rounds)]

        await stream_once("warm-up")  # imports and first connection before the clock
        await asyncio.sleep(max(0.0, job.start_at - time.time()))
        cpu = time.process_time()
        slots = await asyncio.gather(*(slot(i) for i in range(job.streams)))
        cpu = time.process_time() - cpu
        await sdk.close()
    return [s for one in slots for s in one], cpu


async def sdk_stream(client: openai.AsyncOpenAI, prompt: str) -> StreamStats:
    started, clock = time.time(), time.perf_counter()
    first = last = 0.0
    tokens = 0
    stream = await client.responses.create(model="local", input=prompt, stream=True)
    async for event in stream:
        if event.type == "response.output_text.delta":
            last = time.perf_counter() - clock
            first = first or last
        elif event.type == "response.completed" and event.response.usage:
            tokens = event.response.usage.output_tokens
    return StreamStats(started, first, last, tokens)


async def raw_stream(
    session: aiohttp.ClientSession, base_url: str, prompt: str, tokens: int
) -> StreamStats:
    """The bytes only: time to the first and last delta event, no SDK parsing."""
    started, clock = time.time(), time.perf_counter()
    first = last = 0.0
    body = {"model": "local", "input": prompt, "stream": True}
    async with session.post(f"{base_url}/responses", json=body) as reply:
        async for chunk in reply.content.iter_any():
            if b"response.output_text.delta" in chunk:
                last = time.perf_counter() - clock
                first = first or last
    return StreamStats(started, first, last, tokens)


def server_cpu_s(pid: int | None) -> float:
    return math.nan if pid is None else process_cpu_s(pid)  # nan: a server we did not start


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def report(
    args: argparse.Namespace,
    stats: list[StreamStats],
    start_at: float,
    server_cpu: float,
    client_cpu: float,
) -> None:
    wall = max(s.started + s.last_token_s for s in stats) - start_at
    tokens = sum(s.tokens for s in stats)
    requested = args.streams * args.tokens_per_second
    rates = [
        (s.tokens - 1) / (s.last_token_s - s.first_token_s)
        for s in stats
        if s.last_token_s > s.first_token_s
    ]
    ttft_ms = [s.first_token_s * 1000 for s in stats]
    print(f"client: {args.client}, {args.clients} process(es); cpus: {os.cpu_count()}")
    print(
        f"{len(stats)} streams ({args.streams} concurrent x {args.rounds} rounds) of "
        f"{args.tokens} tokens at {args.tokens_per_second:g} tok/s, "
        f"first token after {args.first_token_ms:g} ms, in {wall:.2f} s"
    )
    print(
        f"aggregate: {tokens / wall:,.0f} tok/s achieved vs {requested:,.0f} requested "
        f"({100 * tokens / wall / requested:.0f}%)"
    )
    print(
        f"per stream: {statistics.median(rates):,.0f} tok/s median, "
        f"{percentile(rates, 0.05):,.0f} p5 (requested {args.tokens_per_second:g})"
    )
    print(
        f"time to first token: p50 {percentile(ttft_ms, 0.5):.1f} ms, "
        f"p95 {percentile(ttft_ms, 0.95):.1f} ms"
    )
    print(
        f"cpu: server {server_cpu:.2f} s ({100 * server_cpu / wall:.0f}% of a core), "
        f"clients {client_cpu:.2f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
