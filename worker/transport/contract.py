"""The wire contract on a conversation channel: message names, actions and headers.

Every channel message the worker sends is shaped here and nowhere else, so a second
contract (Ably's AI Transport SDK: `extras.ai`) can join this one without touching the
streaming code. The table is in the README for front-end developers.

| what | name | action | data | `extras.headers` |
| --- | --- | --- | --- | --- |
| response starts | `response` | create | `""` | responseId, status=streaming, model, metadata |
| each delta | `response` | append | delta | the same headers, all of them |
| response ends | `response` | update | full text | status: complete, cancelled, failed... |
| user cancels | `cancel` | create | anything | responseId |
| user asks | `prompt` | create | prompt text | optional model, pattern |

What users send is read here too (`user_message`): the sender is the clientId Ably
reports, and a role is read from `extras.userClaim`, which Ably sets from the sender's
token (never from a header the client wrote).

The second contract, Ably AI Transport's (`WIRE_PROTOCOL=ait`, or a job's `wire`), is
shaped in `transport.ait` and joins here through `Headers.ait`: the same messages, named
`ai-output`, carry `extras.ai` beside these headers (the rhythm is the same).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ably.types.message import Message, MessageAction

from worker.transport import ait
from worker.transport.ait import OUTPUT, AitRun

RESPONSE = "response"
CANCEL = "cancel"
PROMPT = "prompt"
# Message per token: start, token..., stop, correlated by the responseId header.
TOKEN_START, TOKEN, TOKEN_STOP = "start", "token", "stop"

MAX_ERROR_CHARS = 500  # an error header stays small: headers share the 64 KiB message


class Status(enum.StrEnum):
    STREAMING = "streaming"
    COMPLETE = "complete"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # the worker stopped; a retry reopens this same message


@dataclass(frozen=True)
class Headers:
    """The headers every message of one response carries (Ably replaces extras on an
    append rather than merging them, so each append resends all of them)."""

    response_id: str
    model: str
    metadata: dict[str, str] = field(default_factory=dict)
    status: Status = Status.STREAMING
    error: str | None = None
    ait: AitRun | None = None  # the AI Transport contract: `extras.ai` too, `ai-output`

    def with_status(self, status: Status, error: str | None = None) -> Headers:
        return replace(self, status=status, error=(error or "")[:MAX_ERROR_CHARS] or None)

    def extras(self) -> dict[str, Any]:
        headers: dict[str, str] = {**self.metadata}
        headers.update(responseId=self.response_id, status=str(self.status), model=self.model)
        if self.error:
            headers["error"] = self.error
        if self.ait is not None:
            return {"headers": headers, "ai": self.ait.output_extras(self.status)}
        return {"headers": headers}

    @property
    def name(self) -> str:
        """The answer message's name: `ai-output` on the AI Transport wire."""
        return RESPONSE if self.ait is None else OUTPUT


# -- message per response --------------------------------------------------------------


def response_create(headers: Headers) -> Message:
    """The id makes the create idempotent: one response, one message, whoever retries."""
    return Message(
        name=headers.name, id=f"{headers.response_id}:response", data="", extras=headers.extras()
    )


def response_append(serial: str, delta: str, headers: Headers) -> Message:
    return Message(name=headers.name, serial=serial, data=delta, extras=headers.extras())


APPEND = int(MessageAction.MESSAGE_APPEND)


def response_append_wire(serial: str, delta: str, headers: Headers) -> dict[str, Any]:
    """`response_append` as ably-python's `append_message` puts it on the wire: for the
    lean append of the hot path (`sdk_quirks.append`)."""
    return {
        "name": headers.name, "extras": headers.extras(), "serial": serial,
        "action": APPEND, "data": delta,
    }  # fmt: skip


def response_replace(serial: str, text: str, headers: Headers) -> Message:
    """An update carrying the whole text: a retry's reset, a repair, or a closing update."""
    return Message(name=headers.name, serial=serial, data=text, extras=headers.extras())


def response_close(serial: str, headers: Headers) -> Message:
    """An update of the headers alone: the text stays as the appends built it. (On AI
    Transport's wire an empty append instead: see `closes_by_append`.)"""
    return Message(name=headers.name, serial=serial, extras=headers.extras())


def closes_by_append(headers: Headers) -> bool:
    """Whether a close that does not resend the text is an empty append (`response_append`
    with no text) rather than `response_close`. AI Transport's client (0.8.0) reads an
    update as the whole text, so an update without data would empty the answer it shows;
    an empty append carrying the closing `extras.ai` closes the stream and keeps it."""
    return headers.ait is not None


