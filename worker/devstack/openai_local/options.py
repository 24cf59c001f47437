"""What one request asks for: length, pace and failure, from server config, model and metadata.

Per-request knobs travel in the request's `metadata` (string values, as OpenAI
requires), so the unmodified SDK can send them:

| key | meaning |
| --- | --- |
| `local_tokens` | natural answer length in tokens |
| `local_tokens_per_second` | pace after the first token (`0` or `inf`: no delay) |
| `local_first_token_ms` | time to first token |
| `local_fail` | `429`, `500`, `401`, `break`, `failed` or `incomplete` |
| `local_fail_after` | deltas sent before `break`, `failed` or `incomplete` (default: half) |
| `local_fail_times` | fail only the first N attempts of this (prompt, failure) |
| `local_retry_after` | seconds in a 429's `Retry-After` (default: the server's) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from worker.devstack.openai_local.text import DEFAULT_TOKENS

FailMode = Literal["429", "500", "401", "break", "failed", "incomplete"]
FAIL_MODES: tuple[FailMode, ...] = ("429", "500", "401", "break", "failed", "incomplete")

TOKENS = "local_tokens"
TOKENS_PER_SECOND = "local_tokens_per_second"
FIRST_TOKEN_MS = "local_first_token_ms"
FAIL = "local_fail"
FAIL_AFTER = "local_fail_after"
FAIL_TIMES = "local_fail_times"
RETRY_AFTER = "local_retry_after"

MAX_TOKENS = 100_000

MODEL_DEFAULT = "local"
MODEL_FAST = "local-fast"
MODEL_SLOW = "local-slow"
MODELS = (MODEL_DEFAULT, MODEL_FAST, MODEL_SLOW)


class BadRequest(ValueError):
    """A request the server refuses with 400, naming the parameter at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Pace:
    first_token_s: float
    tokens_per_second: float  # math.inf: every token at once after the first

    @classmethod
    def of(cls, first_token_ms: float, tokens_per_second: float) -> Pace:
        tps = math.inf if tokens_per_second <= 0 else tokens_per_second
        return cls(first_token_s=max(0.0, first_token_ms) / 1000, tokens_per_second=tps)


NO_DELAY = Pace(first_token_s=0.0, tokens_per_second=math.inf)
SLOW = Pace(first_token_s=0.4, tokens_per_second=15.0)  # readable by eye


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    tokens: int = DEFAULT_TOKENS
    tokens_per_second: float = 60.0
    first_token_ms: float = 200.0
    api_key: str | None = None  # None: any key (or none) is accepted
    retry_after_s: float = 1.0
    batch_interval_ms: float = 10.0  # at high rates, at most one write per stream per tick
    store_size: int = 1000  # responses kept for retrieve/resume

    @property
    def pace(self) -> Pace:
        return Pace.of(self.first_token_ms, self.tokens_per_second)


@dataclass(frozen=True)
class RequestOptions:
    tokens: int
    pace: Pace
    fail: FailMode | None = None
    fail_after: int | None = None
    fail_times: int | None = None  # None: fail every time
    retry_after_s: float = 1.0


def resolve(config: ServerConfig, model: str, metadata: Any) -> RequestOptions:
    """Server defaults, then the model's preset, then the request's metadata."""
    meta = _metadata(metadata)
    base = RequestOptions(tokens=config.tokens, pace=_model_pace(config, model))
    base = replace(base, retry_after_s=config.retry_after_s)
    pace = base.pace
    if FIRST_TOKEN_MS in meta or TOKENS_PER_SECOND in meta:
        first_ms = _number(meta, FIRST_TOKEN_MS, pace.first_token_s * 1000)
        tps = _number(meta, TOKENS_PER_SECOND, pace.tokens_per_second)
        pace = Pace.of(first_ms, tps)
    tokens = _optional_int(meta, TOKENS)
    return replace(
        base,
        tokens=base.tokens if tokens is None else min(tokens, MAX_TOKENS),
        pace=pace,
        fail=_fail_mode(meta),
        fail_after=_optional_int(meta, FAIL_AFTER),
        fail_times=_optional_int(meta, FAIL_TIMES),
        retry_after_s=_number(meta, RETRY_AFTER, base.retry_after_s, minimum=0),
    )


def _model_pace(config: ServerConfig, model: str) -> Pace:
    if model == MODEL_FAST:
        return NO_DELAY
    if model == MODEL_SLOW:
        return SLOW
    return config.pace  # "local" and any other name (a worker configured for gpt-*)


def _metadata(metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise BadRequest("Invalid type for 'metadata': expected an object.", "metadata")
    return {str(k): str(v) for k, v in metadata.items()}


def _number(meta: dict[str, str], key: str, default: float, minimum: float = 0.0) -> float:
    if key not in meta:
        return default
    try:
        value = float(meta[key])
    except ValueError:
        raise BadRequest(f"metadata.{key} must be a number.", f"metadata.{key}") from None
    if math.isnan(value) or value < minimum:
        raise BadRequest(f"metadata.{key} must be at least {minimum:g}.", f"metadata.{key}")
    return value


def _optional_int(meta: dict[str, str], key: str) -> int | None:
    if key not in meta:
        return None
    value = _number(meta, key, 0.0)
    if math.isinf(value):
        raise BadRequest(f"metadata.{key} must be a whole number.", f"metadata.{key}")
    return int(value)


def _fail_mode(meta: dict[str, str]) -> FailMode | None:
    value = meta.get(FAIL)
    if value in (None, "", "none"):
        return None
    for mode in FAIL_MODES:
        if value == mode:
            return mode
    raise BadRequest(f"metadata.{FAIL} must be one of {', '.join(FAIL_MODES)}.", f"metadata.{FAIL}")
