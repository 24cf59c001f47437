"""The job: what another service enqueues, as a JSON object.

`Job.model_json_schema()` is the published contract (`worker schema` prints it, with the
configured limits), so any language can build a job. `parse_job` is the one place that
validates a job from outside: it turns raw input into a `Job`, or a `JobError` whose
message is one short line a person can act on, naming the field and what is wrong ("input:
123456 characters, over JOB_MAX_INPUT_CHARS=100000"); it never echoes the job's text. The
CLI and sessions call it before enqueueing, and the queue when it takes a job (another
language may XADD anything), dead-lettering a job that fails with that line as its reason.

Two kinds of rule: the schema's (types, required fields, channel and id shapes, text that
is not Unicode), which hold everywhere, also for `Job(...)`; and the deployment's limits
(`JobLimits`, the `JOB_MAX_*` settings), which `parse_job` applies.
"""

from __future__ import annotations

import enum
import functools
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Ably channel names: no leading ':' (reserved) or '[' (a qualifier, such as channel
# params), no control characters. Spaces are refused too: REST and realtime treat them
# differently, so a channel with one is a trap. Lone surrogates are not text at all.
# Matched whole (`fullmatch`): a `$` alone also matches before a trailing newline.
_CHANNEL_RE = re.compile(
    r"^[^:\[\s\x00-\x1f\x7f\ud800-\udfff][^\s\x00-\x1f\x7f\ud800-\udfff]{0,199}$"
)
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
# A metadata key becomes a channel header name: printable, no spaces.
_HEADER_NAME_RE = re.compile(r"^[^\s\x00-\x1f\x7f\ud800-\udfff]+$")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")

# The headers the worker writes itself (transport.contract.Headers): metadata may not
# pose as them (a job's `error` header would read as the worker's).
RESERVED_HEADERS = frozenset({"responseId", "status", "model", "error"})
SHORT_TEXT_CHARS = 256  # model, previous_response_id, user_client_id, the AIT ids
# A reason is one line, short enough for a channel header (contract.MAX_ERROR_CHARS).
MAX_REASON_CHARS = 500
_MAX_PROBLEMS = 5  # a reason names the first few problems, then how many more


def valid_channel(name: str) -> bool:
    return bool(_CHANNEL_RE.fullmatch(name))


def valid_job_id(value: str) -> bool:
    return bool(_JOB_ID_RE.fullmatch(value))


class Pattern(enum.StrEnum):
    MESSAGE_PER_RESPONSE = "message-per-response"
    MESSAGE_PER_TOKEN = "message-per-token"


@dataclass(frozen=True)
class JobLimits:
    """What one job may ask for: the `JOB_MAX_*` settings (`worker.settings`). The
    metadata defaults are OpenAI's own limits for a response's metadata."""

    input_chars: int = 100_000  # the input (all messages' content together); instructions
    output_tokens: int = 32_000  # the highest `max_output_tokens` a job may ask for
    metadata_entries: int = 16
    metadata_key_chars: int = 64
    metadata_value_chars: int = 512
    # All of it as JSON: it rides in the headers of every message of the answer, inside
    # Ably's 64 KiB message limit.
    metadata_bytes: int = 4096

    @property
    def payload_chars(self) -> int:
        """The longest JSON a job within these limits can be (every character of its
        input and instructions escaped as a surrogate pair, `\\ud83d\\ude00`): a longer
        payload is refused before it is parsed."""
        return 24 * self.input_chars + 12 * self.metadata_bytes + 65_536


@functools.cache
def default_limits() -> JobLimits:
    """The limits the environment sets (`JOB_MAX_*`), read once."""
    from worker.settings import JobLimitSettings, SettingsError, load_settings

    try:
        return load_settings(JobLimitSettings).job_limits()
    except SettingsError as exc:
        raise JobError(str(exc)) from None


def _no_surrogates(value: str) -> str:
    found = _SURROGATE_RE.search(value)
    if found:
        code = ord(found.group())
        raise ValueError(f"contains a lone surrogate (U+{code:04X}), which is not text")
    return value


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant", "system", "developer"]
    content: str = Field(min_length=1)

    @field_validator("content")
    @classmethod
    def _text(cls, value: str) -> str:
        return _no_surrogates(value)


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
        default=None,
        max_length=SHORT_TEXT_CHARS,
        description="Model name; the worker's default if absent.",
    )
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, max_length=SHORT_TEXT_CHARS)
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    pattern: Pattern = Pattern.MESSAGE_PER_RESPONSE
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="String map echoed into every channel message's headers.",
    )
    user_client_id: str | None = Field(
        default=None,
        max_length=SHORT_TEXT_CHARS,
        description="The Ably clientId of the user the answer is for.",
    )
    wire: Literal["seed", "ait"] | None = Field(
        default=None,
        description="The wire contract the answer is published in: `seed` (the `response` "
        "message) or `ait` (Ably AI Transport's, for front ends built on "
        "@ably/ai-transport 0.8.0; always message per response). The worker's "
        "WIRE_PROTOCOL if absent.",
    )
    input_codec_message_id: str | None = Field(
        default=None,
        max_length=SHORT_TEXT_CHARS,
        description="AI Transport: the codec-message-id of the user's `ai-input` this job "
        "answers (the run's parent).",
    )
    input_event_id: str | None = Field(
        default=None,
        max_length=SHORT_TEXT_CHARS,
        description="AI Transport: the event-id of that `ai-input` (the invocation's "
        "inputEventId).",
    )

    @field_validator("channel")
    @classmethod
    def _channel_name(cls, value: str) -> str:
        if not _CHANNEL_RE.fullmatch(value):
            raise ValueError(
                "must be 1-200 characters, without spaces or control characters, "
                "and not start with ':' or '['"
            )
        return value

    @field_validator("input")
    @classmethod
    def _non_empty_input(cls, value: str | list[InputMessage]) -> str | list[InputMessage]:
        if not value or (isinstance(value, str) and not value.strip()):
            raise ValueError("must not be empty")
        return _no_surrogates(value) if isinstance(value, str) else value

    @field_validator(
        "model", "instructions", "previous_response_id", "user_client_id",
        "input_codec_message_id", "input_event_id",
    )  # fmt: skip
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return None if value is None else _no_surrogates(value)

    @field_validator("metadata")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not _HEADER_NAME_RE.fullmatch(key):
                raise ValueError(
                    f"key {_show(key)} must be printable, without spaces or control characters"
                )
            if key in RESERVED_HEADERS:
                raise ValueError(f"key {_show(key)} is a header the worker writes itself")
            try:
                _no_surrogates(item)
            except ValueError as exc:
                raise ValueError(f"value of {_show(key)} {exc}") from None
        return value

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