# -- message per token -----------------------------------------------------------------


def token_start(headers: Headers, attempt: int) -> Message:
    """Each attempt starts afresh (clients reset on `start`); the id dedupes within one."""
    message_id = f"{headers.response_id}:start:{attempt}"
    return Message(name=TOKEN_START, id=message_id, data="", extras=headers.extras())


def token(delta: str, headers: Headers) -> Message:
    return Message(name=TOKEN, data=delta, extras={"headers": {"responseId": headers.response_id}})


def token_stop(text: str, headers: Headers) -> Message:
    """`stop` carries the whole text, so a client that missed a token still converges."""
    return Message(name=TOKEN_STOP, data=text, extras=headers.extras())


# -- reading what users send -----------------------------------------------------------


def header(message: Any, name: str) -> str | None:
    extras = getattr(message, "extras", None) or {}
    value = (extras.get("headers") or {}).get(name) if isinstance(extras, dict) else None
    return value if isinstance(value, str) else None


def cancel_target(message: Any) -> str | None:
    """The responseId a `cancel` message asks to stop, or None if it is not one."""
    return header(message, "responseId") if getattr(message, "name", None) == CANCEL else None


def is_used_message_id(error: Any) -> bool:
    """A publish refused because its message id was already used (Sockudo: 40000
    "message.id was already used with a different payload"): the create of an earlier
    attempt of the same response went out."""
    code = getattr(error, "code", None)
    text = str(getattr(error, "message", "") or error).lower()
    return code == 40000 and "already used" in text


@dataclass(frozen=True)
class UserMessage:
    """A `prompt` or `cancel` a user published on a conversation channel; or, on Ably AI
    Transport's wire, one text part of an `ai-input` user message, or an `ai-cancel`."""

    kind: Literal["prompt", "cancel"]
    serial: str
    timestamp: int  # ms, as Ably stamped it
    client_id: str | None  # as Ably reports it: the token's identity
    message_id: str | None = None
    text: str | None = None  # a prompt's text
    response_id: str | None = None  # what a cancel stops
    model: str | None = None
    pattern: str | None = None
    user_claim: str | None = None  # Ably-verified, from the sender's token
    wire: Literal["seed", "ait"] = "seed"
    # AI Transport: the user message's codec-message-id (an input part), or the input a
    # cancel names; the input's event-id; the run a cancel names.
    input_codec_message_id: str | None = None
    input_event_id: str | None = None
    run_id: str | None = None


def user_message(message: Any) -> UserMessage | None:
    """The user's prompt or cancel in a channel message, or None for anything else."""
    name = getattr(message, "name", None)
    serial = getattr(message, "serial", None)
    if name not in (PROMPT, CANCEL, ait.INPUT, ait.CANCEL) or not isinstance(serial, str):
        return None
    extras = getattr(message, "extras", None)
    claim = extras.get("userClaim") if isinstance(extras, dict) else None
    data = getattr(message, "data", None)
    common: dict[str, Any] = {
        "serial": serial,
        "timestamp": int(getattr(message, "timestamp", 0) or 0),
        "client_id": getattr(message, "client_id", None) or None,
        "message_id": getattr(message, "id", None),
        "user_claim": claim if isinstance(claim, str) else None,
    }
    if name == ait.INPUT:
        part = ait.input_part(message)
        if part is None or part.run_id is not None:  # not a new prompt (tool results...)
            return None
        return UserMessage(kind="prompt", wire="ait", text=part.text,
                           input_codec_message_id=part.codec_message_id,
                           input_event_id=part.event_id, **common)  # fmt: skip
    if name == ait.CANCEL:
        target = ait.cancel_target(message)
        if target is None:
            return None
        return UserMessage(kind="cancel", wire="ait", run_id=target.run_id,
                           input_codec_message_id=target.input_codec_message_id,
                           **common)  # fmt: skip
    return UserMessage(
        kind="prompt" if name == PROMPT else "cancel",
        text=data if isinstance(data, str) else None,
        response_id=header(message, "responseId"),
        model=header(message, "model"),
        pattern=header(message, "pattern"),
        **common,
    )


def may_cancel(
    client_id: str | None, user_claim: str | None, owner: str | None, roles: frozenset[str]
) -> bool:
    """Only the job's own user, or a client whose Ably-verified claim is an allowed role."""
    if client_id is not None and owner is not None and client_id == owner:
        return True
    return user_claim is not None and user_claim in roles
