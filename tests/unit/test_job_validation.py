"""What `parse_job` answers for bad jobs: one short line that names the field, and the
setting when a limit is passed. No services: the job schema and the limits alone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.jobs import (
    MAX_REASON_CHARS,
    Job,
    JobError,
    JobLimits,
    default_limits,
    job_schema,
    parse_job,
)
from worker.settings import JobLimitSettings, Settings, SettingsError, load_settings
from worker.transport.contract import MAX_ERROR_CHARS

LIMITS = JobLimits()


def job(**fields: Any) -> dict[str, Any]:
    return {"channel": "conversation:42", "input": "Hello", **fields}


def reason(raw: Any, limits: JobLimits = LIMITS) -> str:
    with pytest.raises(JobError) as refused:
        parse_job(raw if isinstance(raw, str | bytes) else json.dumps(raw), limits)
    text = str(refused.value)
    assert text.isprintable() and len(text) <= MAX_REASON_CHARS, text
    return text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{not json", "job is not valid JSON: Expecting property name enclosed in double "
                      "quotes at position 1"),
        ("", "job is not valid JSON: Expecting value at position 0"),
        ("[" * 100_000 + "]" * 100_000, "job is not valid JSON: nested too deeply"),
        ('{"channel": "c", "input": "x", "max_output_tokens": ' + "9" * 5000 + "}",
         "job is not valid JSON: a number has too many digits"),
        (b'{"channel": "c", "input": "caf\xe9"}',
         "job is not valid UTF-8: byte 0xe9 at position 30"),
        (b'{"channel": "c", "input": "\xed\xa0\x80"}',  # an encoded surrogate
         "job is not valid UTF-8: byte 0xed at position 27"),
        ("5", "job must be a JSON object, not a number"),
        ("null", "job must be a JSON object, not null"),
        ('["a"]', "job must be a JSON object, not an array"),
    ],
)  # fmt: skip
def test_a_payload_that_is_no_json_object_says_so(raw: str | bytes, expected: str) -> None:
    assert reason(raw) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"input": "no channel"}, "invalid job: channel: Field required"),
        (job(channel=5), "invalid job: channel: Input should be a valid string"),
        (job(channel="a b"), "invalid job: channel: must be 1-200 characters, without spaces "
                             "or control characters, and not start with ':' or '['"),
        # A trailing newline too (a regex's `$` alone lets one through).
        (job(channel="a\n"), "invalid job: channel: must be 1-200 characters, without "
                              "spaces or control characters, and not start with ':' or '['"),
        (job(channel="[?rewind=1]c"), "invalid job: channel: must be 1-200 characters, "
                                      "without spaces or control characters, and not start "
                                      "with ':' or '['"),
        (job(input=5), "invalid job: input: must be a text or a list of role/content messages"),
        (job(input="  \n"), "invalid job: input: must not be empty"),
        (job(input=[{"role": "bot", "content": "x"}]),
         "invalid job: input.0.role: Input should be 'user', 'assistant', 'system' or "
         "'developer'"),
        (job(input="a\ud800b"),
         "invalid job: input: contains a lone surrogate (U+D800), which is not text"),
        (job(id="a b"), "invalid job: id: String should match pattern "
                        "'^[A-Za-z0-9._:@-]{1,128}$'"),
        (job(id="a\n"), "invalid job: id: String should match pattern "
                         "'^[A-Za-z0-9._:@-]{1,128}$'"),
        (job(max_output_tokens=1.5), "invalid job: max_output_tokens: Input should be a valid "
                                     "integer, got a number with a fractional part"),
        (job(temperature="hot"), "invalid job: temperature: Input should be a valid number, "
                                 "unable to parse string as a number"),
        (job(pattern="per-word"), "invalid job: pattern: Input should be "
                                  "'message-per-response' or 'message-per-token'"),
        (job(metadata={"n": 1}), "invalid job: metadata.n: Input should be a valid string"),
        (job(metadata={"status": "x"}),
         "invalid job: metadata: key 'status' is a header the worker writes itself"),
        (job(metadata={"a\nb": "x"}), "invalid job: metadata: key 'a\\u000ab' must be "
                                      "printable, without spaces or control characters"),
        (job(model="m" * 300), "invalid job: model: String should have at most 256 characters"),
        (job(colour="blue"), "invalid job: colour: not a field of a job"),
    ],
)  # fmt: skip
def test_a_schema_error_names_the_field(fields: dict[str, Any], expected: str) -> None:
    assert reason(fields) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (job(input="x" * 100_001), "input: 100001 characters, over JOB_MAX_INPUT_CHARS=100000"),
        (job(input=[{"role": "user", "content": "x" * 60_000}] * 2),
         "input: 120000 characters, over JOB_MAX_INPUT_CHARS=100000"),
        (job(instructions="x" * 100_001),
         "instructions: 100001 characters, over JOB_MAX_INPUT_CHARS=100000"),
        (job(max_output_tokens=32_001),
         "max_output_tokens: 32001, over JOB_MAX_OUTPUT_TOKENS=32000"),
        (job(metadata={f"k{i}": "v" for i in range(17)}),
         "metadata: 17 entries, over JOB_MAX_METADATA=16"),
        (job(metadata={"k" * 65: "v"}),
         "metadata: key 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…' is 65 characters, "
         "over JOB_MAX_METADATA_KEY_CHARS=64"),
        (job(metadata={"user": "v" * 513}),
         "metadata.user: 513 characters, over JOB_MAX_METADATA_VALUE_CHARS=512"),
        (job(metadata={f"k{i}": "é" * 300 for i in range(8)}),
         "metadata: 4880 bytes as JSON, over JOB_MAX_METADATA_BYTES=4096"),
    ],
)  # fmt: skip
def test_a_job_over_a_limit_names_the_field_and_the_setting(
    fields: dict[str, Any], expected: str
) -> None:
    assert reason(fields) == f"invalid job: {expected}"


def test_every_limit_passed_is_named_at_once() -> None:
    text = reason(job(input="x" * 100_001, max_output_tokens=50_000))
    assert text == (
        "invalid job: input: 100001 characters, over JOB_MAX_INPUT_CHARS=100000; "
        "max_output_tokens: 50000, over JOB_MAX_OUTPUT_TOKENS=32000"
    )


def test_the_limits_are_the_ones_given() -> None:
    small = JobLimits(input_chars=10, output_tokens=5, metadata_entries=1)
    assert reason(job(input="x" * 11), small) == (
        "invalid job: input: 11 characters, over JOB_MAX_INPUT_CHARS=10"
    )
    assert parse_job(job(input="x" * 11), JobLimits()).input == "x" * 11
    assert "JOB_MAX_OUTPUT_TOKENS=5" in reason(job(max_output_tokens=6), small)
    assert "JOB_MAX_METADATA=1" in reason(job(metadata={"a": "1", "b": "2"}), small)


def test_a_job_at_every_limit_is_accepted() -> None:
    accepted = parse_job(
        job(
            input="x" * LIMITS.input_chars,
            instructions="y" * LIMITS.input_chars,
            max_output_tokens=LIMITS.output_tokens,
            # 16 keys of 64 characters, within 4096 bytes as JSON in all
            metadata={f"k{i:02d}" + "k" * 61: "v" * 150 for i in range(16)},
        )
    )
    assert len(accepted.metadata) == 16
    assert parse_job(job(metadata={"k" * 64: "v" * 512})).metadata


def test_a_payload_longer_than_any_job_is_refused_unread() -> None:
    small = JobLimits(input_chars=10, metadata_bytes=10)
    raw = '{"channel": "c", "input": "' + "x" * small.payload_chars + '"}'
    text = reason(raw, small)
    assert text.startswith(f"job is {len(raw)} characters of JSON, more than a job within")
    assert "JOB_MAX_INPUT_CHARS=10" in text


def test_a_reason_stays_short_and_on_one_line_whatever_the_job_holds() -> None:
    fields = job(**{f"extra\n{i}" + "x" * 1000: i for i in range(50)})
    text = reason(fields)
    assert len(text) <= MAX_REASON_CHARS and "\n" not in text
    assert text.endswith("; and 45 more")
    assert MAX_REASON_CHARS <= MAX_ERROR_CHARS  # it fits the channel's `error` header


def test_a_lone_surrogate_is_refused_by_the_model_itself() -> None:
    """It could not be stored (UTF-8) nor sent: `Job(...)` refuses it too."""
    with pytest.raises(ValueError, match="lone surrogate"):
        Job(channel="c", input="x", metadata={"k": "\udc80"})


def test_the_schema_carries_the_limits() -> None:
    schema = job_schema(JobLimits(input_chars=123, output_tokens=45, metadata_entries=6))
    props = schema["properties"]
    assert {"type": "string", "maxLength": 123} in props["input"]["anyOf"]
    assert any(o.get("maximum") == 45 for o in props["max_output_tokens"]["anyOf"])
    assert props["metadata"]["maxProperties"] == 6
    assert "JOB_MAX_INPUT_CHARS" in props["input"]["description"]


def test_the_limits_are_settings_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(JobLimitSettings).job_limits() == JobLimits()
    monkeypatch.setenv("JOB_MAX_INPUT_CHARS", "2000")
    monkeypatch.setenv("JOB_MAX_METADATA", "4")
    limits = load_settings(JobLimitSettings).job_limits()
    assert (limits.input_chars, limits.metadata_entries) == (2000, 4)
    default_limits.cache_clear()
    try:
        assert default_limits() == limits  # what `parse_job` applies unless told otherwise
        assert "JOB_MAX_INPUT_CHARS=2000" in reason(job(input="x" * 2001), default_limits())
    finally:
        default_limits.cache_clear()


def test_a_bad_limit_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOB_MAX_OUTPUT_TOKENS", "0")
    with pytest.raises(SettingsError, match="JOB_MAX_OUTPUT_TOKENS"):
        load_settings(JobLimitSettings)
    assert "job_max_output_tokens" in Settings.model_fields  # the worker validates it at start
