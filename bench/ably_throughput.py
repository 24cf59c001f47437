"""How many messages per second one Sockudo process takes from ably-python, here.

    uv run python bench/ably_throughput.py [--seconds 5] [--window 500] [--json]

Starts its own local Ably (`LocalAbly`: Sockudo on a free loopback port) and runs these
phases one after the other, each for `--seconds` (and at most `--max-messages`):

1. `awaited`     plain publishes, each awaited before the next, 1 connection: the baseline;
2. `unawaited`   plain publishes as tasks, `--window` at a time, then waited for, 1 conn;
3. `unawaited32` the same in windows of 32: Sockudo's per-connection queue for control
                 frames (ACKs among them) holds 32, and drops what does not fit (below);
4. `unawaited4`  as 2 on 4 connections (4 clients) in this one process;
5. `unawaited4p` as 2 on 4 connections spread over 2 child processes (two interpreters:
                 shows whether Sockudo has room left when one Python process is full);
6. `appends`     the worker's hot path: `--responses` concurrent responses on 1 connection,
                 each a `message.create` publish then `--appends` un-awaited
                 `append_message` calls, waited for together, over and over (creates and
                 appends both counted as messages);
7. `delivery`    a subscriber (child process) attached to the channel: first a paced
                 trickle (`--paced-rate` msg/s: unloaded latency), then un-awaited windows
                 as in 2; messages/s received end to end and publish-to-receive latency
                 p50/p95/max (each message carries its wall-clock send time).

Each reports messages/s (what the server took: publishes and appends whose future
resolved), its ratio to the baseline, and CPU per message and as a share of one core for
the client process(es) (`time.process_time`), Sockudo (utime+stime of every thread, from
`/proc/<pid>/stat`) and every other process on the machine (`/proc/stat`), so it is clear
which side is the limit and whether the box was busy with something else.

Lost ACKs. Sockudo 5.2.0 queues a connection's ACKs in a control queue of 32 frames and
silently drops an ACK that does not fit (`sockudo-ably-compat` `outbound.rs`). ably-python
completes every pending message up to the serial a later ACK names, handing that ACK's
one result to the first of them (a serial that belongs to another message) and empty
results to the rest, so a dropped ACK shows as a result without a serial (counted as
`ack lost`) — and when nothing follows, the tail of a burst waits forever. A wait here
that sees no ACK for `--stall-timeout` publishes one more message (a "nudge", not
counted) so that its ACK covers the tail, and counts a stall.

ACK pacing. Sockudo acknowledges a publish once its stats worker has merged it, and that
worker waits `stats_flush_interval_ms` (Sockudo's default 10; LocalAbly sets 0) for a
batch when its queue looks empty: with several connections interleaving, ACKs come in
10-12 ms steps. `--stats-flush-interval-ms 10` sets Sockudo's default for one run, to compare.

Loopback only; every wait is bounded; a full default run takes about 45 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ably.types.message import Message
from cpu_clock import process_cpu_s, system_busy_s  # bench/, the script's folder
from json_child import JsonChild

from worker.devstack.ably import LocalAbly
from worker.devstack.sockudo_install import SOCKUDO_VERSION
from worker.transport.client import quiet_sdk_logs, realtime_client

SCRIPT = str(Path(__file__).resolve())
CONNECT_TIMEOUT_S = 15.0
CHILD_TIMEOUT_S = 30.0  # on top of a phase's own seconds
NUDGES = 3  # extra publishes tried when ACKs are withheld, before giving up


# --- CPU clocks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Meter:
    """A snapshot of the clocks a phase is measured with."""

    wall: float
    own_cpu: float  # this process
    server_cpu: float  # Sockudo
    system_busy: float  # the whole machine

    @classmethod
    def take(cls, server_pid: int) -> Meter:
        return cls(
            time.perf_counter(), time.process_time(), process_cpu_s(server_pid), system_busy_s()
        )


# --- counting what the server took ------------------------------------------------------


@dataclass
class Tally:
    acked: int = 0  # futures resolved: the server took the message
    failed: int = 0  # raised (NACK, connection failure)
    unacked: int = 0  # never resolved, even after the nudges
    acks_lost: int = 0  # resolved by a later message's ACK, their own never came
    stalls: int = 0  # waits with no ACK for --stall-timeout: nudged

    def count(self, done: Iterable[asyncio.Task[Any]]) -> None:
        for task in done:
            if task.cancelled() or task.exception() is not None:
                self.failed += 1
                continue
            self.acked += 1
            result = task.result()
            if hasattr(result, "serials"):  # PublishResult
                lost = not result.serials or result.serials[0] is None
            else:  # UpdateDeleteResult (append_message)
                lost = getattr(result, "version_serial", None) is None
            self.acks_lost += lost

    def add(self, other: Tally | dict[str, int]) -> Tally:
        values = other if isinstance(other, dict) else asdict(other)
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + value)
        return self


async def settle(
    channel: Any, tasks: Iterable[asyncio.Task[Any]], tally: Tally, stall_s: float
) -> None:
    """Wait for the tasks. When none has resolved for `stall_s` (ACKs withheld), nudge:
    publish one more message, whose ACK covers every earlier one in the SDK."""
    pending = set(tasks)
    nudges = 0
    while pending:
        done, pending = await asyncio.wait(pending, timeout=stall_s)
        tally.count(done)
        if done or not pending:
            continue  # progress: keep waiting
        tally.stalls += 1
        if nudges == NUDGES:
            break
        nudges += 1
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.publish(Message(name="nudge", data="")), stall_s)
    tally.unacked += len(pending)
    for task in pending:
        task.cancel()


# --- load generators (run here or in a child process) -----------------------------------


async def connect(key: str, endpoint: str, count: int) -> list[Any]:
    clients = [realtime_client(key, endpoint) for _ in range(count)]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(c.connection.once_async("connected") for c in clients)),
            CONNECT_TIMEOUT_S,
        )
    except BaseException:
        await close_all(clients)
        raise
    return clients


async def close_all(clients: list[Any]) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(c.close() for c in clients), return_exceptions=True), 10
        )


async def attached(clients: list[Any], tag: str) -> list[Any]:
    channels = [c.channels.get(f"bench:{tag}-{uuid.uuid4().hex[:8]}") for c in clients]
    await asyncio.wait_for(asyncio.gather(*(ch.attach() for ch in channels)), CONNECT_TIMEOUT_S)
    return channels


async def awaited_publishes(channel: Any, seconds: float, cap: int, stall_s: float) -> Tally:
    tally = Tally()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and tally.acked + tally.failed < cap:
        task = asyncio.create_task(channel.publish(Message(name="bench", data="x")))
        await settle(channel, [task], tally, stall_s)
    return tally


async def windowed_publishes(
    channel: Any,
    seconds: float,
    cap: int,
    window: int,
    stall_s: float,
    data: Callable[[], str] = lambda: "x",
    name: str = "bench",
) -> Tally:
    """Publish `window` un-awaited messages, wait for them all, repeat until time or cap."""
    tally = Tally()
    made = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and made < cap:
        n = min(window, cap - made)
        made += n
        tasks = [
            asyncio.create_task(channel.publish(Message(name=name, data=data()))) for _ in range(n)
        ]
        await settle(channel, tasks, tally, stall_s)
    return tally


async def response_appends(
    channel: Any, seconds: float, cap: int, appends: int, stall_s: float
) -> tuple[Tally, int]:
    """One response after another: a create, `appends` un-awaited appends, wait for all.

    Returns the tally (creates and appends) and the number of responses completed."""
    tally = Tally()
    responses = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and tally.acked + tally.failed < cap:
        create = asyncio.create_task(channel.publish(Message(name="response", data="")))
        before = tally.acked
        await settle(channel, [create], tally, stall_s)
        if tally.acked == before or create.cancelled() or create.exception() is not None:
            continue
        serials = create.result().serials
        if not serials or serials[0] is None:
            continue  # its ACK was lost: no serial to append to
        tasks = [
            asyncio.create_task(channel.append_message(Message(serial=serials[0], data=f"t{i} ")))
            for i in range(appends)
        ]
        await settle(channel, tasks, tally, stall_s)
        responses += 1
    return tally, responses


# --- child processes ---------------------------------------------------------------------


async def _read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def child_publisher(spec: dict[str, Any]) -> None:
    """`--child` publisher: connect, say ready, wait for go, publish, report."""
    clients = await connect(spec["key"], spec["endpoint"], spec["connections"])
    try:
        channels = await attached(clients, "child")
        _emit({"ready": True})
        await _read_line()
        cpu = time.process_time()
        tallies = await asyncio.gather(
            *(
                windowed_publishes(
                    ch, spec["seconds"], spec["cap"], spec["window"], spec["stall_s"]
                )
                for ch in channels
            )
        )
        total = Tally()
        for tally in tallies:
            total.add(tally)
        _emit({"tally": asdict(total), "cpu_s": time.process_time() - cpu})
    finally:
        await close_all(clients)


async def child_subscriber(spec: dict[str, Any]) -> None:
    """`--child` subscriber: attach to the channel, record each message's latency (its data
    is the publisher's `time.time_ns()`), report once told how many to expect."""
    clients = await connect(spec["key"], spec["endpoint"], 1)
    latencies: dict[str, list[float]] = {"paced": [], "flood": []}
    last_received: dict[str, float] = {}
    expected: dict[str, int] = {}
    done = asyncio.Event()

    def on_message(message: Any) -> None:
        now = time.time_ns()
        kind = message.name
        if kind == "end":
            expected.update(json.loads(message.data))
        elif kind in latencies:
            latencies[kind].append((now - int(message.data)) / 1e6)
            last_received[kind] = now / 1e9
        if expected and all(len(latencies[k]) >= n for k, n in expected.items()):
            done.set()

    try:
        channel = clients[0].channels.get(spec["channel"])
        await channel.attach()
        await channel.subscribe(on_message)
        _emit({"ready": True})
        await _read_line()  # the load starts
        cpu = time.process_time()
        await _read_line()  # the parent has published "end": wait for the stragglers
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), spec["grace_s"])
        _emit(
            {
                "received": {k: len(v) for k, v in latencies.items()},
                "latency_ms": {k: _percentiles(v) for k, v in latencies.items()},
                "last_received": last_received,
                "cpu_s": time.process_time() - cpu,
            }
        )
    finally:
        await close_all(clients)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50": round(values[0], 2) if values else None, "p95": None, "max": None}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 2), "p95": round(q[94], 2), "max": round(max(values), 2)}


