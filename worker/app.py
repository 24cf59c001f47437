"""Wiring: settings in, a running worker out. The CLI's `run` and `dev` call `serve`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from worker import eventloop, gc_tuning
from worker.job_runner import JobRunner
from worker.logs import get_logger
from worker.model import Model, make_client
from worker.queue import RedisStreamsQueue
from worker.redaction import register_secrets, secrets_of
from worker.redis_client import connect_redis
from worker.runtime import RuntimeOptions, ShutdownBudget, Worker
from worker.sessions.manager import ManagerOptions, SessionManager
from worker.sessions.session import SessionOptions
from worker.sessions.store import SessionStore
from worker.settings import RedisSettings, Settings
from worker.supervisor import watch_supervisor
from worker.transport.client import realtime_client
from worker.transport.pool import ConnectionPool

log = get_logger("worker")

ABLY_CONNECT_TIMEOUT_S = 30.0


class StartupError(RuntimeError):
    """The worker cannot start (a refused key, an unreachable service); says which."""


def make_queue(
    settings: RedisSettings, consumer: str = "cli", max_attempts: int = 3
) -> RedisStreamsQueue:
    return RedisStreamsQueue(
        connect_redis(settings.redis_url),
        prefix=settings.queue_prefix,
        consumer=consumer,
        max_attempts=max_attempts,
    )


def make_sessions(
    settings: Settings,
    queue: RedisStreamsQueue,
    pool: ConnectionPool,
    agent_ids: Callable[[], Awaitable[set[str]]],
) -> SessionManager:
    store = SessionStore(
        queue.redis, settings.queue_prefix, queue.consumer, settings.session_lease_seconds
    )
    options = ManagerOptions(
        listen_channels=settings.listen_channel_list,
        idle_s=settings.session_idle_seconds,
        lease_ttl_s=settings.session_lease_seconds,
        session=SessionOptions(
            api=settings.openai_api,
            cancel_roles=settings.cancel_role_set,
            wire_protocol=settings.wire_protocol,
        ),
    )
    return SessionManager(store, queue, pool, options, agent_ids)


def consumer_name(worker_id: str) -> str:
    """One consumer per process: on Heroku a restarted dyno's successor shares its DYNO."""
    return f"{worker_id}:{uuid.uuid4().hex[:6]}"


def make_ably(settings: Settings) -> Any:
    return realtime_client(
        settings.ably_api_key.get_secret_value(),
        settings.ably_endpoint,
        client_id=settings.worker_id,
        auto_connect=False,  # the pool dials them a wave at a time
        # No echo: a connection that listens for `cancel` on a channel it streams into
        # need not receive its own appends back.
        transport_params={"appendRollupWindow": settings.append_rollup_window_ms, "echo": False},
    )


def make_pool(settings: Settings) -> ConnectionPool:
    return ConnectionPool(
        lambda: make_ably(settings),
        concurrency=settings.worker_concurrency,
        streams_per_connection=settings.streams_per_connection,
        messages_per_second=settings.ably_messages_per_second,
        rollup_window_s=settings.append_rollup_window_ms / 1000,
    )


async def wait_connected(ably: Any, timeout_s: float = ABLY_CONNECT_TIMEOUT_S) -> None:
    """Wait for the Ably connection; a refused key or no answer is a StartupError."""
    try:
        async with asyncio.timeout(timeout_s):
            while ably.connection.state != "connected":
                reason = ably.connection.error_reason
                # A refused key leaves the SDK retrying (disconnected, 80019 with status
                # 401) rather than failed; either way it will not connect by itself.
                refused = getattr(reason, "status_code", 0) in (401, 403)
                if ably.connection.state == "failed" or refused:
                    raise StartupError(
                        f"Ably refused the connection: {reason} (check ABLY_API_KEY)"
                    )
                await asyncio.sleep(0.05)
    except TimeoutError:
        reason = ably.connection.error_reason
        last = f": {_reason_text(reason)}" if reason is not None else ""
        raise StartupError(
            f"no Ably connection after {timeout_s:.0f} s{last} "
            "(check ABLY_ENDPOINT and the network)"
        ) from None


def _reason_text(reason: Any) -> str:
    """An SDK error reason on one line: its message and code, not its repr."""
    message = getattr(reason, "message", None) or str(reason)
    code = getattr(reason, "code", None)
    return " ".join(f"{message} ({code})".split() if code else str(message).split())


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT start the drain. Heroku may send SIGTERM twice: the second one
    is logged and changes nothing; Heroku's SIGKILL comes 30 s after the first anyway."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        # Stop first, log after: nothing that happens to the log stream may keep the
        # worker from draining.
        draining = stop.is_set()
        stop.set()
        log.info("worker.signal", signal=sig.name, draining=draining)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


