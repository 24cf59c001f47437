"""The runtime (`worker.runtime.Worker`): the drain, reclaim, and the lease watch.

The queue and the runner are doubles of our own seams (`FakeQueue`, `FakeRunner`); the
connection pool holds real ably-python clients connected to the local Ably (presence and
the cancel listeners run for real), never a fake of the SDK.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from ably.types.message import Message
from structlog.testing import capture_logs

from tests.unit.doubles import FakeQueue, FakeRunner, ManualClock, make_delivery, wait_until
from worker.devstack.ably import LocalAbly
from worker.job_runner import StopReason
from worker.lease import ProcessLease
from worker.runtime import RuntimeOptions, ShutdownBudget, Worker
from worker.transport.client import realtime_client
from worker.transport.pool import ConnectionPool

# Every phase of the shutdown (grace, closing, leaving...) 0.3 s.
BUDGET = ShutdownBudget(**{phase.name: 0.3 for phase in dataclasses.fields(ShutdownBudget)})
TAKING = ("take", "reclaim", "orphans", "promote_due")


@pytest.fixture
async def pool(local_ably: LocalAbly) -> AsyncIterator[ConnectionPool]:
    """`worker.app.make_pool`, against the local Ably: one real connection."""

    def client() -> Any:
        return realtime_client(
            local_ably.key,
            local_ably.endpoint,
            client_id="unit-worker",
            transport_params={"appendRollupWindow": 40, "echo": False},
        )

    made = ConnectionPool(
        client,
        concurrency=8,
        streams_per_connection=8,
        messages_per_second=44,
        rollup_window_s=0.04,
    )
    yield made
    await made.close()


@pytest.fixture
def channel() -> Callable[[], str]:
    """Fresh conversation channel names: the jobs' cancel listeners attach them."""
    return lambda: f"unit:{uuid.uuid4().hex[:10]}"


def options(concurrency: int = 6, **overrides: Any) -> RuntimeOptions:
    values: dict[str, Any] = {
        "concurrency": concurrency,
        "worker_id": "unit-worker",
        "presence_channel": f"unit:agents:{uuid.uuid4().hex[:8]}",
        "budget": BUDGET,
        "heartbeat_interval_s": 0.05,
        "reclaim_interval_s": 0.05,
        "promote_interval_s": 0.05,
        "stats_interval_s": 60.0,
        "take_block_ms": 50,
    }
    values.update(overrides)
    return RuntimeOptions(**values)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def stop_and_wait(stop: asyncio.Event, run: asyncio.Task[None]) -> None:
    stop.set()
    async with asyncio.timeout(BUDGET.total_s + 3):
        await run


