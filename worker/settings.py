"""Every knob, read from the environment (12-factor) and validated at start.

`load_settings()` turns a bad or missing value into `SettingsError` with one line naming
the variable, which the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.jobs import JobLimits
from worker.transport.endpoint import Endpoint


def default_worker_id() -> str:
    """Heroku's `DYNO` (web.1, worker.2) names the process; elsewhere host and pid do."""
    return os.environ.get("DYNO") or f"{socket.gethostname()}-{os.getpid()}"


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
MAX_WORKER_PROCESSES = 64


def default_worker_processes(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, lowered by a cgroup v2 CPU quota
    (`quota period` in cpu.max, rounded up). Heroku dynos may report the host's cores
    rather than the dyno's share: set WORKER_PROCESSES per dyno size there."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_quota(cpu_max)
    if quota is not None:
        cores = min(cores or quota, quota)
    return max(1, min(cores or 1, MAX_WORKER_PROCESSES))


def cgroup_cpu_quota(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """Whole cores a cgroup v2 quota allows (at least 1), or None: no quota, no cgroup v2."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def default_log_format() -> Literal["json", "console"]:
    return "console" if sys.stderr.isatty() else "json"


class RedisSettings(BaseSettings):
    """What `enqueue`, `status` and `dlq` need: only the queue."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_prefix: str = Field(default="aitw", min_length=1)
    # Per worker process; each Heroku Redis plan caps the connections of all processes.
    redis_max_connections: int = Field(default=32, ge=2, le=10_000)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class AblySettings(BaseSettings):
    """What `watch` needs: only Ably."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    ably_api_key: SecretStr
    ably_endpoint: str = ""

    @field_validator("ably_api_key")
    @classmethod
    def _ably_key_shape(cls, value: SecretStr) -> SecretStr:
        name, sep, secret = value.get_secret_value().partition(":")
        if not (sep and "." in name and secret):
            raise ValueError("must look like APP.KEYID:SECRET")
        return value

    @field_validator("ably_endpoint")
    @classmethod
    def _endpoint_shape(cls, value: str) -> str:
        Endpoint.parse(value)  # raises ValueError with the expected shape
        return value


class JobLimitSettings(BaseSettings):
    """What one job may ask for (`worker.jobs.JobLimits`): checked when a job is enqueued
    and again when a worker takes it; a job over one is dead-lettered, naming it."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    job_max_input_chars: int = Field(default=100_000, ge=1, le=10_000_000)
    job_max_output_tokens: int = Field(default=32_000, ge=1, le=1_000_000)
    # OpenAI takes at most 16 metadata entries, keys of 64 and values of 512 characters.
    job_max_metadata: int = Field(default=16, ge=0, le=1000)
    job_max_metadata_key_chars: int = Field(default=64, ge=1, le=1024)
    job_max_metadata_value_chars: int = Field(default=512, ge=1, le=60_000)
    # Metadata rides in every message's headers, inside Ably's 64 KiB message.
    job_max_metadata_bytes: int = Field(default=4096, ge=0, le=60_000)

    def job_limits(self) -> JobLimits:
        return JobLimits(
            input_chars=self.job_max_input_chars,
            output_tokens=self.job_max_output_tokens,
            metadata_entries=self.job_max_metadata,
            metadata_key_chars=self.job_max_metadata_key_chars,
            metadata_value_chars=self.job_max_metadata_value_chars,
            metadata_bytes=self.job_max_metadata_bytes,
        )


class Settings(RedisSettings, AblySettings, JobLimitSettings):
    """The worker's configuration. Field names are the environment variables, upper-cased."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    openai_api_key: SecretStr
    openai_base_url: str | None = None
    openai_model: str = "gpt-4.1-mini"
    openai_api: Literal["responses", "chat"] = "responses"
    # OpenAI background responses (Responses API only; ignored with OPENAI_API=chat): a
    # retried or reclaimed job continues the same model response into the same message.
    model_background: bool = False
    # The wire contract of answers whose job names none: `seed` (the `response` message)
    # or `ait` (Ably AI Transport's, @ably/ai-transport 0.8.0: `worker.transport.ait`).
    wire_protocol: Literal["seed", "ait"] = "seed"

    worker_concurrency: int = Field(default=16, ge=1, le=1000)
    # Worker processes per dyno (`worker.supervisor`), each with its own slots, consumer,
    # heartbeat and Ably connections. Default: the usable cores; Heroku dynos may report
    # the host's cores, so set it explicitly per dyno size there.
    worker_processes: int = Field(
        default_factory=default_worker_processes, ge=1, le=MAX_WORKER_PROCESSES
    )
    worker_id: str = Field(default_factory=default_worker_id, min_length=1)
    # In-flight answers' time to finish after SIGTERM; closing, requeueing, leaving and
    # exiting take 8 s more (runtime.ShutdownBudget): 20 keeps the whole shutdown to 28 s,
    # inside Heroku's 30.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=3600)
    job_max_attempts: int = Field(default=3, ge=1, le=100)
    job_timeout_seconds: float = Field(default=300.0, gt=0)
    # A dead worker's jobs go to another once its heartbeat is this old.
    job_visibility_timeout_seconds: int = Field(default=30, ge=2, le=3600)
    append_rollup_window_ms: int = Field(default=40, ge=0, le=500)
    # Ably takes 50 messages/s on one connection: 44/s plus a burst of 5 plus presence
    # updates (at most 1/s, on the first connection) stay inside it.
    ably_messages_per_second: float = Field(default=44.0, gt=0, le=10_000)
    # Three answers share a connection's 44 messages/s: an append every 68 ms each (4: 91 ms).
    streams_per_connection: int = Field(default=3, ge=1, le=1000)
    presence_channel: str = Field(default="agents", min_length=1)
    stats_interval_seconds: float = Field(default=30.0, gt=0)  # the `worker.stats` log line

    # Sessions: the channels the worker listens on for users' `prompt` and `cancel`.
    listen_channels: str = ""  # comma-separated, served always
    session_idle_seconds: float = Field(default=1800.0, gt=0)  # a job's channel, after
    session_lease_seconds: float = Field(default=15.0, ge=2, le=3600)
    cancel_roles: str = ""  # comma-separated roles (Ably-verified `userClaim`) that may cancel

    log_format: Literal["json", "console"] = Field(default_factory=default_log_format)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # uvloop (the default) or asyncio's own loop: worker.eventloop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @field_validator("listen_channels")
    @classmethod
    def _channel_names(cls, value: str) -> str:
        from worker.jobs import valid_channel

        for name in _split(value):
            if not valid_channel(name):
                raise ValueError(f"{name!r} is not a valid channel name")
        return value

    @property
    def listen_channel_list(self) -> tuple[str, ...]:
        return tuple(_split(self.listen_channels))

    @property
    def cancel_role_set(self) -> frozenset[str]:
        return frozenset(_split(self.cancel_roles))

    @field_validator("openai_base_url", mode="before")
    @classmethod
    def _empty_is_openai(cls, value: object) -> object:
        return value or None  # OPENAI_BASE_URL= (empty) means OpenAI itself

    @field_validator("worker_id", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return value or default_worker_id()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


T = TypeVar("T", bound=BaseSettings)


class SettingsError(Exception):
    """A setting is missing or bad; the message names the variable."""


def load_settings(kind: type[T] = Settings, **overrides: object) -> T:  # type: ignore[assignment]
    """Read `kind` from the environment; a bad or missing variable raises SettingsError."""
    try:
        return kind(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        variable = "_".join(str(part) for part in error["loc"]).upper() or "settings"
        if error["type"] == "missing":
            problems.append(f"{variable} is required but not set")
        else:
            # Never echo the value back: it may be a secret.
            problems.append(f"{variable}: {error['msg']}")
    return "bad configuration: " + "; ".join(problems)
