"""This process's lease on the jobs it holds: valid while its heartbeat key surely lives.

The heartbeat key is set with a TTL; once it has expired another worker may reclaim our
jobs. The lease is counted from when a successful renewal was *sent* (the key's TTL
started no earlier), less a safety margin, on the monotonic clock, which a frozen
process (SIGSTOP, a long GC pause, a hung Redis call) cannot fool: when it runs again,
the lease reads as lapsed before any of its jobs can send.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class ProcessLease:
    def __init__(
        self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic, margin_s: float = -1
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        # A lease ends a little before the key's TTL does: time for a stop to take effect.
        self.margin_s = margin_s if margin_s >= 0 else min(1.0, ttl_s * 0.2)
        self.renewed_at: float | None = None

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at `sent_at` (this lease's clock) succeeded."""
        if self.renewed_at is None or sent_at > self.renewed_at:
            self.renewed_at = sent_at

    def deadline(self) -> float:
        if self.renewed_at is None:
            return -float("inf")
        return self.renewed_at + self.ttl_s - self.margin_s

    def valid(self) -> bool:
        return self.clock() < self.deadline()

    def remaining_s(self) -> float:
        return self.deadline() - self.clock()