async def test_nothing_is_taken_or_reclaimed_once_the_drain_began(
    pool: ConnectionPool, channel: Callable[[], str]
) -> None:
    """Fault: "Reclaim runs during the drain". The reclaim and promote loops kept running
    after SIGTERM, and a job reclaimed in the grace period was neither awaited nor
    interrupted: it was cut off when the process exited, its message left `streaming`.
    Now no take, reclaim, orphan check or promotion starts once `stop` is set, and every
    job this worker started (here an orphan and a reclaimed job, whose reclaim step was
    already under way when the stop came: the take loop reclaims before it takes, so the
    backlog waits behind a dead worker's jobs) has finished or been stopped with SHUTDOWN
    when `run` returns, and nothing new was taken."""
    queue, runner = FakeQueue(), FakeRunner(durations={"quick": 0.1})
    queue.takeable = [
        make_delivery("quick", channel=channel()),
        make_delivery("long", channel=channel()),
    ]
    queue.orphaned = [make_delivery("orphan", channel=channel())]
    queue.reclaimable = [make_delivery("reclaimed", attempt=2, reclaimed=True, channel=channel())]
    queue.reclaim_gate = asyncio.Event()  # the reclaim answers only after the stop
    # Once the two jobs are handed out, a take waits for entries until cancelled, as
    # XREADGROUP BLOCK does. (With a take that returns empty-handed every 50 ms, the stop
    # can come between the runtime creating its next take task and that task's first
    # step, and the take would start a moment after the stop. The runtime cancels that
    # take at once, as it does one under way, so it is no fault, just a race.)
    queue.take_gate = asyncio.Event()
    worker = Worker(queue, runner, pool, options())  # type: ignore[arg-type]
    stop = asyncio.Event()

    with capture_logs() as logs:
        run = asyncio.create_task(worker.run(stop))
        async with asyncio.timeout(5):
            await queue.reclaim_entered.wait()
        stopped_at = asyncio.get_running_loop().time()
        stop.set()
        await asyncio.sleep(0.05)  # the reclaim under way answers in the grace period
        queue.reclaim_gate.set()
        await stop_and_wait(stop, run)

    started_after = [
        (c.name, round(c.at - stopped_at, 3))
        for c in queue.calls
        if c.name in TAKING and c.at >= stopped_at
    ]
    assert started_after == []
    assert set(runner.started) == {"orphan", "reclaimed"}  # reclaimed first, then the stop
    for job_id in runner.started:
        assert job_id in runner.finished or runner.stopped.get(job_id) is StopReason.SHUTDOWN, (
            f"{job_id} was neither awaited nor interrupted: {runner}"
        )
    assert runner.stopped == {
        "orphan": StopReason.SHUTDOWN,
        "reclaimed": StopReason.SHUTDOWN,
    }
    assert worker.running == {}
    [drained] = events(logs, "worker.drained")
    assert drained["interrupted"] == 2
    assert [e["job_id"] for e in events(logs, "job.reclaimed")] == ["orphan", "reclaimed"]


async def test_a_hung_heartbeat_does_not_hide_a_lost_lease(
    pool: ConnectionPool, channel: Callable[[], str]
) -> None:
    """Fault: "A hung Redis call hides a lost lease". The lease was only checked when a
    heartbeat was sent; a heartbeat that hung (a Redis call that never answers) left the
    worker streaming into jobs another worker had already reclaimed. Now the lease is
    watched on its own timer: once the clock passes it, every running job is stopped
    with HEARTBEAT_LOST and the operator reads `worker.heartbeat_lost`."""
    clock = ManualClock(0.0)
    lease = ProcessLease(ttl_s=0.5, clock=clock)  # the watch wakes every 0.4 s at most
    queue, runner = FakeQueue(), FakeRunner()
    queue.heartbeat_hangs_after = 1  # the first renewal works, the next hangs for good
    queue.takeable = [
        make_delivery("job-a", channel=channel()),
        make_delivery("job-b", channel=channel()),
    ]
    worker = Worker(queue, runner, pool, options(), lease=lease)  # type: ignore[arg-type]
    stop = asyncio.Event()

    with capture_logs() as logs:
        run = asyncio.create_task(worker.run(stop))
        await wait_until(lambda: len(runner.started) == 2 and len(queue.called("heartbeat")) == 2)
        await asyncio.sleep(0.1)
        assert runner.stopped == {}  # a hung heartbeat alone stops nothing while the lease lasts
        clock.advance(1.0)  # the lease (0.5 s less a 0.1 s margin) has lapsed
        await wait_until(lambda: len(runner.stopped) == 2, timeout_s=2.0)
        await stop_and_wait(stop, run)

    assert runner.stopped == {
        "job-a": StopReason.HEARTBEAT_LOST,
        "job-b": StopReason.HEARTBEAT_LOST,
    }
    # The hung renewal never returned (the take loop, finding the lease lapsed, tried
    # one more before taking anything, and it hangs too).
    assert len(queue.called("heartbeat")) >= 2
    lost = events(logs, "worker.heartbeat_lost")
    assert lost and lost[0]["abandoned"] == 2


