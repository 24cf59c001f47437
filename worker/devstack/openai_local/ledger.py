"""What the server remembers across requests: attempts per prompt, failures handed out,
and what the last request for each prompt carried.

`local_fail_times = N` fails only the first N attempts of a (prompt, failure) pair,
so a client that retries eventually succeeds. Every book is bounded.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

from worker.devstack.openai_local.options import RequestOptions

_MAX_KEYS = 100_000
_MAX_REQUESTS = 1_000  # request bodies are bigger than counts: fewer of them
# What `last_request` shows of a create request: the conversation the model was given.
REQUEST_FIELDS = ("model", "previous_response_id", "instructions", "input", "messages")


class _BoundedCounter:
    def __init__(self, max_keys: int = _MAX_KEYS) -> None:
        self._counts: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._max_keys = max_keys

    def get(self, key: tuple[str, ...]) -> int:
        return self._counts.get(key, 0)

    def add(self, key: tuple[str, ...]) -> int:
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count
        if len(self._counts) > self._max_keys:
            self._counts.popitem(last=False)
        return count

    def clear(self) -> None:
        self._counts.clear()


class Ledger:
    def __init__(self, max_requests: int = _MAX_REQUESTS) -> None:
        self._attempts = _BoundedCounter()
        self._failures = _BoundedCounter()
        self._requests: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._max_requests = max_requests

    def record_request(self, prompt: str, body: dict[str, Any]) -> None:
        """Keep what this create request carried, as the last one for its prompt."""
        self._requests.pop(prompt, None)
        self._requests[prompt] = {k: copy.deepcopy(body.get(k)) for k in REQUEST_FIELDS}
        if len(self._requests) > self._max_requests:
            self._requests.popitem(last=False)

    def last_request(self, prompt: str) -> dict[str, Any] | None:
        """The last create request for this prompt (`REQUEST_FIELDS`, None where absent)."""
        request = self._requests.get(prompt)
        return copy.deepcopy(request) if request is not None else None

    def record_attempt(self, prompt: str) -> None:
        self._attempts.add((prompt,))

    def attempts(self, prompt: str) -> int:
        """How many create requests (Responses or chat) carried this prompt."""
        return self._attempts.get((prompt,))

    def should_fail(self, prompt: str, options: RequestOptions) -> bool:
        """Whether this attempt fails as asked; counts the failure when it does."""
        if options.fail is None:
            return False
        key = (prompt, options.fail)
        if options.fail_times is not None and self._failures.get(key) >= options.fail_times:
            return False
        self._failures.add(key)
        return True

    def clear(self) -> None:
        self._attempts.clear()
        self._failures.clear()
        self._requests.clear()