# --- the phases ----------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    what: str
    tally: Tally = field(default_factory=Tally)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0  # every client process of the phase, together
    server_cpu_s: float = 0.0
    others_cpu_s: float = 0.0  # the rest of the machine meanwhile (other processes)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def messages(self) -> int:
        return self.tally.acked

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s if self.wall_s else 0.0

    def record(self, start: Meter, end: Meter, child_cpu_s: float = 0.0) -> None:
        """CPU between two snapshots; `child_cpu_s`: what client child processes report."""
        self.wall_s = end.wall - start.wall
        self.client_cpu_s = end.own_cpu - start.own_cpu + child_cpu_s
        self.server_cpu_s = end.server_cpu - start.server_cpu
        busy = end.system_busy - start.system_busy
        self.others_cpu_s = max(0.0, busy - self.client_cpu_s - self.server_cpu_s)

    def summary(self, baseline: float) -> dict[str, Any]:
        per = max(self.messages, 1)
        wall = max(self.wall_s, 1e-9)
        return {
            "name": self.name,
            "what": self.what,
            "messages": self.messages,
            **{k: v for k, v in asdict(self.tally).items() if k != "acked"},
            "wall_s": round(self.wall_s, 3),
            "msgs_per_s": round(self.rate, 1),
            "vs_baseline": round(self.rate / baseline, 2) if baseline else None,
            "client_cpu_us_per_msg": round(self.client_cpu_s / per * 1e6, 1),
            "server_cpu_us_per_msg": round(self.server_cpu_s / per * 1e6, 1),
            "client_cpu_pct_of_core": round(100 * self.client_cpu_s / wall, 1),
            "server_cpu_pct_of_core": round(100 * self.server_cpu_s / wall, 1),
            "others_cpu_pct_of_core": round(100 * self.others_cpu_s / wall, 1),
            **self.extra,
        }