async def test_the_drain_lets_jobs_finish_within_grace_and_stops_the_rest(
    pool: ConnectionPool, channel: Callable[[], str]
) -> None:
    queue = FakeQueue()
    runner = FakeRunner(durations={"short": 0.15, "medium": 0.25})  # both within grace
    queue.takeable = [
        make_delivery(job_id, channel=channel())
        for job_id in ("short", "medium", "endless-1", "endless-2")
    ]
    worker = Worker(queue, runner, pool, options())  # type: ignore[arg-type]
    stop = asyncio.Event()

    with capture_logs() as logs:
        run = asyncio.create_task(worker.run(stop))
        await wait_until(lambda: len(runner.started) == 4)
        await stop_and_wait(stop, run)

    assert sorted(runner.finished) == ["medium", "short"]
    assert runner.stopped == {
        "endless-1": StopReason.SHUTDOWN,
        "endless-2": StopReason.SHUTDOWN,
    }
    [draining] = events(logs, "worker.draining")
    assert draining["grace_s"] == BUDGET.grace_s
    [drained] = events(logs, "worker.drained")
    assert (drained["finished"], drained["interrupted"]) == (2, 2)
    assert worker.running == {}
    assert queue.names()[-1] == "leave"  # and it left the queue's worker list
    assert all(pool.active[slot] == 0 for slot in range(len(pool.clients)))  # leases returned


# -- cancels from users, over the real local Ably ----------------------------------------


async def publish_cancels(local_ably: LocalAbly, client_id: str, *cancels: tuple[str, str]) -> None:
    """Publish `cancel` messages (channel, responseId), in order, from one user's
    connection: messages from one connection to one channel arrive in order."""
    user = realtime_client(local_ably.key, local_ably.endpoint, client_id=client_id)
    try:
        for channel_name, response_id in cancels:
            cancel = Message(
                name="cancel", data="stop", extras={"headers": {"responseId": response_id}}
            )
            await user.channels.get(channel_name).publish(cancel)
    finally:
        await user.close()


async def listening(pool: ConnectionPool, *channel_names: str) -> None:
    """Wait until the worker's cancel listeners are attached on these channels."""
    client = pool.clients[0]
    await wait_until(
        lambda: all(client.channels.get(name).state == "attached" for name in channel_names)
    )


async def test_a_users_cancel_stops_their_answer_and_only_on_its_channel(
    pool: ConnectionPool, channel: Callable[[], str], local_ably: LocalAbly
) -> None:
    """A `cancel` naming a running job stops it with USER_CANCEL; one naming it on another
    conversation's channel does not (whoever can publish there cannot stop this answer)."""
    here, elsewhere = channel(), channel()
    queue, runner = FakeQueue(), FakeRunner()
    queue.takeable = [
        make_delivery("answer-a", channel=here, user_client_id="alice"),
        make_delivery("answer-b", channel=elsewhere, user_client_id="alice"),
    ]
    worker = Worker(queue, runner, pool, options())  # type: ignore[arg-type]
    stop = asyncio.Event()

    with capture_logs() as logs:
        run = asyncio.create_task(worker.run(stop))
        await wait_until(lambda: len(runner.started) == 2)
        await listening(pool, here, elsewhere)
        # On `elsewhere`: first a cancel naming answer-a (not that channel's), then one
        # for answer-b. Once answer-b is stopped, the first was read and ignored.
        await publish_cancels(local_ably, "alice", (elsewhere, "answer-a"), (elsewhere, "answer-b"))
        await wait_until(lambda: "answer-b" in runner.stopped)
        assert "answer-a" not in runner.stopped
        await publish_cancels(local_ably, "alice", (here, "answer-a"))
        await wait_until(lambda: "answer-a" in runner.stopped)
        await stop_and_wait(stop, run)

    assert runner.stopped == {
        "answer-a": StopReason.USER_CANCEL,
        "answer-b": StopReason.USER_CANCEL,
    }
    requested = [(e["job_id"], e["by"]) for e in events(logs, "job.cancel_requested")]
    assert requested == [("answer-b", "alice"), ("answer-a", "alice")]


# -- found while writing these tests (fixed, or xfail until fixed) -----------------------


