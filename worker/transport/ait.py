"""Ably AI Transport's wire: what the official client (npm `@ably/ai-transport`) reads.

Pinned to **0.8.0**: the wire has no version field and has changed incompatibly between
releases (0.2.0 moved from `x-ably-*` headers to `extras.ai`). Read from the package's
own source (`src/constants.ts`, `src/core/codec/encoder.ts`, `src/core/codec/decoder.ts`,
`src/core/transport/headers.ts`, `src/vercel/codec/outputs.ts`). Everything rides in
`extras.ai.transport` (transport headers) and `extras.ai.codec` (the codec's), each a
string map; our own fields (`responseId`, `status`, `model`, metadata) stay in
`extras.headers` beside them, which the client never reads. The client ignores messages
without `extras.ai`, so this contract and the seed's can share a channel.

Per user input with codec-message-id U, for job J (user C, its Ably clientId):

1. `ai-run-start` (create, no data): transport run-id R, run-client-id C, parent U,
   input-codec-message-id U, input-client-id C.
2. `ai-output` (create, data `""`): transport role `assistant`, codec-message-id M,
   run-id R, run-client-id C, parent U, input-codec-message-id U, input-client-id C,
   stream `true`, status `streaming`, stream-id S; codec kind `text`, id S, messageId M.
3. `ai-output` appends (data: the coalesced delta) with the identical full `extras.ai`
   (Ably replaces extras on an append).
4. One closing update of `ai-output` carrying the whole text, status `complete` or
   `cancelled`, the rest as before.
5. `ai-run-end` (create, no data): transport run-id R, run-client-id C,
   input-codec-message-id U, input-client-id C, run-reason `complete`, `cancelled` or
   `error` (then error-code and error-message too).

R = `run:J`, M = `J:answer`, S = `J:text` (stable across retries; for a job made from an
`ai-input`, J is the input's event-id). The text stream is the Vercel UI-message codec's
`text` group: its decoder synthesises the `start`/`start-step` chunks from the stream's
start, and the client's run ends on `ai-run-end` (always sent, else the run stays active
for ever). The close must be the LAST change to the message: after a terminal status the client's
decoder drops every later append or update. Its update repairs only while the client's
text is a prefix of it (0.8.0 ignores a non-prefix update), so the close carries the
whole text and nothing follows it.

Sockudo validates `extras.ai` on every publish: transport keys from a fixed set, ids
non-empty, values at most 256 bytes, `status` only streaming/complete/cancelled,
`run-reason` only complete/cancelled/error. So the seed's other statuses are spelled:
`failed` closes the stream `cancelled` (the text so far kept) and the run ends `error`
(error-code 104008, Ably AI Transport's StreamError, and the reason as error-message);
`interrupted` (the worker stopped, a retry will run the job again) is not a close at
all: the stream stays `streaming` and no `ai-run-end` goes out, so the client shows the
run still active and the retry's attempt finishes the same message and then ends the run.

What users send (the client publishes these; Sockudo stamps the sender's clientId):

- `ai-input`, one message per part of a user message, all with the same
  codec-message-id U and event-id E: transport role user, codec-message-id U, event-id E,
  run-client-id, optional parent (and run-id for a continuation), stream false,
  discrete true; codec kind `user-message`, partType `text` (data: the text) or
  `file`/`data-*` (not text: ignored here), messageId (the UI message id).
- `ai-cancel`: transport run-id and/or input-codec-message-id (the `useChat` stop sends
  only the latter), and an event-id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ably.types.message import Message

CLIENT_VERSION = "0.8.0"  # the `@ably/ai-transport` release this wire is read from

# Message names (src/constants.ts).
RUN_START = "ai-run-start"
RUN_END = "ai-run-end"
OUTPUT = "ai-output"
INPUT = "ai-input"
CANCEL = "ai-cancel"

# Transport header keys (src/constants.ts).
ROLE = "role"
RUN_ID = "run-id"
CODEC_MESSAGE_ID = "codec-message-id"
RUN_CLIENT_ID = "run-client-id"
INPUT_CLIENT_ID = "input-client-id"
INPUT_CODEC_MESSAGE_ID = "input-codec-message-id"
EVENT_ID = "event-id"
PARENT = "parent"
STREAM = "stream"
STATUS = "status"
STREAM_ID = "stream-id"
RUN_REASON = "run-reason"
ERROR_CODE = "error-code"
ERROR_MESSAGE = "error-message"

# Codec header keys: the dispatch kind (src/core/codec/header-fields.ts) and the Vercel
# codec's fields (src/vercel/codec/fields.ts).
KIND = "kind"
PART_TYPE = "partType"
TEXT_KIND = "text"  # the Vercel codec's streamed text group
USER_MESSAGE_KIND = "user-message"

STREAM_ERROR_CODE = 104008  # ErrorCode.StreamError: what the JS agent stamps on a failure
MAX_VALUE_BYTES = 256  # Sockudo's limit on one transport value

TransportStatus = Literal["streaming", "complete", "cancelled"]
RunReason = Literal["complete", "cancelled", "error"]

# Our statuses (contract.Status values) in the transport's spelling (see above).
_TRANSPORT_STATUS: dict[str, TransportStatus] = {
    "streaming": "streaming",
    "complete": "complete",
    "cancelled": "cancelled",
    "failed": "cancelled",
    "interrupted": "streaming",
}


def transport_status(status: str) -> TransportStatus:
    return _TRANSPORT_STATUS[status]


def clip(text: str, limit: int = MAX_VALUE_BYTES) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, on a character boundary."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def _fits(value: str | None) -> str | None:
    """An id Sockudo accepts (non-empty, at most 256 bytes), else None: left off."""
    return value if value and len(value.encode()) <= MAX_VALUE_BYTES else None


@dataclass(frozen=True)
class AitRun:
    """One job's run on the AI Transport wire: the ids every message of it carries."""

    job_id: str
    input_codec_message_id: str | None = None  # U: the user input this run answers
    client_id: str | None = None  # the user's Ably clientId

    @property
    def run_id(self) -> str:
        return f"run:{self.job_id}"

    @property
    def codec_message_id(self) -> str:
        return f"{self.job_id}:answer"

    @property
    def stream_id(self) -> str:
        return f"{self.job_id}:text"

    def _identity(self) -> dict[str, str]:
        """run-id and who and what the run answers: on lifecycle events and outputs."""
        headers = {RUN_ID: self.run_id, RUN_CLIENT_ID: _fits(self.client_id) or ""}
        user_input = _fits(self.input_codec_message_id)
        if user_input:
            headers[INPUT_CODEC_MESSAGE_ID] = user_input
        client = _fits(self.client_id)
        if client:
            headers[INPUT_CLIENT_ID] = client
        return headers

    def output_extras(self, status: str) -> dict[str, Any]:
        """`extras.ai` of the answer's `ai-output` message, whole, for every send of it."""
        transport = {ROLE: "assistant", CODEC_MESSAGE_ID: self.codec_message_id,
                     **self._identity()}  # fmt: skip
        if INPUT_CODEC_MESSAGE_ID in transport:
            transport[PARENT] = transport[INPUT_CODEC_MESSAGE_ID]
        transport.update({STREAM: "true", STATUS: transport_status(status),
                          STREAM_ID: self.stream_id})  # fmt: skip
        codec = {KIND: TEXT_KIND, "id": self.stream_id, "messageId": self.codec_message_id}
        return {"transport": transport, "codec": codec}

    def run_start(self, response_id: str) -> Message:
        """`ai-run-start`, under a fixed message id: a retry's repeat is the same message
        (Ably's idempotent publish), not a second start."""
        transport = self._identity()
        if INPUT_CODEC_MESSAGE_ID in transport:
            transport[PARENT] = transport[INPUT_CODEC_MESSAGE_ID]
        extras = {"ai": {"transport": transport}, "headers": {"responseId": response_id}}
        return Message(name=RUN_START, id=f"{self.job_id}:ai-run-start", extras=extras)

    def run_end(self, response_id: str, reason: RunReason, error: str | None = None) -> Message:
        """`ai-run-end`; with reason `error`, the numeric code and the reason the client
        shows on the run (`run.error`)."""
        transport = {**self._identity(), RUN_REASON: reason}
        if reason == "error":
            transport[ERROR_CODE] = str(STREAM_ERROR_CODE)
            transport[ERROR_MESSAGE] = clip(error or "the answer failed")
        extras = {"ai": {"transport": transport}, "headers": {"responseId": response_id}}
        return Message(name=RUN_END, id=f"{self.job_id}:ai-run-end", extras=extras)


