"""Pacing: when each delta is due, and one sleep per batch of due deltas.

Due times are computed from the start (first token after `first_token_s`, then
`tokens_per_second`), so the rate stays exact however late a wake-up is. A stream
wakes at most once per `batch_interval_s` and sends everything due by then in one
write: at 1,000 tokens/s that is a handful of deltas per wake-up, not a sleep per token.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Sequence

from worker.devstack.openai_local.options import Pace


async def paced_batches(
    delta_tokens: Sequence[int], pace: Pace, batch_interval_s: float
) -> AsyncIterator[range]:
    """Yield ranges of delta indexes, each range when its last delta is due."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    before = [0, *itertools.accumulate(delta_tokens)]
    total = len(delta_tokens)
    index = 0
    last_wake = -math.inf

    def due(i: int) -> float:
        if math.isinf(pace.tokens_per_second):
            return start + pace.first_token_s
        return start + pace.first_token_s + before[i] / pace.tokens_per_second

    while index < total:
        wake = max(due(index), last_wake + batch_interval_s)
        now = loop.time()
        if wake > now:
            await asyncio.sleep(wake - now)
            now = loop.time()
        last_wake = now
        end = index + 1
        while end < total and due(end) <= now:
            end += 1
        yield range(index, end)
        index = end