class Bench:
    def __init__(self, server: LocalAbly, args: argparse.Namespace) -> None:
        self.server = server
        self.args = args
        assert server._proc is not None
        self.server_pid = server._proc.pid

    async def measure(self, phase: Phase, load: Callable[[], Awaitable[Tally]]) -> Phase:
        """Run `load` in this process, timing it and every side's CPU."""
        start = Meter.take(self.server_pid)
        phase.tally = await load()
        phase.record(start, Meter.take(self.server_pid))
        return phase

    async def awaited(self) -> Phase:
        a = self.args
        phase = Phase("awaited", "publish, each awaited, 1 connection (baseline)")
        clients = await connect(self.server.key, self.server.endpoint, 1)
        try:
            (ch,) = await attached(clients, "awaited")
            load = lambda: awaited_publishes(ch, a.seconds, a.max_messages, a.stall_timeout)  # noqa: E731
            return await self.measure(phase, load)
        finally:
            await close_all(clients)

    async def unawaited(self, connections: int, window: int, name: str) -> Phase:
        a = self.args
        phase = Phase(name, f"publish, un-awaited in windows of {window}, {connections} conn")
        clients = await connect(self.server.key, self.server.endpoint, connections)
        try:
            channels = await attached(clients, name)
            cap = a.max_messages // connections

            async def load() -> Tally:
                tallies = await asyncio.gather(
                    *(
                        windowed_publishes(ch, a.seconds, cap, window, a.stall_timeout)
                        for ch in channels
                    )
                )
                total = Tally()
                for tally in tallies:
                    total.add(tally)
                return total

            return await self.measure(phase, load)
        finally:
            await close_all(clients)

    async def unawaited_processes(self, processes: int, connections: int) -> Phase:
        a = self.args
        phase = Phase(
            f"unawaited{processes * connections}p",
            f"publish, windows of {a.window}, {processes} processes x {connections} conn",
        )
        spec = {
            "role": "publisher",
            "key": self.server.key,
            "endpoint": self.server.endpoint,
            "connections": connections,
            "seconds": a.seconds,
            "cap": a.max_messages // (processes * connections),
            "window": a.window,
            "stall_s": a.stall_timeout,
        }
        children: list[JsonChild] = []
        try:
            children = [
                await JsonChild.start(SCRIPT, spec, "bench child") for _ in range(processes)
            ]
            for child in children:
                await child.read(CHILD_TIMEOUT_S)
            start = Meter.take(self.server_pid)
            for child in children:
                await child.send("go")
            reports = [await c.read(a.seconds + CHILD_TIMEOUT_S) for c in children]
            phase.record(start, Meter.take(self.server_pid), sum(r["cpu_s"] for r in reports))
        finally:
            for child in children:
                await child.stop(10, raise_if_killed=True)
        for report in reports:
            phase.tally.add(report["tally"])
        return phase

    async def appends(self) -> Phase:
        a = self.args
        phase = Phase(
            "appends",
            f"{a.responses} concurrent responses x (create + {a.appends} un-awaited appends)",
        )
        clients = await connect(self.server.key, self.server.endpoint, 1)
        try:
            (ch,) = await attached(clients, "appends")
            cap = a.max_messages // a.responses
            responses = 0

            async def load() -> Tally:
                nonlocal responses
                results = await asyncio.gather(
                    *(
                        response_appends(ch, a.seconds, cap, a.appends, a.stall_timeout)
                        for _ in range(a.responses)
                    )
                )
                total = Tally()
                for tally, done in results:
                    total.add(tally)
                    responses += done
                return total

            await self.measure(phase, load)
            phase.extra["responses"] = responses
            phase.extra["responses_per_s"] = round(responses / phase.wall_s, 1)
            return phase
        finally:
            await close_all(clients)

    async def delivery(self) -> Phase:
        a = self.args
        phase = Phase("delivery", f"1 subscriber (child process); windows of {a.window}")
        clients = await connect(self.server.key, self.server.endpoint, 1)
        sub: JsonChild | None = None
        try:
            (ch,) = await attached(clients, "delivery")
            sub = await JsonChild.start(
                SCRIPT,
                {
                    "role": "subscriber",
                    "key": self.server.key,
                    "endpoint": self.server.endpoint,
                    "channel": ch.name,
                    "grace_s": 10.0,
                },
                "bench child",
            )
            await sub.read(CHILD_TIMEOUT_S)
            # Unloaded latency: a paced trickle, each publish awaited.
            paced = Tally()
            interval = 1 / a.paced_rate
            next_at = time.perf_counter()
            paced_until = next_at + a.paced_seconds
            while time.perf_counter() < paced_until:
                message = Message(name="paced", data=str(time.time_ns()))
                await settle(ch, [asyncio.create_task(ch.publish(message))], paced, a.stall_timeout)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            # Load: un-awaited windows, each message stamped as it is made.
            await sub.send("go")
            flood_start = time.time()
            start = Meter.take(self.server_pid)
            flood = await windowed_publishes(
                ch,
                a.seconds,
                a.max_messages,
                a.window,
                a.stall_timeout,
                data=lambda: str(time.time_ns()),
                name="flood",
            )
            publish_s = time.time() - flood_start
            counts = {"paced": paced.acked, "flood": flood.acked}
            await ch.publish(Message(name="end", data=json.dumps(counts)))
            await sub.send("go")
            report = await sub.read(CHILD_TIMEOUT_S)
            end = Meter.take(self.server_pid)
        finally:
            if sub is not None:
                await sub.stop(10, raise_if_killed=True)
            await close_all(clients)
        publisher_cpu = end.own_cpu - start.own_cpu
        received = report["received"]["flood"]
        phase.record(start, end, report["cpu_s"])
        last = report["last_received"].get("flood", flood_start)
        phase.wall_s = max(last - flood_start, 1e-9)  # first publish to last receive
        phase.tally = Tally(acked=received)
        phase.extra.update(
            {
                "published": flood.acked,
                "publish_tally": asdict(flood),
                "publish_acked_per_s": round(flood.acked / publish_s, 1),
                "received_paced": f"{report['received']['paced']}/{paced.acked}",
                "latency_ms_loaded": report["latency_ms"]["flood"],
                "latency_ms_paced": report["latency_ms"]["paced"],
                "paced_rate": a.paced_rate,
                "publisher_cpu_us_per_msg": round(publisher_cpu / max(flood.acked, 1) * 1e6, 1),
                "subscriber_cpu_us_per_msg": round(report["cpu_s"] / max(received, 1) * 1e6, 1),
            }
        )
        return phase

    async def run(self) -> list[Phase]:
        a = self.args
        steps: list[tuple[str, Callable[[], Awaitable[Phase]]]] = [
            ("awaited", self.awaited),
            ("unawaited", lambda: self.unawaited(1, a.window, "unawaited")),
            ("unawaited32", lambda: self.unawaited(1, 32, "unawaited32")),
            ("unawaited4", lambda: self.unawaited(4, a.window, "unawaited4")),
            ("unawaited4p", lambda: self.unawaited_processes(2, 2)),
            ("appends", self.appends),
            ("delivery", self.delivery),
        ]
        phases = []
        for name, step in steps:
            if a.only and name not in a.only:
                continue
            if not a.json:
                print(f"... {name}", file=sys.stderr, flush=True)
            phases.append(await step())
        return phases