# The start's Redis check answers within a second: a few quick retries (a Redis that is
# starting too), not the worker's patient backoff (connect_redis' default rides out a
# failover for ~12 s, which at the start only delays the one line that says what is wrong).
STARTUP_REDIS_RETRIES = 3
STARTUP_REDIS_TIMEOUT_S = 5.0  # a host that swallows packets: connect timeouts add up


async def _check_redis(redis_url: str) -> None:
    """PING Redis on a connection of its own; unreachable or refused is a StartupError."""
    try:
        redis = connect_redis(redis_url, retries=STARTUP_REDIS_RETRIES)
    except ValueError as exc:  # a URL redis-py cannot read (its message never quotes it)
        raise StartupError(f"REDIS_URL is not a Redis URL redis-py can read: {exc}") from None
    try:
        async with asyncio.timeout(STARTUP_REDIS_TIMEOUT_S):
            await redis.ping()
    except RedisError as exc:  # its message names host and port, never the password
        raise StartupError(f"cannot reach Redis: {exc} (check REDIS_URL)") from None
    except TimeoutError:
        raise StartupError(
            f"cannot reach Redis: no answer in {STARTUP_REDIS_TIMEOUT_S:.0f} s "
            "(check REDIS_URL and the network)"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(redis.aclose(), 1)


async def serve(
    settings: Settings, stop: asyncio.Event | None = None, *, handle_signals: bool = True
) -> None:
    """Run the worker until `stop` is set (or a signal arrives), then drain and return."""
    stop = stop or asyncio.Event()
    if handle_signals:
        install_signal_handlers(stop)
        watch_supervisor(stop)  # a child of `worker.supervisor`: drain once it is gone
    # Before anything can log: no line may carry the keys or the Redis password.
    register_secrets(*secrets_of(settings))
    # The cheap checks first: Redis answers before any Ably client exists (ably-python
    # clients dial as soon as they are made), so a wrong REDIS_URL is one line at once.
    await _check_redis(settings.redis_url)
    queue = RedisStreamsQueue(
        connect_redis(settings.redis_url, max_connections=settings.redis_max_connections),
        prefix=settings.queue_prefix,
        consumer=consumer_name(settings.worker_id),
        max_attempts=settings.job_max_attempts,
        heartbeat_ttl_s=settings.job_visibility_timeout_seconds,
    )
    pool: ConnectionPool | None = None
    openai_client = make_client(
        settings.openai_api_key.get_secret_value(), settings.openai_base_url
    )
    try:
        pool = make_pool(settings)
        model = Model(
            openai_client,
            settings.openai_model,
            settings.openai_api,
            background=settings.model_background,
        )
        await pool.wait_connected(wait_connected)
        gc_tuning.tune()
        runner = JobRunner(
            queue, model, timeout_s=settings.job_timeout_seconds,
            wire_protocol=settings.wire_protocol,
        )  # fmt: skip
        options = RuntimeOptions(
            concurrency=settings.worker_concurrency,
            worker_id=settings.worker_id,
            budget=ShutdownBudget(grace_s=settings.shutdown_grace_seconds),
            presence_channel=settings.presence_channel,
            heartbeat_interval_s=settings.job_visibility_timeout_seconds / 3,
            reclaim_interval_s=min(1.0, settings.job_visibility_timeout_seconds / 3),
            stats_interval_s=settings.stats_interval_seconds,
            cancel_roles=settings.cancel_role_set,
        )
        log.info("worker.connections", ably_connections=len(pool.clients),
                 streams_per_connection=settings.streams_per_connection,
                 event_loop=eventloop.name())  # fmt: skip
        # Only in a process of its own (`run` installs the signal handlers), never in a
        # test's process.
        overrun = asyncio.create_task(_exit_if_overrun(stop, options.budget, handle_signals))
        worker = Worker(queue, runner, pool, options)
        worker.sessions = make_sessions(settings, queue, pool, worker.agent_ids)
        try:
            await worker.run(stop)
        finally:
            overrun.cancel()
    finally:
        # Bounded together: the shutdown budget has no room for a hang.
        closings = [queue.redis.aclose(), openai_client.close()]
        closings += [pool.close()] if pool is not None else []
        closing = asyncio.gather(*closings, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(closing, ShutdownBudget().step_s)


async def _exit_if_overrun(stop: asyncio.Event, budget: ShutdownBudget, armed: bool) -> None:
    """The last resort of the shutdown budget: should anything hang past it (even the
    event loop itself), exit anyway before Heroku's SIGKILL. A thread keeps the time, so
    a blocked loop cannot stop it; jobs still held are reclaimed once the heartbeat
    expires."""
    await stop.wait()
    if not armed:
        return
    # A daemon thread, never cancelled: it covers the connections' closing and the
    # interpreter's exit too, and dies with the process when all goes well.
    timer = threading.Timer(budget.total_s, _overrun, args=(budget.total_s,))
    timer.daemon = True
    timer.start()


def _overrun(budget_s: float) -> None:
    with contextlib.suppress(Exception):
        log.error("worker.shutdown_overrun", budget_s=budget_s)
    os._exit(1)
