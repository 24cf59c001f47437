"""structlog setup: JSON lines in production, a readable console in a terminal.

One renderer is chosen at start. Per-job context (job id, channel, response id, attempt)
lives in contextvars (`bind_job`), so every line a job's task writes carries it. The SDKs'
stdlib logs (ably, openai, httpx, redis) go through the same renderer via
`ProcessorFormatter`, with the ably logger at WARNING: it logs every append at INFO.
"""

from __future__ import annotations

import logging
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
    it (`worker dev`, `worker watch`) shows log lines above itself instead of under."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


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
        logger_factory=structlog.WriteLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _route_stdlib(shared, renderer, level)


def _route_stdlib(shared: list[Any], renderer: Any, level: str) -> None:
    handler = logging.StreamHandler(_CurrentStderr())
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
