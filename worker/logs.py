"""structlog setup: JSON lines in production, a readable console in a terminal.

One renderer is chosen at start. Per-job context (job id, channel, response id, attempt)
lives in contextvars (`bind_job`), so every line a job's task writes carries it. The SDKs'
stdlib logs (ably, openai, httpx, redis) go through the same renderer via
`ProcessorFormatter`, with the ably logger at WARNING: it logs every append at INFO.

No secret reaches a line (`worker.redaction`): fields named like a key are replaced, and
every finished line, ours or an SDK's, is cleared of the secrets the process registered
at start (`register_secrets`) and of credential-shaped text (tokens, URL passwords, JWTs).
An SDK record with an exception says why in one `error` field when it is a network or
protocol failure (the common case: a service away), and carries the whole traceback as
text (`exception`) when it is anything else, such as a bug.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict

from worker.redaction import redact, register_secrets

__all__ = ["bind_job", "clear_job", "configure_logging", "get_logger", "register_secrets"]

# Keys whose values never reach a log line, wherever they appear in an event.
_SECRET_KEYS = frozenset({"api_key", "ably_api_key", "openai_api_key", "key", "token", "secret"})


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for name in _SECRET_KEYS.intersection(event):
        event[name] = "[redacted]"
    return event


def _redact_line(_: Any, __: str, line: Any) -> Any:
    """After the renderer: the finished line, cleared of every registered secret and of
    credential-shaped text, wherever in it (a value, an SDK's message, a traceback)."""
    return redact(line) if isinstance(line, str) else line


# ably-python lines that dump a protocol message, whose data is a user's prompt or an
# answer's text: the words before the marker stay, the dump goes.
_SDK_PAYLOAD_MARKERS = (
    "Failed to send protocol message: ",  # ConnectionManager.fail_queued_messages
    "Skip messages ",  # RealtimeChannel: a received message it could not process
    "Skip annotations ",
)


def _sdk_payloads(_: Any, __: str, event: EventDict) -> EventDict:
    message = event.get("event")
    if isinstance(message, str) and str(event.get("logger", "")).startswith("ably"):
        for marker in _SDK_PAYLOAD_MARKERS:
            at = message.find(marker)
            if at >= 0:
                event["event"] = message[: at + len(marker)] + "[payload omitted]"
                break
    return event


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a service is away or refused us: worth one line, not a
    traceback. Looked up on the first SDK record with an exception, not when logging is
    configured (by then the SDKs are imported anyway)."""
    kinds: list[type[BaseException]] = [OSError, TimeoutError, EOFError]
    for module, names in (
        ("httpx", ("TransportError", "HTTPStatusError")),
        ("httpcore", ("NetworkError", "TimeoutException", "ProtocolError")),
        ("websockets.exceptions", ("WebSocketException",)),
        ("ably.util.exceptions", ("AblyException",)),
        ("redis.exceptions", ("ConnectionError", "TimeoutError")),
        ("openai", ("APIConnectionError", "APIStatusError")),
    ):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        kinds += [getattr(imported, name) for name in names if hasattr(imported, name)]
    return tuple(kinds)


_NETWORK_ERRORS: tuple[type[BaseException], ...] | None = None
REASON_CHARS = 500


def _cause_of(exc: BaseException) -> BaseException | None:
    return exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _one_line(exc: BaseException) -> str:
    """`Type: message`, with its cause's, on one line."""
    said = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    root = ""
    cause = _cause_of(exc)
    for _ in range(5):  # the deepest cause that says something new (an errno, a host)
        if cause is None:
            break
        if str(cause) and str(cause) not in said:
            root = f"{type(cause).__name__}: {cause}"
        cause = _cause_of(cause)
    if root:
        said += f" (from {root})"
    return " ".join(said.split())[:REASON_CHARS]


def _foreign_exception(_: Any, __: str, event: EventDict) -> EventDict:
    """An SDK record's exception: a network failure becomes one `error` field; anything
    else stays for `format_exc_info` (a traceback as text, never a repr of the tuple)."""
    global _NETWORK_ERRORS
    exc_info = event.get("exc_info")
    if not exc_info:
        return event
    if exc_info is True:
        exc_info = sys.exc_info()
    exc = exc_info if isinstance(exc_info, BaseException) else exc_info[1]
    if exc is None:
        del event["exc_info"]
        return event
    if _NETWORK_ERRORS is None:
        _NETWORK_ERRORS = _network_errors()
    if isinstance(exc, _NETWORK_ERRORS):
        del event["exc_info"]
        event.setdefault("error", _one_line(exc))
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
    # JSON: a traceback as one text field. The console renderer draws exc_info itself.
    # (Not dict_tracebacks: its frames carry local variables, which may hold secrets.)
    renderer: list[Any] = (
        [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        if log_format == "json"
        else [_console_renderer()]
    )
    structlog.configure(
        processors=[*shared, *renderer, _redact_line],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(_SINK),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _route_stdlib(shared, renderer, level)


def _console_renderer() -> Any:
    """Readable lines with tracebacks drawn, but without the frames' local variables
    (rich's default): a local may hold a key."""
    try:
        formatter: Any = structlog.dev.RichTracebackFormatter(show_locals=False)
        import rich  # noqa: F401  (structlog draws with it when it is installed)
    except ImportError:
        formatter = structlog.dev.plain_traceback
    return structlog.dev.ConsoleRenderer(exception_formatter=formatter)


# Loggers whose INFO and DEBUG lines never reach the output, even at LOG_LEVEL=DEBUG:
# ably logs every append at INFO, its realtime URL (with the access token) at INFO and its
# key at DEBUG; httpx logs every request's URL; hpack and h2 log every header, the
# Authorization header too.
_QUIET_LOGGERS = ("ably", "httpx", "httpx2", "httpcore", "websockets", "openai", "hpack", "h2")


def _route_stdlib(shared: list[Any], renderer: list[Any], level: str) -> None:
    handler = logging.StreamHandler(_SINK)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                _sdk_payloads,
                _foreign_exception,
                *shared,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *renderer,
                _redact_line,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in _QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def bind_job(**fields: Any) -> None:
    """Bind job fields to every log line of the current task (and tasks it starts)."""
    structlog.contextvars.bind_contextvars(**fields)


def clear_job() -> None:
    structlog.contextvars.clear_contextvars()


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