class JobError(ValueError):
    """A job that can never succeed as written; the message names the field."""


def load_json(raw: str | bytes) -> Any:
    """The JSON value in `raw`; `JobError` with a short reason when it is not JSON."""
    try:
        # Bytes are UTF-8, strictly: json.loads would take UTF-16 and encoded surrogates.
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except json.JSONDecodeError as exc:
        raise JobError(f"job is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except UnicodeDecodeError as exc:
        raise JobError(f"job is not valid UTF-8: {_bad_byte(exc)}") from None
    except RecursionError:
        raise JobError("job is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        what = "a number has too many digits" if "digits" in str(exc) else "it cannot be read"
        raise JobError(f"job is not valid JSON: {what}") from None


def parse_job(raw: str | bytes | dict[str, Any], limits: JobLimits | None = None) -> Job:
    """A job from its JSON (or its decoded fields), checked against the schema and the
    limits (`default_limits()` unless given); else `JobError` with a one-line reason."""
    limits = limits or default_limits()
    if isinstance(raw, str | bytes) and len(raw) > limits.payload_chars:
        raise JobError(
            f"job is {len(raw)} characters of JSON, more than a job within the limits can "
            f"be ({limits.payload_chars}; JOB_MAX_INPUT_CHARS={limits.input_chars})"
        )
    data = load_json(raw) if isinstance(raw, str | bytes) else raw
    if not isinstance(data, dict):
        raise JobError(f"job must be a JSON object, not {_json_type(data)}")
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        raise JobError(describe_validation(exc, data)) from None
    except RecursionError:
        raise JobError("invalid job: nested too deeply") from None
    problems = limit_problems(job, limits)
    if problems:
        raise JobError(_reason(problems))
    return job


def limit_problems(job: Job, limits: JobLimits) -> list[str]:
    """What in `job` is over `limits`, each naming the field and the setting."""
    problems = []
    chars = input_chars(job)
    if chars > limits.input_chars:
        problems.append(f"input: {chars} characters, over JOB_MAX_INPUT_CHARS={limits.input_chars}")
    if job.instructions is not None and len(job.instructions) > limits.input_chars:
        problems.append(
            f"instructions: {len(job.instructions)} characters, "
            f"over JOB_MAX_INPUT_CHARS={limits.input_chars}"
        )
    tokens = job.max_output_tokens
    if tokens is not None and tokens > limits.output_tokens:
        problems.append(
            f"max_output_tokens: {tokens}, over JOB_MAX_OUTPUT_TOKENS={limits.output_tokens}"
        )
    metadata = job.metadata
    if len(metadata) > limits.metadata_entries:
        problems.append(
            f"metadata: {len(metadata)} entries, over JOB_MAX_METADATA={limits.metadata_entries}"
        )
    for key, value in metadata.items():
        if len(key) > limits.metadata_key_chars:
            problems.append(
                f"metadata: key {_show(key)} is {len(key)} characters, "
                f"over JOB_MAX_METADATA_KEY_CHARS={limits.metadata_key_chars}"
            )
        if len(value) > limits.metadata_value_chars:
            problems.append(
                f"metadata.{_show(key, quoted=False)}: {len(value)} characters, "
                f"over JOB_MAX_METADATA_VALUE_CHARS={limits.metadata_value_chars}"
            )
    size = len(json.dumps(metadata, ensure_ascii=False).encode()) if metadata else 0
    if size > limits.metadata_bytes:
        problems.append(
            f"metadata: {size} bytes as JSON, over JOB_MAX_METADATA_BYTES={limits.metadata_bytes}"
        )
    return problems


def input_chars(job: Job) -> int:
    """The input's size: its text, or all its messages' content together."""
    if isinstance(job.input, str):
        return len(job.input)
    return sum(len(message.content) for message in job.input)


def describe_validation(exc: ValidationError, data: Any = None) -> str:
    """The schema errors as one line: `field.path: what is wrong; ...`."""
    problems = []
    given = data.get("input") if isinstance(data, dict) else None
    input_said = False
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        if loc and loc[0] == "input" and len(loc) > 1 and loc[1] in ("str", "list[InputMessage]"):
            # Both members of `str | list[...]` speak up; keep the one the job meant.
            branch = loc.pop(1)
            if isinstance(given, str | list):
                if (branch == "str") != isinstance(given, str):
                    continue
            else:
                if not input_said:
                    problems.append("input: must be a text or a list of role/content messages")
                input_said = True
                continue
        where = ".".join(_show(str(p), quoted=False) for p in loc) or "job"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "not a field of a job"
        problems.append(f"{where}: {message}")
    return _reason(problems)


def _reason(problems: list[str]) -> str:
    shown = problems[:_MAX_PROBLEMS]
    more = len(problems) - len(shown)
    text = "invalid job: " + "; ".join(shown) + (f"; and {more} more" if more else "")
    return one_line(text)


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` as one printable line of at most `limit` characters."""
    clean = "".join(c if c.isprintable() else " " for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def _show(value: str, limit: int = 40, *, quoted: bool = True) -> str:
    """A name from the job, safe to put in a reason: escaped, cut short."""
    cut = value if len(value) <= limit else value[: limit - 1] + "…"
    text = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in cut)
    return f"'{text}'" if quoted else text


def _bad_byte(exc: UnicodeDecodeError) -> str:
    return f"byte 0x{exc.object[exc.start]:02x} at position {exc.start}"


def _json_type(value: Any) -> str:
    names: Iterable[tuple[type, str]] = (
        (bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"),
        (list, "an array"), (type(None), "null"),
    )  # fmt: skip
    return next((name for kind, name in names if isinstance(value, kind)), "an object")


def job_schema(limits: JobLimits | None = None) -> dict[str, Any]:
    """The job's JSON Schema, with the limits (`default_limits()` unless given)."""
    limits = limits or default_limits()
    schema = Job.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    props = schema["properties"]
    for option in props["input"]["anyOf"]:
        if option.get("type") == "string":
            option["maxLength"] = limits.input_chars
    props["input"]["description"] += (
        f" At most {limits.input_chars} characters in all (JOB_MAX_INPUT_CHARS)."
    )
    for option in props["instructions"]["anyOf"]:
        if option.get("type") == "string":
            option["maxLength"] = limits.input_chars
    for option in props["max_output_tokens"]["anyOf"]:
        if option.get("type") == "integer":
            option["maximum"] = limits.output_tokens
    metadata = props["metadata"]
    metadata["maxProperties"] = limits.metadata_entries
    metadata["propertyNames"] = {"maxLength": limits.metadata_key_chars}
    metadata["additionalProperties"] = {"type": "string", "maxLength": limits.metadata_value_chars}
    metadata["description"] += (
        f" At most {limits.metadata_entries} entries, keys of {limits.metadata_key_chars} "
        f"and values of {limits.metadata_value_chars} characters, {limits.metadata_bytes} "
        f"bytes as JSON; not {', '.join(sorted(RESERVED_HEADERS))}."
    )
    return schema