# -- reading what users send -----------------------------------------------------------


def _tier(message: Any, tier: str) -> dict[str, str]:
    extras = getattr(message, "extras", None)
    ai = extras.get("ai") if isinstance(extras, dict) else None
    found = ai.get(tier) if isinstance(ai, dict) else None
    if not isinstance(found, dict):
        return {}
    return {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, str)}


def transport_headers(message: Any) -> dict[str, str]:
    return _tier(message, "transport")


def codec_headers(message: Any) -> dict[str, str]:
    return _tier(message, "codec")


@dataclass(frozen=True)
class InputPart:
    """One part of a user's `ai-input` message (a user message is one wire message per
    part, all with one codec-message-id)."""

    codec_message_id: str
    event_id: str | None
    text: str | None  # a text part's text; None for any other part (file, data-*)
    run_id: str | None  # set on a continuation (a tool result): not a new prompt


def input_part(message: Any) -> InputPart | None:
    """The user-message part in an `ai-input`, or None (another kind of input: a tool
    result, an approval, a regenerate signal, or not an AIT input at all)."""
    if getattr(message, "name", None) != INPUT:
        return None
    transport, codec = transport_headers(message), codec_headers(message)
    codec_message_id = transport.get(CODEC_MESSAGE_ID)
    if not codec_message_id or codec.get(KIND) != USER_MESSAGE_KIND:
        return None
    if transport.get(ROLE, "user") != "user":
        return None
    data = getattr(message, "data", None)
    is_text = codec.get(PART_TYPE, "text") == "text" and isinstance(data, str)
    return InputPart(
        codec_message_id=codec_message_id,
        event_id=transport.get(EVENT_ID),
        text=data if is_text else None,
        run_id=transport.get(RUN_ID),
    )


@dataclass(frozen=True)
class CancelTarget:
    """What an `ai-cancel` asks to stop: a run by its id, or by the input it answers."""

    run_id: str | None
    input_codec_message_id: str | None


def cancel_target(message: Any) -> CancelTarget | None:
    if getattr(message, "name", None) != CANCEL:
        return None
    transport = transport_headers(message)
    run_id, user_input = transport.get(RUN_ID), transport.get(INPUT_CODEC_MESSAGE_ID)
    target = CancelTarget(run_id or None, user_input or None)
    return target if target.run_id or target.input_codec_message_id else None


def job_id_of_run(run_id: str) -> str | None:
    """The job a run-id names (`run:J`), or None for a run this worker did not mint."""
    return run_id.removeprefix("run:") if run_id.startswith("run:") else None
