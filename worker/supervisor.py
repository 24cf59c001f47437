"""Several worker processes in one dyno: `WORKER_PROCESSES` children of `worker run`.

One asyncio process uses one core; the supervisor starts `WORKER_PROCESSES` children
(`python -m worker run` with `WORKER_PROCESSES=1`), each a whole worker with its own
consumer, heartbeat and Ably connections, logging straight to the inherited stderr.

- SIGTERM or SIGINT is forwarded once to every child; the supervisor then waits for them
  within the shutdown budget (`ShutdownBudget.total_s`, 28 s by default), SIGKILLs any
  still alive after it and exits 0 when all drained cleanly.
- A child that dies while the supervisor is not stopping is started again after a
  backoff that grows while it keeps dying quickly; its jobs move through the heartbeat
  reclaim like any dead worker's. A start failure (status 1 or 2 within a minute of the
  first start: Redis unreachable, a refused key) stops the supervisor with that status
  rather than a restart loop.
- A child under a supervisor (`WORKER_SUPERVISED=<supervisor pid>`) drains by itself when
  the supervisor is gone (SIGKILL, OOM): see `watch_supervisor`, called from `app.serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from worker.logs import get_logger

log = get_logger("worker.supervisor")

SUPERVISED_ENV = "WORKER_SUPERVISED"  # the supervisor's pid, in each child's environment
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0  # a child that lived this long starts again at the first backoff
# A first start that exits 1 (a StartupError) or 2 (bad configuration) this early is a
# start failure: restarting would fail the same way forever. The start's own checks take
# up to ~45 s (Redis retries, Ably's 30 s connect timeout) and imports alone take seconds
# on a busy dyno; a crash that early in a first start is no better restarted anyway (the
# dyno exits, Heroku restarts it).
START_WINDOW_S = 60.0
START_FAILURE_STATUSES = (1, 2)
# A child stopped by the forwarded signal before it installed its handlers held no job.
CLEAN_STATUSES = (0, -signal.SIGTERM, -signal.SIGINT)
PARENT_CHECK_S = 1.0


def next_backoff(previous_s: float, lived_s: float) -> float:
    """The wait before a dead child starts again: doubling while it keeps dying quickly."""
    if previous_s <= 0 or lived_s >= STABLE_AFTER_S:
        return BACKOFF_FIRST_S
    return min(previous_s * 2, BACKOFF_MAX_S)


def is_start_failure(first_start: bool, status: int, lived_s: float) -> bool:
    return first_start and status in START_FAILURE_STATUSES and lived_s < START_WINDOW_S


def child_command() -> list[str]:
    return [sys.executable, "-m", "worker", "run"]


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The supervisor's environment (settings already validated there), one process per
    child, and the supervisor's pid so that an orphan notices."""
    env = dict(os.environ if base is None else base)
    env.update({"WORKER_PROCESSES": "1", SUPERVISED_ENV: str(os.getpid())})
    return env