# --- report --------------------------------------------------------------------------------

COLUMNS: list[tuple[str, int, Callable[[dict[str, Any]], Any]]] = [  # heading, width, value
    ("phase", -12, lambda r: r["name"]),
    ("msgs/s", 7, lambda r: f"{r['msgs_per_s']:.0f}"),
    ("x base", 6, lambda r: "-" if r["vs_baseline"] is None else f"{r['vs_baseline']:.2f}"),
    ("msgs", 7, lambda r: r["messages"]),
    ("ack lost", 8, lambda r: r["acks_lost"]),
    ("stalls", 6, lambda r: r["stalls"]),
    ("fail", 4, lambda r: r["failed"] + r["unacked"]),
    ("cli µs/msg", 10, lambda r: f"{r['client_cpu_us_per_msg']:.0f}"),
    ("srv µs/msg", 10, lambda r: f"{r['server_cpu_us_per_msg']:.0f}"),
    ("cli %", 5, lambda r: f"{r['client_cpu_pct_of_core']:.0f}"),
    ("srv %", 5, lambda r: f"{r['server_cpu_pct_of_core']:.0f}"),
    ("oth %", 5, lambda r: f"{r['others_cpu_pct_of_core']:.0f}"),
]


def _line(cells: list[Any]) -> str:
    return " ".join(
        f"{c!s:<{-w}}" if w < 0 else f"{c!s:>{w}}"
        for c, (_, w, _) in zip(cells, COLUMNS, strict=True)
    )


