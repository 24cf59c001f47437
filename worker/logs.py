"""structlog setup: JSON lines in production, a readable console in a terminal.

One renderer is chosen at start. Per-job context (job id, channel, response id, attempt)
lives in contextvars (`bind_job`), so every line a job's task writes carries it. The SDKs'
stdlib logs (ably, openai, httpx, redis) go through the same renderer via
`ProcessorFormatter`, with the ably logger at WARNING: it logs every append at INFO.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

import orjson
import structlog

# Keys whose values never reach a log line, wherever they appear in an event.
_SECRET_KEYS = frozenset({"api_key", "ably_api_key", "openai_api_key", "key", "token", "secret"})


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for name in _SECRET_KEYS.intersection(event):
        event[name] = "[redacted]"
    return event


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time, so a live terminal view that swaps
    it (`worker dev`, `worker watch`) shows log lines above itself instead of under.

    It never raises into the caller: a log call is never a reason for a job, a signal
    handler or a housekeeping step to fail. A line that cannot be written is dropped.
    Once the stream is broken (its reader is gone, as on `worker run | head` or when the
    log router goes away: BrokenPipeError; or it is closed), that stream becomes a null
    sink: its file descriptor, and stdout's if it is the same pipe, are pointed at
    /dev/null, so nothing else in the process (an SDK, the interpreter's flush at exit)
    trips over the broken pipe either, and every further line to it is skipped.
    """

    def __init__(self) -> None:
        self._broken: Any = _NOT_BROKEN  # the stream found broken, or the sentinel

    def write(self, text: str) -> int:
        stream = sys.stderr
        if stream is self._broken:
            return len(text)
        try:
            return stream.write(text)
        except Exception as exc:
            self._failed(stream, exc)
            return len(text)

    def flush(self) -> None:
        stream = sys.stderr
        if stream is self._broken:
            return
        try:
            stream.flush()
        except Exception as exc:
            self._failed(stream, exc)

    def _failed(self, stream: Any, exc: Exception) -> None:
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            return  # a full non-blocking stream: this line is lost, the next may pass
        self._broken = stream
        _silence(stream)


_NOT_BROKEN = object()


def _silence(stream: Any) -> None:
    """Point a broken stream's file descriptor (and stdout's, when it is the same pipe,
    as with `2>&1 |`) at /dev/null: whatever is still buffered in it, or written to it
    later by anyone, goes nowhere instead of raising BrokenPipeError again."""
    try:
        fd = stream.fileno()
        broken = os.fstat(fd)
    except Exception:
        return  # closed, or no descriptor of its own (a proxy): skipping it is enough
    targets = {fd}
    for std in (1, 2):
        with contextlib.suppress(OSError):
            other = os.fstat(std)
            if (other.st_dev, other.st_ino) == (broken.st_dev, broken.st_ino):
                targets.add(std)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for target in targets:
            with contextlib.suppress(OSError):
                os.dup2(null, target)
    finally:
        os.close(null)


_SINK = _CurrentStderr()  # one for structlog and stdlib logging: broken is broken for both


def _orjson_dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if log_format == "json"
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(_SINK),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _route_stdlib(shared, renderer, level)


def _route_stdlib(shared: list[Any], renderer: Any, level: str) -> None:
    handler = logging.StreamHandler(_SINK)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("ably", "httpx", "httpx2", "httpcore", "websockets", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def bind_job(**fields: Any) -> None:
    """Bind job fields to every log line of the current task (and tasks it starts)."""
    structlog.contextvars.bind_contextvars(**fields)


def clear_job() -> None:
    structlog.contextvars.clear_contextvars()


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