@dataclass
class Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    started_at: float = 0.0
    backoff_s: float = 0.0
    status: int | None = None  # the last child's exit status (negative: its signal)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    def __init__(
        self,
        processes: int,
        budget_s: float,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.slots = [Slot(index) for index in range(1, processes + 1)]
        self.budget_s = budget_s
        self.command = list(command or child_command())
        self.env = child_env(env)
        self.stopping = asyncio.Event()
        self.stop_signal = signal.SIGTERM
        self.failure: int | None = None  # a first start's failure status: ours too

    async def run(self) -> int:
        """Start the children, keep them running until a signal, drain; the exit status."""
        self._install_signal_handlers()
        log.info("supervisor.started", processes=len(self.slots), pid=os.getpid(),
                 budget_s=self.budget_s)  # fmt: skip
        keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        await self.stopping.wait()
        began = time.monotonic()
        _, late = await asyncio.wait(keepers, timeout=self.budget_s)
        killed = [slot for slot in self.slots if slot.alive]
        for slot in killed:  # past the budget: Heroku's own SIGKILL is 2 s away
            with contextlib.suppress(ProcessLookupError):
                assert slot.proc is not None
                slot.proc.kill()
        if late:
            await asyncio.wait(late, timeout=5)
        log.info("supervisor.stopped", drain_s=round(time.monotonic() - began, 2),
                 killed=len(killed), failure=self.failure)  # fmt: skip
        if self.failure is not None:
            return self.failure
        clean = not killed and all(s.status in (None, *CLEAN_STATUSES) for s in self.slots)
        return 0 if clean else 1

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        # Forward first, log after (as the worker does): the log stream cannot delay it.
        stopping = self.stopping.is_set()
        if not stopping:
            self._stop(sig)
        log.info("supervisor.signal", signal=sig.name, stopping=stopping)

    def _stop(self, sig: signal.Signals) -> None:
        """Once: every live child gets `sig` (children started later get it at start)."""
        self.stop_signal = sig
        self.stopping.set()
        for slot in self.slots:
            if slot.alive:
                self._signal(slot, sig)

    @staticmethod
    def _signal(slot: Slot, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            assert slot.proc is not None
            slot.proc.send_signal(sig)

    async def _keep(self, slot: Slot) -> None:
        """Run one slot's child until the supervisor stops, restarting it when it dies."""
        while not self.stopping.is_set():
            status = await self._run_child(slot)
            lived_s = time.monotonic() - slot.started_at
            fields = {"slot": slot.index, "pid": slot.proc.pid if slot.proc else None,
                      **_describe_status(status), "lived_s": round(lived_s, 1)}  # fmt: skip
            if self.stopping.is_set():
                log.info("supervisor.child_exited", **fields, restarting=False)
                return
            if is_start_failure(slot.starts == 1, status, lived_s):
                log.error("supervisor.child_exited", **fields, restarting=False,
                          start_failure=True)  # fmt: skip
                self.failure = status
                self._stop(signal.SIGTERM)
                return
            slot.backoff_s = next_backoff(slot.backoff_s, lived_s)
            log.warning("supervisor.child_exited", **fields, restarting=True,
                        backoff_s=slot.backoff_s)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), slot.backoff_s)

    async def _run_child(self, slot: Slot) -> int:
        """Start one child and wait for its end; its exit status (negative: a signal)."""
        slot.starts += 1
        slot.started_at = time.monotonic()
        slot.proc = None
        try:
            slot.proc = await asyncio.create_subprocess_exec(*self.command, env=self.env)
        except OSError as exc:  # no fork (memory, process limit): a crash like any other
            log.error("supervisor.child_start_failed", slot=slot.index, error=str(exc))
            slot.status = 1
            return 1
        log.info("supervisor.child_started", slot=slot.index, pid=slot.proc.pid,
                 start=slot.starts)  # fmt: skip
        if self.stopping.is_set():  # the signal came while it was being started
            self._signal(slot, self.stop_signal)
        slot.status = await slot.proc.wait()
        return slot.status


def _describe_status(status: int) -> dict[str, object]:
    if status < 0:
        with contextlib.suppress(ValueError):
            return {"status": None, "signal": signal.Signals(-status).name}
    return {"status": status, "signal": None}


async def supervise(processes: int, grace_s: float) -> int:
    """`worker run` with WORKER_PROCESSES > 1: the exit status for the whole dyno."""
    from worker.runtime import ShutdownBudget

    return await Supervisor(processes, ShutdownBudget(grace_s=grace_s).total_s).run()


# -- in the child ----------------------------------------------------------------------

_watch: asyncio.Task[None] | None = None  # held, so the loop's weak reference suffices


def watch_supervisor(stop: asyncio.Event) -> None:
    """Under a supervisor, set `stop` (drain as on SIGTERM) once the supervisor is gone,
    so a SIGKILLed or OOM-killed supervisor leaves no orphan workers behind."""
    global _watch
    value = os.environ.get(SUPERVISED_ENV, "")
    if not value.isdigit():
        return
    _watch = asyncio.create_task(_watch_parent(int(value), stop))


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    # An orphan is adopted by init (or a subreaper): its parent pid changes. Checked from
    # the start, so a supervisor that died while this child was starting is caught too.
    while not stop.is_set():
        if os.getppid() != parent:
            stop.set()
            log.warning("worker.supervisor_gone", supervisor_pid=parent)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PARENT_CHECK_S)
