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

THRESHOLD = 50_000  # allocations between young collections (Python's default: 700)


def tune() -> None:
    """Call once the process has made what it keeps (its clients, its listening socket)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(THRESHOLD, *gc.get_threshold()[1:])
