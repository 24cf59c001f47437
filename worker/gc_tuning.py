"""The garbage collector, tuned for a process that streams: the worker, and the local
model server and fault proxy that stand beside it in development and the benchmarks.

Everything made at the start (modules, clients, connections) lives for good: frozen, the
full collections never walk it again. And young collections come less often: streams
make many short-lived objects that reference counting frees anyway. Untuned, the fault
proxy and the local model server paused 80 and 110 ms in full collections while 160
answers streamed through them, and every one of those streams stalled that long.
"""

from __future__ import annotations

import gc
import time
from typing import Any

THRESHOLD = 50_000  # allocations between young collections (Python's default: 700)


class Pauses:
    """The collector's pauses since the last `take()`, for the `worker.stats` line: every
    stream in the process stands still while one lasts."""

    def __init__(self) -> None:
        self._began = 0.0
        self._reset()

    def _reset(self) -> None:
        self.count, self.longest_s, self.total_s = 0, 0.0, 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        pause = time.perf_counter() - self._began
        self.count += 1
        self.total_s += pause
        self.longest_s = max(self.longest_s, pause)

    def take(self) -> dict[str, float | int]:
        figures = {"gc_collections": self.count, "gc_pause_max_ms": round(self.longest_s * 1000, 1),
                   "gc_pause_ms": round(self.total_s * 1000, 1)}  # fmt: skip
        self._reset()
        return figures


PAUSES = Pauses()


def tune() -> None:
    """Call once the process has made what it keeps (its clients, its listening socket)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(THRESHOLD, *gc.get_threshold()[1:])
    if PAUSES not in gc.callbacks:
        gc.callbacks.append(PAUSES)
