"""`python -m worker run | enqueue | status | dlq | watch | dev | schema`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from worker.jobs import JobError, Pattern, job_schema, parse_job
from worker.redaction import redact, register_secrets, secrets_of
from worker.settings import AblySettings, RedisSettings, Settings, SettingsError, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter stream.")
app.add_typer(dlq_app, name="dlq")


def _fail(message: str, code: int = 2) -> NoReturn:
    # Never a password, key or token, whatever an error quotes (a URL, an SDK message).
    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(code)


T = TypeVar("T")


def _on_redis(work: Coroutine[Any, Any, T]) -> T:
    """Run a Redis command's coroutine; an unreachable Redis is one line, not a traceback."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    try:
        return asyncio.run(work)
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        _fail(f"cannot reach Redis: {exc} (check REDIS_URL)", 1)
    except RedisError as exc:  # e.g. a database index the server does not have
        _fail(f"Redis refused the command: {exc} (check REDIS_URL)", 1)


def _settings(kind: type[Any]) -> Any:
    try:
        settings = load_settings(kind)
    except SettingsError as exc:
        _fail(str(exc))
    register_secrets(*secrets_of(settings))  # never in an error line or a log line
    return settings


@app.command()
def run() -> None:
    """Run the worker until SIGTERM or SIGINT (the Procfile's command); with
    WORKER_PROCESSES > 1, a supervisor of that many worker processes."""
    from worker.logs import configure_logging, get_logger

    settings: Settings = _settings(Settings)  # once, here: children start only if valid
    configure_logging(settings.log_format, settings.log_level)
    if settings.worker_processes > 1:
        from worker.supervisor import supervise

        code = asyncio.run(supervise(settings.worker_processes, settings.shutdown_grace_seconds))
        raise typer.Exit(code)
    from worker import eventloop
    from worker.app import StartupError, serve

    try:
        eventloop.run(serve(settings), settings.event_loop)
    except StartupError as exc:
        get_logger("worker").error("worker.start_failed", error=str(exc))
        _fail(str(exc), 1)


