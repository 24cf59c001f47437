"""The job: what another service enqueues, as a JSON object.

`Job.model_json_schema()` is the published contract (`worker schema` prints it), so any
language can build a job. `parse_job` turns raw input into a `Job` or a `JobError` whose
message says which field is wrong and why; the queue dead-letters such a job with it.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Ably channel names: no leading colon, no control characters. Spaces are refused too:
# REST and realtime treat them differently, so a channel with one is a trap.
_CHANNEL_RE = re.compile(r"^[^:\s\x00-\x1f\x7f][^\s\x00-\x1f\x7f]{0,199}$")
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


def valid_channel(name: str) -> bool:
    return bool(_CHANNEL_RE.match(name))


def valid_job_id(value: str) -> bool:
    return bool(_JOB_ID_RE.match(value))


class Pattern(enum.StrEnum):
    MESSAGE_PER_RESPONSE = "message-per-response"
    MESSAGE_PER_TOKEN = "message-per-token"


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant", "system", "developer"]
    content: str = Field(min_length=1)


class Job(BaseModel):
    """A prompt job. Only `channel` and `input` are required."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="AI Transport worker job")

    id: Annotated[str, Field(pattern=_JOB_ID_RE.pattern)] = Field(
        default_factory=lambda: uuid.uuid4().hex,
        description="Idempotency key and the answer's responseId; enqueueing an id twice "
        "makes one job. Generated when absent.",
    )
    channel: str = Field(description="The Ably channel the answer streams into.")
    input: str | list[InputMessage] = Field(
        description="The prompt: a text, or a list of role/content messages."
    )
    model: str | None = Field(
        default=None, description="Model name; the worker's default if absent."
    )
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=128_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    pattern: Pattern = Pattern.MESSAGE_PER_RESPONSE
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="String map echoed into every channel message's headers.",
        max_length=16,
    )
    user_client_id: str | None = Field(
        default=None, description="The Ably clientId of the user the answer is for."
    )

    @field_validator("channel")
    @classmethod
    def _channel_name(cls, value: str) -> str:
        if not _CHANNEL_RE.match(value):
            raise ValueError(
                "must be 1-200 characters, without spaces or control characters, "
                "and not start with ':'"
            )
        return value

    @field_validator("input")
    @classmethod
    def _non_empty_input(cls, value: str | list[InputMessage]) -> str | list[InputMessage]:
        if not value or (isinstance(value, str) and not value.strip()):
            raise ValueError("must not be empty")
        return value

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


class JobError(ValueError):
    """A job that can never succeed as written; the message names the field."""


def parse_job(raw: str | bytes | dict[str, Any]) -> Job:
    try:
        data = json.loads(raw) if isinstance(raw, str | bytes) else raw
    except json.JSONDecodeError as exc:
        raise JobError(f"job is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(data, dict):
        raise JobError(f"job must be a JSON object, not {type(data).__name__}")
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        raise JobError(describe_validation(exc)) from None


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "job"
        parts.append(f"{where}: {error['msg']}")
    return "invalid job: " + "; ".join(parts)


def job_schema() -> dict[str, Any]:
    schema = Job.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
