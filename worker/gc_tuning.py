"""The garbage collector, tuned for a process that streams: the worker, and the local
servers and benchmark subscribers that stand beside it.

Everything made at the start (modules, clients, connections) lives for good: frozen, the
full collections never walk it again. And young collections come less often: streams
make many short-lived objects that reference counting frees anyway. Untuned, a process
carrying a few hundred streams pauses 80 to 440 ms in a full collection every few seconds
(measured in the fault proxy, the local model server and a benchmark subscriber at 160
answers): every stream through it stalls that long.
"""

from __future__ import annotations

import gc

THRESHOLD = 50_000  # allocations between young collections (Python's default: 700)


def tune() -> None:
    """Call once the process has made what it keeps (its clients, its listening socket)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(THRESHOLD, *gc.get_threshold()[1:])