@app.command()
def enqueue(
    prompt: Annotated[str | None, typer.Argument(help="The prompt text.")] = None,
    channel: Annotated[str | None, typer.Option(help="Ably channel for the answer.")] = None,
    job_id: Annotated[str | None, typer.Option("--id", help="Idempotency key.")] = None,
    pattern: Annotated[
        Pattern, typer.Option(help="How the answer is published.")
    ] = Pattern.MESSAGE_PER_RESPONSE,
    model: Annotated[str | None, typer.Option(help="Model name.")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable.")] = None,
    json_file: Annotated[
        str | None, typer.Option("--json", help="A job as JSON; - for stdin.")
    ] = None,
) -> None:
    """Enqueue one job, from options or from a JSON file; prints the job id."""
    raw = _job_fields(prompt, channel, job_id, pattern, model, metadata, json_file)
    try:
        job = parse_job(raw)
    except JobError as exc:
        _fail(str(exc))

    async def add(queue: Any) -> bool:
        await queue.ensure_group()
        return bool(await queue.enqueue(job))

    new = _on_queue(add)
    typer.echo(job.id if new else f"{job.id} (already enqueued: nothing changed)")


def _job_fields(
    prompt: str | None,
    channel: str | None,
    job_id: str | None,
    pattern: Pattern,
    model: str | None,
    metadata: list[str] | None,
    json_file: str | None,
) -> str | dict[str, Any]:
    if json_file is not None:
        if json_file == "-":
            return sys.stdin.read()
        try:
            return Path(json_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read the job file {json_file}: {getattr(exc, 'strerror', exc)}")
    if not channel or not prompt:
        _fail("give --channel and a PROMPT, or --json FILE")
    pairs = [m.partition("=") for m in metadata or []]
    if any(not sep for _, sep, _ in pairs):
        _fail("--metadata takes KEY=VALUE")
    fields: dict[str, Any] = {"channel": channel, "input": prompt, "pattern": str(pattern)}
    fields.update({k: v for k, v in {"id": job_id, "model": model}.items() if v})
    if pairs:
        fields["metadata"] = {k: v for k, _, v in pairs}
    return fields


@app.command()
def status(job_id: Annotated[str | None, typer.Argument(help="A job id.")] = None) -> None:
    """The queue's figures, live workers and sessions (who holds each), or one job's record."""

    async def read(queue: Any) -> Any:
        if job_id:
            return await queue.status(job_id)
        from worker.sessions.store import SessionStore

        sessions = SessionStore(queue.redis, queue.prefix, "cli", lease_ttl_s=1)
        return {**dataclasses.asdict(await queue.stats()), "sessions": await sessions.listing()}

    result = _on_queue(read)
    if result is None:
        _fail(f"no job {job_id!r}", 1)
    if job_id and "payload" in result:
        # The job as JSON; a payload that never parsed (a dead-lettered one) stays a string.
        with contextlib.suppress(ValueError):
            result["payload"] = json.loads(result["payload"])
    # A record's error may quote a URL or a token: shown without their secrets.
    typer.echo(redact(json.dumps(result, indent=2, ensure_ascii=False, default=str)))


@dlq_app.command("list")
def dlq_list(count: int = 100) -> None:
    """Dead-lettered jobs, oldest first, with their errors."""
    letters = _on_queue(lambda q: q.dead_letters(count))
    typer.echo(redact(json.dumps(letters, indent=2, ensure_ascii=False)))


@dlq_app.command("retry")
def dlq_retry(
    entry_ids: Annotated[list[str] | None, typer.Argument(help="Entries; all if none.")] = None,
) -> None:
    """Put dead-lettered jobs back in the queue with fresh attempts."""
    count = _on_queue(lambda q: q.retry_dead(entry_ids or None))
    typer.echo(f"requeued {count}")


@dlq_app.command("purge")
def dlq_purge() -> None:
    """Delete every dead-lettered job."""
    typer.echo(f"purged {_on_queue(lambda q: q.purge_dead())}")


# An operator at a terminal wants an answer: three quick retries (under a second), not the
# worker's patient backoff (connect_redis' default rides out a failover for ~12 s).
CLI_REDIS_RETRIES = 3


def _on_queue(action: Callable[[Any], Awaitable[T]]) -> T:
    """Run `action(queue)` on the queue that REDIS_URL and QUEUE_PREFIX name."""
    from worker.queue import RedisStreamsQueue
    from worker.redis_client import connect_redis

    settings: RedisSettings = _settings(RedisSettings)

    async def go() -> T:
        redis = connect_redis(settings.redis_url, retries=CLI_REDIS_RETRIES)
        queue = RedisStreamsQueue(redis, prefix=settings.queue_prefix, consumer="cli")
        try:
            return await action(queue)
        finally:
            await queue.redis.aclose()

    return _on_redis(go())


@app.command()
def watch(
    channel: Annotated[str, typer.Argument(help="The Ably channel to watch.")],
    rewind: Annotated[int, typer.Option(help="Replay this many recent messages first.")] = 10,
) -> None:
    """Render the channel's answers live in the terminal (and the last few first)."""
    from worker.app import StartupError
    from worker.watch import watch_channel

    settings: AblySettings = _settings(AblySettings)

    async def until_signalled() -> None:
        # Its own handlers: Ctrl-C and SIGTERM stop it even where SIGINT came ignored (a
        # background job of a script inherits that, and Python's KeyboardInterrupt too).
        stop, loop = asyncio.Event(), asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await watch_channel(settings, channel, rewind=rewind, until=stop)

    try:
        asyncio.run(until_signalled())
    except KeyboardInterrupt:
        pass
    except StartupError as exc:  # a refused key or no answer: say so rather than hang
        _fail(str(exc), 1)


@app.command()
def dev(
    prompts: Annotated[int, typer.Option(help="Demo prompts to enqueue.")] = 3,
    channel: Annotated[
        str, typer.Option(help="Channel for the demo answers.")
    ] = "demo:conversation",
    exit_when_done: Annotated[
        bool, typer.Option(help="Stop once the demo answers are closed.")
    ] = False,
) -> None:
    """Start redis-server, the local Ably and OpenAI servers and a worker; stream demo answers."""
    from worker.devstack.launcher import run_dev

    asyncio.run(run_dev(prompts=prompts, channel=channel, exit_when_done=exit_when_done))


@app.command()
def schema() -> None:
    """Print the job's JSON Schema."""
    typer.echo(json.dumps(job_schema(), indent=2))


@app.command()
def token(
    client_id: Annotated[str, typer.Option("--client-id", help="The user's Ably clientId.")],
    channel: Annotated[
        list[str], typer.Option("--channel", help="A channel of the user's; repeatable.")
    ],
    ttl: Annotated[str, typer.Option(help="Lifetime: 90s, 30m, 1h; 24h at most.")] = "1h",
    role: Annotated[str | None, typer.Option(help="A role claim (see CANCEL_ROLES).")] = None,
) -> None:
    """Issue a user's JWT (signed with ABLY_API_KEY): their channels only; the token is the
    last line of the output."""
    from datetime import UTC, datetime

    from worker.tokens import TokenError, user_claims, user_token

    settings: AblySettings = _settings(AblySettings)
    names = {"client_id": "--client-id", "channels": "--channel", "key": "ABLY_API_KEY"}
    try:
        claims = user_claims(client_id, channel, ttl=ttl, role=role)
        issued = user_token(
            settings.ably_api_key, client_id, channel, ttl=ttl, role=role, now=claims["iat"]
        )
    except TokenError as exc:
        _fail(f"{names.get(exc.field, '--' + exc.field)}: {exc.reason}")
    expires = datetime.fromtimestamp(claims["exp"], UTC).isoformat(timespec="seconds")
    grant = ", ".join(dict.fromkeys(channel)) + (f"; role {role}" if role else "")
    typer.echo(f"token for {client_id} on {grant}; expires {expires}", err=True)
    typer.echo(issued)  # alone on the last line: `$(worker token ...)` takes it


@app.command()
def doctor(
    channels: Annotated[
        str,
        typer.Option(help="The conversation channels the key must serve: '*' (all) or 'ns:*'."),
    ] = "*",
) -> None:
    """Check Redis, the Ably key's capability and the model endpoint: exit 0 if all pass."""
    from worker.doctor import doctor as run_doctor

    if not channels or any(c.isspace() or c == "," for c in channels):
        _fail("--channels takes one channel name or pattern, such as 'conversation:*'")
    settings: Settings = _settings(Settings)
    raise typer.Exit(run_doctor(settings, channels, echo=typer.echo))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