async def test_only_the_jobs_user_may_cancel_it(
    pool: ConnectionPool, channel: Callable[[], str], local_ably: LocalAbly
) -> None:
    """DESIGN.md, Cancellation: "only the job's user (`user_client_id`) or a client whose
    Ably-verified `extras.userClaim` carries an allowed role may cancel". Another user of
    the same conversation channel must not be able to stop alice's answer."""
    shared = channel()
    queue, runner = FakeQueue(), FakeRunner()
    queue.takeable = [
        make_delivery("alices", channel=shared, user_client_id="alice"),
        make_delivery("mallorys", channel=shared, user_client_id="mallory"),
    ]
    worker = Worker(queue, runner, pool, options())  # type: ignore[arg-type]
    stop = asyncio.Event()

    with capture_logs():
        run = asyncio.create_task(worker.run(stop))
        await wait_until(lambda: len(runner.started) == 2)
        await listening(pool, shared)
        # Mallory cancels alice's answer, then her own: once hers is stopped, the first
        # cancel has been read.
        await publish_cancels(local_ably, "mallory", (shared, "alices"), (shared, "mallorys"))
        await wait_until(lambda: "mallorys" in runner.stopped)
        alices = runner.stopped.get("alices")
        await stop_and_wait(stop, run)

    assert alices is None, "mallory stopped alice's answer"


async def test_no_new_job_starts_while_the_lease_has_lapsed(
    pool: ConnectionPool, channel: Callable[[], str]
) -> None:
    """While this process's lease has lapsed its jobs may be anyone's: a job taken now
    would be abandoned at once (its publisher refuses to send), unrun, with an attempt
    spent (the queue counts every take), and wait for an orphan check. A Redis outage
    longer than the lease ends this way: take retries every second, the heartbeat only
    every ttl/3, so jobs are taken before the lease is renewed."""
    clock = ManualClock(0.0)
    lease = ProcessLease(ttl_s=0.5, clock=clock)
    queue, runner = FakeQueue(), FakeRunner()
    queue.heartbeat_hangs_after = 1
    worker = Worker(queue, runner, pool, options(), lease=lease)  # type: ignore[arg-type]
    stop = asyncio.Event()

    with capture_logs():
        run = asyncio.create_task(worker.run(stop))
        await wait_until(lambda: len(queue.called("heartbeat")) == 2)
        clock.advance(1.0)  # lapsed
        queue.takeable = [make_delivery("arrives-during-the-lapse", channel=channel())]
        queue.orphaned = [make_delivery("orphaned-by-the-lapse", attempt=2, channel=channel())]
        await asyncio.sleep(0.5)  # ten takes' and ten orphan checks' worth
        await stop_and_wait(stop, run)

    assert runner.started == []


async def test_drained_does_not_count_a_finishing_job_as_interrupted(
    pool: ConnectionPool, channel: Callable[[], str]
) -> None:
    """A job whose answer ended just before the grace period did, and whose closing
    (close the message, one queue transition) runs past it, is not stopped (its
    `control.finishing` is set): it completes. The operator's `worker.drained` line should
    not report it as interrupted (and requeued) when it was not."""
    queue = FakeQueue()
    # Streams 0.25 s, then spends 0.2 s closing: past the 0.3 s grace, within closing_s.
    runner = FakeRunner(durations={"closing-late": 0.25}, finishing_s={"closing-late": 0.2})
    queue.takeable = [make_delivery("closing-late", channel=channel())]
    worker = Worker(queue, runner, pool, options())  # type: ignore[arg-type]
    stop = asyncio.Event()

    with capture_logs() as logs:
        run = asyncio.create_task(worker.run(stop))
        await wait_until(lambda: runner.started == ["closing-late"])
        await stop_and_wait(stop, run)

    assert runner.finished == ["closing-late"] and runner.stopped == {}
    [drained] = events(logs, "worker.drained")
    assert (drained["finished"], drained["interrupted"]) == (1, 0)


def test_the_default_shutdown_fits_inside_herokus_30_s() -> None:
    """Fault: "Shutdown can outlast Heroku": 25 s grace + 5 s close/requeue + 5 s presence
    leave = 35 s, while Heroku sends SIGKILL 30 s after SIGTERM. With the default settings
    the whole budget (and so the watchdog that ends the process) is 28 s."""
    from worker.settings import Settings

    default_grace = Settings.model_fields["shutdown_grace_seconds"].default
    assert ShutdownBudget(grace_s=default_grace).total_s <= 28.0
