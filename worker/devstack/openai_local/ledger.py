"""What the server remembers across requests: attempts per prompt, failures handed out.

`local_fail_times = N` fails only the first N attempts of a (prompt, failure) pair,
so a client that retries eventually succeeds. Both books are bounded.
"""

from __future__ import annotations

from collections import OrderedDict

from worker.devstack.openai_local.options import RequestOptions

_MAX_KEYS = 100_000


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
    def __init__(self) -> None:
        self._attempts = _BoundedCounter()
        self._failures = _BoundedCounter()

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
