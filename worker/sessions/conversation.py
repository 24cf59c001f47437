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
from worker.transport import ait, contract

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
    """The user and assistant turns before the prompt at `before_serial`, oldest first,
    the newest kept within budget. Each answer follows the prompt it answers (its
    `responseId` is the prompt's message id), wherever its own message stands: answers
    are created after later prompts were published."""
    prompts: list[Any] = []
    answers: dict[str, Any] = {}
    page = await channel.history(direction="backwards", limit=100)
    for _ in range(max_pages):
        for message in page.items or []:
            if _turn(message) is None:
                continue
            if getattr(message, "name", None) in (contract.PROMPT, ait.INPUT):
                if (getattr(message, "serial", "") or "") < before_serial:
                    prompts.append(message)
            else:
                answers[contract.header(message, "responseId") or ""] = message
        if not page.has_next():
            break
        page = await page.next()
        if page is None:
            break
    return _within_budget(_interleave(prompts, answers), budget_chars)


def _interleave(prompts: list[Any], answers: dict[str, Any]) -> list[dict[str, str]]:
    """Prompts in order, each followed by its answer; answers to other jobs (a backend's)
    at their own place."""
    keyed: list[tuple[str, list[dict[str, str]]]] = []
    for prompt in prompts:
        turns = [_turn(prompt)]
        answer = answers.pop(getattr(prompt, "id", None) or "", None)
        if answer is not None:
            turns.append(_turn(answer))
        keyed.append((prompt.serial, [t for t in turns if t is not None]))
    for answer in answers.values():
        turn = _turn(answer)
        if turn is not None:
            keyed.append((answer.serial, [turn]))
    keyed.sort(key=lambda item: item[0])
    return [turn for _, turns in keyed for turn in turns]


def _within_budget(turns: list[dict[str, str]], budget_chars: int) -> list[dict[str, str]]:
    kept: list[dict[str, str]] = []
    spent = 0
    for turn in reversed(turns):
        spent += len(turn["content"])
        if spent > budget_chars:
            break
        kept.append(turn)
    return list(reversed(kept))


def _turn(message: Any) -> dict[str, str] | None:
    name, data = getattr(message, "name", None), getattr(message, "data", None)
    if not isinstance(data, str) or not data:
        return None
    if name == contract.PROMPT and getattr(message, "client_id", None):
        return {"role": "user", "content": data}
    if name == ait.INPUT and getattr(message, "client_id", None):
        part = ait.input_part(message)  # an AI Transport user message's text part
        return {"role": "user", "content": data} if part and part.text else None
    answer = name in (contract.RESPONSE, ait.OUTPUT)
    if answer and contract.header(message, "status") == "complete":
        return {"role": "assistant", "content": data}
    return None
