"""The Responses API's objects and stream events, in OpenAI's order and shape.

One `ResponseBuilder` per response holds its state (status, text so far, usage) and
turns each step into encoded server-sent events with increasing sequence numbers.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from worker.devstack.openai_local.sse import encode

# Request fields a Response object echoes back, with OpenAI's defaults.
_ECHOED: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "safety_identifier": None,
    "store": True,
    "temperature": 1.0,
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
}
_TEXT_CONFIG = {"format": {"type": "text"}, "verbosity": "medium"}
# response.output_text.delta, as `_event` would encode it, cut round its variable parts
_DELTA_HEAD = (
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":'
)
_DELTA_END = b',"logprobs":[]}\n\n'


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


class ResponseBuilder:
    def __init__(self, body: dict[str, Any], model: str, input_tokens: int) -> None:
        self.id = new_id("resp")
        self.item_id = new_id("msg")
        self.background = bool(body.get("background"))
        self.status = "queued" if self.background else "in_progress"
        self._model = model
        self._created_at = int(time.time())
        self._completed_at: int | None = None
        self._echoed = {k: body.get(k, default) for k, default in _ECHOED.items()}
        self._metadata = body.get("metadata") or {}
        self._input_tokens = input_tokens
        self._output_tokens = 0
        self._deltas: list[str] = []
        self._item_status: str | None = None  # None until the output item is added
        self._error: dict[str, Any] | None = None
        self._incomplete_reason: str | None = None
        self._seq = 0
        self._delta_tail = (
            f',"item_id":"{self.item_id}","output_index":0,"content_index":0,"delta":'.encode()
        )

    @property
    def text(self) -> str:
        return "".join(self._deltas)

    @property
    def opening_events(self) -> int:
        """How many events `opening` emits: the first delta's sequence number."""
        return 5 if self.background else 4

    @property
    def finished(self) -> bool:
        return self.status not in ("queued", "in_progress")

    def opening(self) -> list[bytes]:
        """From `response.created` to the empty text part that the deltas fill."""
        events = [self._response_event("response.created")]
        if self.background:
            events.append(self._response_event("response.queued"))
            self.status = "in_progress"
        events.append(self._response_event("response.in_progress"))
        self._item_status = "in_progress"
        events.append(self._item_event("response.output_item.added", self._item(content=[])))
        events.append(self._part_event("response.content_part.added", ""))
        assert len(events) == self.opening_events  # a break point counts on it
        return events

    def deltas(self, texts: list[str], tokens: int) -> list[bytes]:
        """Delta events, from a template: the hot path of every stream."""
        self._output_tokens += tokens
        self._deltas.extend(texts)
        first = self._seq
        self._seq += len(texts)
        head, tail = _DELTA_HEAD, self._delta_tail
        return [
            b"".join((head, str(seq).encode(), tail, orjson.dumps(text), _DELTA_END))
            for seq, text in enumerate(texts, first)
        ]

    def finish(self, incomplete_reason: str | None = None) -> list[bytes]:
        """The closing events, then `response.completed` or `response.incomplete`."""
        text = self.text
        self._item_status = "incomplete" if incomplete_reason else "completed"
        events = [
            self._event(
                "response.output_text.done",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            self._part_event("response.content_part.done", text),
            self._item_event("response.output_item.done", self._item()),
        ]
        self._completed_at = int(time.time())
        if incomplete_reason:
            self.status, self._incomplete_reason = "incomplete", incomplete_reason
            events.append(self._response_event("response.incomplete"))
        else:
            self.status = "completed"
            events.append(self._response_event("response.completed"))
        return events

    def fail(self, message: str) -> list[bytes]:
        self.status = "failed"
        self._item_status = "incomplete"
        self._error = {"code": "server_error", "message": message}
        return [self._response_event("response.failed")]

    def cancel(self) -> None:
        if not self.finished:
            self.status = "cancelled"
            if self._item_status == "in_progress":
                self._item_status = "incomplete"

    def snapshot(self) -> dict[str, Any]:
        """The Response object as it stands."""
        done = self.status in ("completed", "incomplete", "failed")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self._created_at,
            "status": self.status,
            "background": self.background,
            "completed_at": self._completed_at,
            "error": self._error,
            "incomplete_details": (
                {"reason": self._incomplete_reason} if self._incomplete_reason else None
            ),
            "model": self._model,
            "output": [] if self._item_status is None else [self._item()],
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "text": _TEXT_CONFIG,
            "usage": self._usage() if done else None,
            "metadata": self._metadata,
            **self._echoed,
        }

    def _item(self, content: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if content is None:
            content = [_output_text(self.text)]
        return {
            "id": self.item_id,
            "type": "message",
            "status": self._item_status,
            "content": content,
            "role": "assistant",
        }

    def _usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self._input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": self._output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self._input_tokens + self._output_tokens,
        }

    def _response_event(self, type_: str) -> bytes:
        return self._event(type_, response=self.snapshot())

    def _item_event(self, type_: str, item: dict[str, Any]) -> bytes:
        return self._event(type_, output_index=0, item=item)

    def _part_event(self, type_: str, text: str) -> bytes:
        return self._event(
            type_,
            item_id=self.item_id,
            output_index=0,
            content_index=0,
            part=_output_text(text),
        )

    def _event(self, type_: str, **fields: Any) -> bytes:
        data = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return encode(data, event=type_)


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
