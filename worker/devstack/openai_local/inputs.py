"""The prompt a request carries: its last user input text, and its size in tokens."""

from __future__ import annotations

from typing import Any

from worker.devstack.openai_local.options import BadRequest
from worker.devstack.openai_local.text import count_tokens

_TEXT_PARTS = ("input_text", "text")


def responses_prompt(body: dict[str, Any]) -> str:
    """The last user text of a Responses `input`: a string or a list of messages."""
    items = body.get("input")
    if items is None or isinstance(items, str):
        return items or ""
    if not isinstance(items, list):
        raise BadRequest("Invalid type for 'input': expected a string or an array.", "input")
    return _last_user_text(items, "input")


def chat_prompt(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("Missing required parameter: 'messages'.", "messages")
    return _last_user_text(messages, "messages")


def input_tokens(body: dict[str, Any]) -> int:
    """Every text the request sends the model, counted like the answers."""
    texts: list[str] = []
    for key in ("instructions", "input", "messages"):
        _collect_texts(body.get(key), texts)
    return sum(count_tokens(text) for text in texts)


def _last_user_text(items: list[Any], param: str) -> str:
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role") == "user":
            return _content_text(item.get("content"), param)
    return ""


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS
        ]
        return "\n".join(t for t in texts if isinstance(t, str))
    if content is None:
        return ""
    raise BadRequest(f"Invalid content in '{param}': expected a string or an array.", param)


def _collect_texts(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect_texts(item, out)
    elif isinstance(value, dict):
        _collect_texts(value.get("content"), out)
        text = value.get("text")
        if isinstance(text, str):
            out.append(text)
