"""A conversation as the model should see it: what came before the next prompt.

With the Responses API the model keeps it: each prompt is chained to the previous
answer's model response id (`previous_response_id`). With Chat Completions the worker
sends the transcript, read from the channel (users' prompts and the agent's complete
answers), newest first until a size budget is spent, then given oldest first.
"""

from __future__ import annotations

import hashlib
from typing import Any

from worker.jobs import valid_job_id
from worker.transport import contract

TRANSCRIPT_CHARS = 24_000


def job_id_for(message_id: str | None, serial: str) -> str:
    """A prompt's job id is its Ably message id (a replay, or a second listener, is then
    a no-op through the idempotent enqueue); one that is not a valid job id is hashed."""
    if message_id and valid_job_id(message_id):
        return message_id
    return "p" + hashlib.sha256((message_id or serial).encode()).hexdigest()[:40]


async def transcript(
    channel: Any, before_serial: str, budget_chars: int = TRANSCRIPT_CHARS, max_pages: int = 10
) -> list[dict[str, str]]:
    """The user and assistant turns before `before_serial`, oldest first, within budget."""
    turns: list[dict[str, str]] = []
    spent = 0
    page = await channel.history(direction="backwards", limit=100)
    for _ in range(max_pages):
        for message in page.items or []:
            if (getattr(message, "serial", "") or "") >= before_serial:
                continue
            turn = _turn(message)
            if turn is None:
                continue
            spent += len(turn["content"])
            if spent > budget_chars:
                return list(reversed(turns))
            turns.append(turn)
        if not page.has_next():
            break
        page = await page.next()
        if page is None:
            break
    return list(reversed(turns))


def _turn(message: Any) -> dict[str, str] | None:
    name, data = getattr(message, "name", None), getattr(message, "data", None)
    if not isinstance(data, str) or not data:
        return None
    if name == contract.PROMPT and getattr(message, "client_id", None):
        return {"role": "user", "content": data}
    if name == contract.RESPONSE and contract.header(message, "status") == "complete":
        return {"role": "assistant", "content": data}
    return None
