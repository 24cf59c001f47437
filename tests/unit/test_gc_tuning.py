"""The collector's pauses, as the `worker.stats` line reports them (`gc_tuning.Pauses`)."""

from __future__ import annotations

import gc

from worker.gc_tuning import Pauses


def test_pauses_are_counted_and_timed_since_the_last_take() -> None:
    pauses = Pauses()
    gc.callbacks.append(pauses)
    try:
        pauses.take()
        gc.collect()
        gc.collect(0)
        figures = pauses.take()
        assert figures["gc_collections"] >= 2
        assert figures["gc_pause_ms"] >= figures["gc_pause_max_ms"] > 0
        assert pauses.take() == {"gc_collections": 0, "gc_pause_max_ms": 0.0, "gc_pause_ms": 0.0}
    finally:
        gc.callbacks.remove(pauses)
