"""`acks.InFlight`: the un-awaited appends of one answer."""

from __future__ import annotations

import asyncio

from worker.transport.acks import AckTimeout, InFlight


async def _ok() -> str:
    await asyncio.sleep(0)
    return "acked"


async def _refused() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("nack")


async def _never() -> None:
    await asyncio.Event().wait()


async def test_a_long_answer_holds_only_the_sends_still_in_flight() -> None:
    sends = InFlight()
    for _ in range(500):
        sends.add(_ok())
    await asyncio.sleep(0.01)
    assert len(sends) == 0  # every acknowledged send forgotten, not kept to the close
    assert await sends.settle() == []


async def test_settle_returns_each_failure_once_and_times_out_the_unanswered() -> None:
    stalled: list[bool] = []
    sends = InFlight()
    sends.add(_refused())
    await asyncio.sleep(0.01)  # done before the settle
    sends.add(_refused())  # done during it
    never = sends.add(_never())
    failures = await sends.settle(timeout_s=0.05, on_timeout=lambda: stalled.append(True))
    assert sorted(type(f).__name__ for f in failures) == [
        "AckTimeout",
        "RuntimeError",
        "RuntimeError",
    ]
    assert any(isinstance(f, AckTimeout) for f in failures)
    assert stalled == [True]
    await asyncio.sleep(0)
    assert never.cancelled()
    assert await sends.settle() == []  # reported once


async def test_cancel_stops_every_send_and_reports_nothing() -> None:
    sends = InFlight()
    tasks = [sends.add(_never()) for _ in range(3)]
    sends.cancel()
    await asyncio.sleep(0)
    assert all(t.cancelled() for t in tasks)
    assert await sends.settle() == []
