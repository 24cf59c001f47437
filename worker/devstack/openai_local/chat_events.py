"""Chat Completions objects: `chat.completion` and the `chat.completion.chunk` stream."""

from __future__ import annotations

import secrets
import time
from typing import Any

from worker.devstack.openai_local.sse import encode

DONE = b"data: [DONE]\n\n"
_FINGERPRINT = "fp_local"


class ChatBuilder:
    def __init__(self, model: str, input_tokens: int, include_usage: bool) -> None:
        self.id = f"chatcmpl-{secrets.token_urlsafe(21)}"
        self._model = model
        self._created = int(time.time())
        self._input_tokens = input_tokens
        self._include_usage = include_usage

    def first(self) -> bytes:
        return self._chunk({"role": "assistant", "content": "", "refusal": None})

    def deltas(self, texts: list[str]) -> list[bytes]:
        return [self._chunk({"content": text}) for text in texts]

    def last(self, finish_reason: str, output_tokens: int) -> list[bytes]:
        chunks = [self._chunk({}, finish_reason)]
        if self._include_usage:
            usage = self._usage(output_tokens)
            chunks.append(encode({**self._head("chat.completion.chunk"), "choices": [], **usage}))
        return [*chunks, DONE]

    def whole(self, text: str, finish_reason: str, output_tokens: int) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": [],
        }
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], **self._usage(output_tokens)}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        data = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if self._include_usage:
            data["usage"] = None
        return encode(data)

    def _head(self, object_: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_,
            "created": self._created,
            "model": self._model,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }

    def _usage(self, output_tokens: int) -> dict[str, Any]:
        return {
            "usage": {
                "prompt_tokens": self._input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": self._input_tokens + output_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            }
        }