def report(phases: list[Phase], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    base = next((p.rate for p in phases if p.name == "awaited"), 0.0)
    rows = [p.summary(base) for p in phases]
    if args.json:
        print(json.dumps({**meta, "baseline_msgs_per_s": round(base, 1), "phases": rows}, indent=2))
        return
    print(
        f"\nSockudo {meta['sockudo']}, ably-python {meta['ably']}, {meta['cpus']} CPUs, "
        f"{meta['seconds']:g} s per phase, load average at start {meta['loadavg']}"
    )
    if meta["stats_flush_interval_ms"] is not None:
        print(f"Sockudo stats_flush_interval_ms = {meta['stats_flush_interval_ms']}")
    print()
    print(_line([heading for heading, _, _ in COLUMNS]))
    for r in rows:
        print(_line([value(r) for _, _, value in COLUMNS]))
    print(
        "\nmsgs/s: messages the server took (futures resolved) over the phase's wall time; "
        "x base: vs awaited.\nCPU %: CPU time over wall time, 100 = one core busy. "
        "cli = client process(es), srv = Sockudo,\noth = every other process on the machine. "
        "ack lost: resolved by a later ACK (Sockudo dropped its own);\nstalls: waits that "
        f"ran into --stall-timeout ({meta['stall_timeout_s']} s) and needed a nudge; "
        "fail: raised or never resolved."
    )
    for r in rows:
        print(f"  {r['name']}: {r['what']}")
        if r["name"] == "appends":
            print(f"    responses completed: {r['responses']} ({r['responses_per_s']}/s)")
        if r["name"] == "delivery":
            print(
                f"    published {r['published']} ({r['publish_acked_per_s']}/s acked), received "
                f"{r['messages']} (msgs/s above = received, first publish to last receive)"
            )
            print(f"    latency under load (ms): {r['latency_ms_loaded']}")
            print(
                f"    latency paced at {r['paced_rate']:g}/s (ms): {r['latency_ms_paced']} "
                f"(received {r['received_paced']})"
            )
            print(
                f"    CPU µs/msg: publisher {r['publisher_cpu_us_per_msg']}, "
                f"subscriber {r['subscriber_cpu_us_per_msg']}"
            )


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "sockudo": SOCKUDO_VERSION,
        "ably": version("ably"),
        "cpus": os.cpu_count(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "seconds": args.seconds,
        "window": args.window,
        "stall_timeout_s": args.stall_timeout,
        "stats_flush_interval_ms": args.stats_flush_interval_ms,
    }


PHASES = ["awaited", "unawaited", "unawaited32", "unawaited4", "unawaited4p", "appends", "delivery"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    p.add_argument("--max-messages", type=int, default=200_000, help="cap per phase")
    p.add_argument("--window", type=int, default=500, help="un-awaited publishes per wait")
    p.add_argument("--responses", type=int, default=10, help="concurrent responses (appends)")
    p.add_argument("--appends", type=int, default=50, help="appends per response")
    p.add_argument("--paced-rate", type=float, default=100.0, help="msgs/s for paced latency")
    p.add_argument("--paced-seconds", type=float, default=2.0)
    p.add_argument(
        "--stall-timeout", type=float, default=0.2, help="seconds to wait for ACKs before nudging"
    )
    p.add_argument(
        "--stats-flush-interval-ms",
        type=int,
        default=None,
        help="set Sockudo's [ably_compat] stats_flush_interval_ms (default: LocalAbly's, 0; "
        "Sockudo's own default is 10)",
    )
    p.add_argument("--only", nargs="+", choices=PHASES, help="run only these phases")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    if args.child:
        spec = json.loads(args.child)
        role = child_publisher if spec["role"] == "publisher" else child_subscriber
        await role(spec)
        return 0
    # SIGTERM cancels the run like Ctrl-C does, so Sockudo and the children are stopped.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    flush = args.stats_flush_interval_ms
    async with LocalAbly(**({} if flush is None else {"stats_flush_interval_ms": flush})) as server:
        meta = _meta(args)
        phases = await Bench(server, args).run()
    report(phases, args, meta)
    return 0


def main() -> int:
    quiet_sdk_logs()
    try:
        return asyncio.run(amain(parse_args()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


if __name__ == "__main__":
    sys.exit(main())
