"""The daemon: slots, housekeeping, cancellation, signals and the graceful drain.

`Worker.run(stop)` takes jobs while it has free slots, runs each in its own task, and
keeps named housekeeping coroutines going beside them (heartbeat, lease watch, reclaim,
promote due retries, stats). When `stop` is set (SIGTERM, SIGINT) it drains inside its
`ShutdownBudget`: no take, no reclaim, no promote; in-flight jobs get the grace period
to finish, the rest are closed as `interrupted` and requeued, presence is left, and
`run` returns. Nothing else ends it: a failing housekeeping step is logged and tried
again.

The heartbeat renews this process's lease on its jobs (`worker.lease`). A lease that
lapses (Redis unreachable or hung, the process frozen) abandons every running job at
once: its publisher stops sending, and the queue's fence refuses its transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from worker import __version__, gc_tuning
from worker.job_runner import JobControl, JobRunner, StopReason
from worker.lease import ProcessLease
from worker.logs import bind_job, get_logger
from worker.queue import Delivery, Queue
from worker.sessions.manager import SessionManager
from worker.transport import ait, contract
from worker.transport.pool import ConnectionPool
from worker.transport.presence import AgentPresence

log = get_logger("worker")

HOLD_CANCEL_S = 30.0  # an `ai-cancel` for a job not running here yet waits this long

T = TypeVar("T")


@dataclass(frozen=True)
class ShutdownBudget:
    """The whole shutdown, from the first SIGTERM to exit, in one place. Heroku sends
    SIGKILL 30 s after its first SIGTERM: with the defaults this worker is gone by 28 s,
    and should anything hang past that, `app` exits the process anyway."""

    grace_s: float = 20.0  # in-flight answers may finish (SHUTDOWN_GRACE_SECONDS)
    closing_s: float = 4.0  # the rest are closed `interrupted` and requeued
    step_s: float = 1.0  # each of: leave presence, leave the queue, close the connections
    exit_s: float = 1.0  # the interpreter's own exit

    @property
    def total_s(self) -> float:
        return self.grace_s + self.closing_s + 3 * self.step_s + self.exit_s


@dataclass
class RuntimeOptions:
    concurrency: int
    worker_id: str
    presence_channel: str
    budget: ShutdownBudget = field(default_factory=ShutdownBudget)
    heartbeat_interval_s: float = 5.0
    reclaim_interval_s: float = 5.0
    promote_interval_s: float = 0.5
    stats_interval_s: float = 30.0
    take_block_ms: int = 1000
    cancel_poll_s: float = 0.5  # cancels applied elsewhere (a session) reach running jobs
    cancel_roles: frozenset[str] = frozenset()


@dataclass
class Running:
    delivery: Delivery
    task: asyncio.Task[Any]
    control: JobControl = field(default_factory=JobControl)


class Worker:
    def __init__(
        self,
        queue: Queue,
        runner: JobRunner,
        pool: ConnectionPool,
        options: RuntimeOptions,
        *,
        lease: ProcessLease | None = None,
        sessions: SessionManager | None = None,
    ) -> None:
        self.queue = queue
        self.sessions = sessions
        self._agents: tuple[float, set[str]] = (-float("inf"), set())
        self.lease = lease or ProcessLease(queue.heartbeat_ttl_s)
        self.runner = runner
        self.pool = pool
        self.options = options
        self.running: dict[str, Running] = {}  # by job id
        # Cancel listeners, one per (connection, channel) however many jobs share it.
        self._listening: dict[tuple[int, str], tuple[int, Callable[[Any], None]]] = {}
        # `ai-cancel`s that named no running job: applied if it starts here soon.
        self._held_cancels: list[tuple[str, contract.UserMessage, float]] = []
        self._slot_freed = asyncio.Event()
        self.presence: AgentPresence | None = None
        self.started = time.monotonic()
        self._last_reclaim = -float("inf")
        self._presence_task: asyncio.Task[None] | None = None

    # -- the main loop -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.pool.on_recycle.append(self._on_recycle)
        await self.queue.ensure_group()
        await self._heartbeat()
        await self._enter_presence()
        log.info("worker.started", worker_id=self.options.worker_id, consumer=self.queue.consumer,
                 concurrency=self.options.concurrency, version=__version__)  # fmt: skip
        every = self.options
        # Kept up until the end: the drain's jobs still need their lease.
        upkeep = [
            asyncio.create_task(self._every(every.heartbeat_interval_s, self._heartbeat)),
            asyncio.create_task(self._watch_lease()),
            asyncio.create_task(self._every(every.stats_interval_s, self._stats)),
        ]
        # Stopped with the take loop: nothing new starts once the drain has begun.
        taking = [
            asyncio.create_task(self._every(every.promote_interval_s, self._promote, stop)),
            asyncio.create_task(self._every(every.cancel_poll_s, self._poll_cancels, stop)),
        ]
        if self.sessions is not None:  # released at once on stop: a successor takes over
            self.sessions.running_here = self.running.__contains__
            taking.append(asyncio.create_task(self.sessions.run(stop)))
        try:
            await self._take_until(stop)
            await self._stop_all(taking, wait_s=1.0)
            await self._drain()
        finally:
            await self._stop_all(taking + upkeep, wait_s=0)
            await self._leave()

    @staticmethod
    async def _stop_all(tasks: list[asyncio.Task[None]], wait_s: float) -> None:
        """Let the tasks finish the step they are in (up to `wait_s`), then cancel them."""
        if wait_s > 0:
            await asyncio.wait(tasks, timeout=wait_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _take_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._reclaim_if_due()  # first, and even when every slot is busy
            except Exception as exc:
                log.warning("worker.housekeeping_failed", step="reclaim", error=str(exc))
            if stop.is_set():
                break  # what the reclaim started joins the drain
            free = self.options.concurrency - len(self.running)
            if free <= 0:
                wait_s = self.options.reclaim_interval_s
                await self._wait_any(stop, self._slot_freed, timeout=wait_s)
                self._slot_freed.clear()
                continue
            try:
                if not self.lease.valid():
                    # A job taken now would be abandoned at once, having spent an attempt:
                    # renew the lease first (the heartbeat's own timer may be seconds away).
                    await self._unless_stopped(self._heartbeat(), stop)
                    continue
                deliveries = await self._take_or_stop(free, stop)
            except Exception as exc:  # Redis away: wait and try again, never exit
                log.error("queue.take_failed", error=str(exc))
                await self._wait_any(stop, timeout=1.0)
                continue
            for delivery in deliveries:
                self._start(delivery)

    async def _take_or_stop(self, free: int, stop: asyncio.Event) -> list[Delivery]:
        # Stopping: no new jobs. (XREADGROUP may still have delivered one as the take was
        # cancelled; it stays pending under our name and is reclaimed once we leave.) A
        # take that returned jobs is honoured even when stop came at the same moment: they
        # are ours now, and the drain finishes or requeues them.
        taken = await self._unless_stopped(self.queue.take(free, self.options.take_block_ms), stop)
        return taken or []

    @staticmethod
    async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
        """`work`'s result, or None (and `work` cancelled) if `stop` is set first."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return task.result()

    @staticmethod
    async def _wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
        waits = [asyncio.create_task(e.wait()) for e in events]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # -- one job ------------------------------------------------------------------------

    def _start(self, delivery: Delivery) -> None:
        control = JobControl(alive=self.lease.valid)
        running = Running(delivery, asyncio.create_task(self._run_job(delivery)), control)
        # The task may already be gone if it had nothing to await; keep it only if not.
        self.running[delivery.job_id] = running
        running.task.add_done_callback(lambda _task: self._finished(delivery.job_id))
        self._set_in_flight()
        self._apply_held_cancels(running)

    async def _run_job(self, delivery: Delivery) -> None:
        job = delivery.job
        bind_job(job_id=delivery.job_id, attempt=delivery.attempt,
                 channel=job.channel if job else None)  # fmt: skip
        channel = job.channel if job else ""
        listener = self.sessions.client_of(channel) if self.sessions is not None else None
        lease = self.pool.acquire(channel, prefer=listener)
        # Listening for `cancel` attaches the channel: a round trip the answer need not
        # wait for (publishing needs no attach), and no reason to fail the job if refused.
        listening = None
        if job is not None:
            self.pool.uses.take(lease.client, job.channel)
            listening = asyncio.create_task(self._listen_for_cancel(lease.client, job.channel))
        try:
            control = self.running[delivery.job_id].control
            await self.runner.run(delivery, lease, control)
        except Exception as exc:  # the runner handles its own failures; this is a bug guard
            log.exception("job.crashed", error=str(exc))
        finally:
            if job is not None and listening is not None:
                await self._end_listening(listening, lease.client, job.channel)
                await self.pool.uses.give_back(lease.client, job.channel)
            self.pool.release(lease)

    async def _end_listening(
        self, listening: asyncio.Task[None], client: Any, channel: str
    ) -> None:
        try:
            await listening
        except Exception as exc:
            log.warning("job.cancel_listen_failed", error=str(exc))
        await self._stop_listening(client, channel)

    def _finished(self, job_id: str) -> None:
        running = self.running.pop(job_id, None)
        self._slot_freed.set()
        job = running.delivery.job if running is not None else None
        if self.sessions is not None and job is not None:
            self.sessions.job_ended(job.channel)
        self._set_in_flight()

    def _set_in_flight(self) -> None:
        if self.presence is not None:
            self.presence.set_in_flight(len(self.running))

    # -- cancellation -------------------------------------------------------------------

    async def _listen_for_cancel(self, client: Any, channel_name: str) -> None:
        """Subscribe to `cancel` on a job's channel, once per connection and channel."""
        key = (id(client), channel_name)
        if key in self._listening:
            count, known = self._listening[key]
            self._listening[key] = (count + 1, known)
            return

        def listener(message: Any) -> None:
            self._on_cancel(channel_name, message)  # the SDK wants a plain function

        self._listening[key] = (1, listener)
        await self.pool.uses.ready(client, channel_name)
        channel = client.channels.get(channel_name)
        await channel.subscribe(contract.CANCEL, listener)
        await channel.subscribe(ait.CANCEL, listener)

    async def _stop_listening(self, client: Any, channel_name: str) -> None:
        key = (id(client), channel_name)
        count, listener = self._listening[key]
        if count > 1:
            self._listening[key] = (count - 1, listener)
            return
        del self._listening[key]
        with contextlib.suppress(Exception):
            client.channels.get(channel_name).unsubscribe(contract.CANCEL, listener)
        with contextlib.suppress(Exception):
            client.channels.get(channel_name).unsubscribe(ait.CANCEL, listener)

    def _on_cancel(self, channel_name: str, message: Any) -> None:
        user = contract.user_message(message)
        if user is None or user.kind != "cancel":
            return
        running = self._cancelled_job(channel_name, user)
        if running is None and user.wire == "ait":
            # Its run has not started here yet (the input is still on its way to a job).
            now = time.monotonic()
            self._held_cancels = [h for h in self._held_cancels if h[2] > now]
            self._held_cancels.append((channel_name, user, now + HOLD_CANCEL_S))
            log.info("ait.cancel_held", channel=channel_name, run_id=user.run_id,
                     input_codec_message_id=user.input_codec_message_id)  # fmt: skip
            return
        if running is not None:
            self._cancel_running(running, user)

    def _cancelled_job(self, channel_name: str, user: contract.UserMessage) -> Running | None:
        """The running job a cancel names, on its own channel: by `responseId`, or on the
        AI Transport wire by its run-id or the input codec-message-id it answers."""
        if user.wire == "seed":
            running = self.running.get(user.response_id or "")
        elif user.run_id:
            running = self.running.get(ait.job_id_of_run(user.run_id) or "")
        else:
            running = next(
                (r for r in self.running.values() if r.delivery.job is not None
                 and r.delivery.job.input_codec_message_id == user.input_codec_message_id),
                None,
            )  # fmt: skip
        job = running.delivery.job if running else None
        if job is None or job.channel != channel_name:
            return None  # not ours, or a cancel on another channel naming our job: ignored
        return running

    def _apply_held_cancels(self, running: Running) -> None:
        """A job starting here that an `ai-cancel` named before it ran: stopped now."""
        job = running.delivery.job
        if not self._held_cancels or job is None:
            return
        now = time.monotonic()
        self._held_cancels = [h for h in self._held_cancels if h[2] > now]
        for channel_name, user, _ in self._held_cancels:
            if self._cancelled_job(channel_name, user) is running:
                self._held_cancels = [h for h in self._held_cancels if h[1] is not user]
                # Once the task has begun: a task cancelled before its first step never
                # runs its job at all (no outcome, no transition: the entry would linger).
                asyncio.get_running_loop().call_soon(self._cancel_running, running, user)
                return

    def _cancel_running(self, running: Running, user: contract.UserMessage) -> None:
        job = running.delivery.job
        assert job is not None
        roles = self.options.cancel_roles
        if not contract.may_cancel(user.client_id, user.user_claim, job.user_client_id, roles):
            log.warning("job.cancel_refused", job_id=job.id, by=user.client_id,
                        reason="not the job's user and no allowed role")  # fmt: skip
            return
        log.info("job.cancel_requested", job_id=job.id, by=user.client_id)
        self._stop_job(running, StopReason.USER_CANCEL)

    async def _poll_cancels(self) -> None:
        """Cancels a session applied in Redis (one published while no worker listened,
        or read by another process) reach the job here."""
        flagged = await self.queue.cancel_requested(list(self.running))
        for job_id in flagged:
            running = self.running.get(job_id)
            if running is not None and running.control.reason is None:
                log.info("job.cancel_requested", job_id=job_id, by="session")
                self._stop_job(running, StopReason.USER_CANCEL)

    async def agent_ids(self) -> set[str]:
        """The clientIds of live workers (their messages are never users' prompts)."""
        at, ids = self._agents
        if time.monotonic() - at > 5.0:
            workers = await self.queue.live_workers()
            ids = {self.options.worker_id, *(str(w.get("worker_id")) for w in workers)}
            self._agents = (time.monotonic(), ids)
        return ids

    @staticmethod
    def _stop_job(running: Running, reason: StopReason) -> None:
        if running.control.finishing:
            return  # already closing its message: let it finish as it is
        running.control.reason = reason
        running.task.cancel()

    # -- draining -----------------------------------------------------------------------

    async def _drain(self) -> None:
        budget = self.options.budget
        in_flight = list(self.running.values())
        log.info("worker.draining", in_flight=len(in_flight), grace_s=budget.grace_s)
        if not in_flight:
            return
        _, late = await asyncio.wait([r.task for r in in_flight], timeout=budget.grace_s)
        for running in in_flight:
            if running.task in late:
                self._stop_job(running, StopReason.SHUTDOWN)
        if late:
            # Closing a message and requeueing takes a round trip or two; bounded anyway.
            await asyncio.wait(late, timeout=budget.closing_s)
        # A job that was already closing its message at the end of grace was let finish.
        stopped = sum(r.control.reason is StopReason.SHUTDOWN for r in in_flight)
        log.info("worker.drained", finished=len(in_flight) - stopped, interrupted=stopped)

    async def _leave(self) -> None:
        step_s = self.options.budget.step_s
        if self.presence is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.presence.leave(), step_s)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.queue.leave(), step_s)
        log.info("worker.stopped", uptime_s=round(time.monotonic() - self.started, 1))

    # -- housekeeping -------------------------------------------------------------------

    async def _every(
        self,
        interval_s: float,
        step: Callable[[], Awaitable[None]],
        until: asyncio.Event | None = None,
    ) -> None:
        """Run `step` every `interval_s` until `until` is set (never mid-step)."""
        while True:
            if until is None:
                await asyncio.sleep(interval_s)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait(), interval_s)
                if until.is_set():
                    return
            try:
                await step()
            except Exception as exc:
                log.warning("worker.housekeeping_failed", step=step.__name__, error=str(exc))

    def _heartbeat_info(self) -> dict[str, Any]:
        return {"worker_id": self.options.worker_id, "capacity": self.options.concurrency,
                "in_flight": len(self.running), "version": __version__}  # fmt: skip

    async def _heartbeat(self) -> None:
        sent = self.lease.clock()
        # Lapsed since the last renewal (Redis away, the process frozen): our key may have
        # expired and a live worker may run our jobs already. Whatever this renewal does,
        # those jobs are not ours to touch any more; reclaim or our orphan check decides.
        self._abandon_if_lapsed()
        await self.queue.heartbeat(self._heartbeat_info())
        self.lease.renewed(sent)

    async def _watch_lease(self) -> None:
        """The lease check on its own timer: a renewal that hangs cannot hide a lapse."""
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self.lease.remaining_s())))
            self._abandon_if_lapsed()

    def _abandon_if_lapsed(self) -> None:
        if self.lease.valid():
            return
        lost = [r for r in self.running.values() if r.control.reason is None]
        if lost:
            log.error("worker.heartbeat_lost", abandoned=len(lost))
            # What the SDK still holds for those jobs (queued while the connection was
            # down, say while this process was frozen) must never go out: new clients.
            self.pool.recycle_all("lease lapsed")
        for running in lost:
            running.control.reason = StopReason.HEARTBEAT_LOST
            if not running.control.finishing:  # a finishing job's sends and fence refuse
                running.task.cancel()

    async def _reclaim_if_due(self) -> bool:
        """Reclaim before taking: a dead worker's half-written answers go first, not
        behind the backlog. Returns whether it started any."""
        now = time.monotonic()
        if now - self._last_reclaim < self.options.reclaim_interval_s:
            return False
        self._last_reclaim = now
        before = len(self.running)
        await self._reclaim()
        return len(self.running) > before

    async def _reclaim(self) -> None:
        # A dead worker's half-written answers may use a reserve above the concurrency:
        # users are watching them, and they should not wait for a slot behind the backlog.
        reserve = max(1, self.options.concurrency // 4)
        free = self.options.concurrency + reserve - len(self.running)
        if free <= 0 or not self.lease.valid():  # taken now, a job would be abandoned at once
            return
        running = {r.delivery.entry_id for r in self.running.values()}
        orphans = await self.queue.orphans(running, count=free)
        for delivery in orphans + await self.queue.reclaim(count=free - len(orphans)):
            log.warning("job.reclaimed", job_id=delivery.job_id, attempt=delivery.attempt)
            self._start(delivery)

    async def _promote(self) -> None:
        await self.queue.promote_due()

    async def _stats(self) -> None:
        stats = await self.queue.stats()
        log.info("worker.stats", in_flight=len(self.running), waiting=stats.waiting,
                 pending=stats.pending, delayed=stats.delayed, dead=stats.dead,
                 live_workers=len(stats.workers), lag_s=stats.oldest_waiting_age_s,
                 **gc_tuning.PAUSES.take())  # fmt: skip

    def _on_recycle(self, slot: int) -> None:
        if slot == 0 and self.presence is not None:  # presence lives on the first client
            self.presence.stop_updates()
            task = asyncio.create_task(self._enter_presence())
            self._presence_task = task  # keep a reference until it is done

    async def _enter_presence(self) -> None:
        channel = self.pool.primary.channels.get(self.options.presence_channel)
        self.presence = AgentPresence(channel, self.options.worker_id, self.options.concurrency)
        try:
            await self.presence.enter()
        except Exception as exc:  # the worker still works without presence
            log.warning("worker.presence_failed", error=str(exc))
