"""The Ably message budget: a token bucket per connection and per channel, and each
answer's share of the connection (`worker.transport.pool`), on a manual clock.

The pool's clients are real ably-python clients against the local Ably (never a fake
of the SDK); these tests never send, so they are made without connecting.
Coalescing in `ResponseStream` needs an Ably channel and is tested end to end.
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.unit.doubles import ManualClock
from worker.devstack.ably import LocalAbly
from worker.transport import pool as pool_module
from worker.transport.client import realtime_client
from worker.transport.pool import BURST, Budget, ConnectionPool

RATE = 44.0
WINDOW = 0.04


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """The pool module's monotonic clock, moved by the test."""
    manual = ManualClock(1000.0)
    monkeypatch.setattr(pool_module, "time", types.SimpleNamespace(monotonic=manual))
    return manual


@pytest.fixture
async def make_pool(local_ably: LocalAbly) -> AsyncIterator[Callable[..., ConnectionPool]]:
    pools: list[ConnectionPool] = []

    def make(concurrency: int, streams_per_connection: int) -> ConnectionPool:
        def client() -> Any:
            return realtime_client(
                local_ably.key, local_ably.endpoint, client_id="unit-pool", auto_connect=False
            )

        pool = ConnectionPool(
            client,
            concurrency=concurrency,
            streams_per_connection=streams_per_connection,
            messages_per_second=RATE,
            rollup_window_s=WINDOW,
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


# -- the token bucket --------------------------------------------------------------------


def test_budget_gives_the_burst_at_once_then_spaces_reservations(clock: ManualClock) -> None:
    budget = Budget(rate=10, burst=3)
    assert [budget.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    # Past the burst every message waits its turn, queued behind the one before.
    assert [budget.reserve() for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])


def test_budget_refills_at_its_rate_and_no_further_than_its_burst(clock: ManualClock) -> None:
    budget = Budget(rate=10, burst=3)
    for _ in range(5):
        budget.reserve()  # 2 reservations queued past the burst
    assert not budget.idle()
    clock.advance(0.2)  # the queue has drained, no token saved up
    assert budget.reserve() == pytest.approx(0.1)
    clock.advance(60)  # a minute idle saves up one burst, not 600 messages
    assert budget.idle()
    assert [budget.reserve() for _ in range(4)] == pytest.approx([0, 0, 0, 0.1])


def test_no_one_second_window_holds_more_than_ably_accepts(clock: ManualClock) -> None:
    """Send times from the reservations of a long burst: any one second holds at most
    rate + burst messages (44 + 5 < Ably's 50 a second on a connection)."""
    budget = Budget(RATE, BURST)
    sends = [clock() + budget.reserve() for _ in range(300)]
    most = max(sum(1 for t in sends if start <= t < start + 1) for start in sends)
    assert most <= RATE + BURST < 50


# -- the pool ----------------------------------------------------------------------------


async def test_pool_size_and_least_busy_connection(
    make_pool: Callable[..., ConnectionPool], clock: ManualClock
) -> None:
    pool = make_pool(concurrency=5, streams_per_connection=2)
    assert len(pool.clients) == 3  # ceil(5 / 2)
    leases = [pool.acquire(f"conv:{i}") for i in range(4)]
    assert [lease.slot for lease in leases] == [0, 1, 2, 0]
    assert leases[0].client is pool.clients[0] and leases[1].client is pool.clients[1]
    pool.release(leases[1])
    assert pool.acquire("conv:9").slot == 1  # the freed slot is the least busy again


async def test_interval_is_the_rollup_window_alone_and_shared_when_crowded(
    make_pool: Callable[..., ConnectionPool], clock: ManualClock
) -> None:
    pool = make_pool(concurrency=4, streams_per_connection=4)  # one connection
    alone = pool.acquire("conv:a")
    assert pool.interval_for(alone) == pytest.approx(WINDOW)  # 1/44 s is less than 40 ms
    others = [pool.acquire(f"conv:{i}") for i in range(3)]
    # Four answers on one connection: each gets a quarter of its 44 messages a second.
    assert alone.min_interval_s() == pytest.approx(4 / RATE)
    for lease in others:
        pool.release(lease)
    assert alone.min_interval_s() == pytest.approx(WINDOW)


async def test_answers_in_one_channel_share_it_across_connections(
    make_pool: Callable[..., ConnectionPool], clock: ManualClock
) -> None:
    """Ably's limit holds per channel over every connection: two answers in one
    conversation on two connections each get half of the channel's budget."""
    pool = make_pool(concurrency=6, streams_per_connection=2)  # three connections
    answers = [pool.acquire("conv:shared") for _ in range(3)]
    assert len({lease.slot for lease in answers}) == 3  # one per connection
    assert answers[0].min_interval_s() == pytest.approx(3 / RATE)
    # The channel's bucket is one for all: its burst spent by the first answer, the
    # second answer waits though its own connection has not sent anything.
    assert [answers[0].reserve() for _ in range(int(BURST))] == [0.0] * int(BURST)
    assert answers[1].reserve() == pytest.approx(1 / RATE)
    assert pool.budgets[answers[1].slot].tokens == BURST - 1  # its connection: one token
    # Another channel on the first connection: that connection's bucket is spent too.
    elsewhere = pool.acquire("conv:other")
    assert elsewhere.slot == 0
    assert elsewhere.reserve() == pytest.approx(1 / RATE)


async def test_a_released_channel_budget_is_forgotten_only_once_full_again(
    make_pool: Callable[..., ConnectionPool], clock: ManualClock
) -> None:
    pool = make_pool(concurrency=2, streams_per_connection=2)
    lease = pool.acquire("conv:brief")
    for _ in range(int(BURST) + 2):
        lease.reserve()
    pool.release(lease)
    # Still owed: a new answer on that channel right away must not get a fresh burst.
    assert "conv:brief" in pool.channel_budgets
    again = pool.acquire("conv:brief")
    assert again.reserve() > 0
    pool.release(again)
    assert "conv:brief" in pool.channel_budgets
    clock.advance(10)
    pool.release(pool.acquire("conv:brief"))
    assert "conv:brief" not in pool.channel_budgets


async def test_an_answer_goes_on_the_connection_its_channel_session_listens_on_while_it_has_room(
    make_pool: Callable[..., ConnectionPool],
) -> None:
    pool = make_pool(concurrency=8, streams_per_connection=2)  # four connections
    listener = pool.clients[2]
    first = pool.acquire("chat:a", prefer=listener)
    second = pool.acquire("chat:b", prefer=listener)
    assert first.client is listener and second.client is listener
    third = pool.acquire("chat:c", prefer=listener)  # full: the least busy one instead
    assert third.client is not listener
    assert pool.client_streaming("chat:a") is listener
    pool.release(first)
    assert pool.client_streaming("chat:a") is None  # no answer on it any more
    assert pool.acquire("chat:d", prefer=listener).client is listener  # room again


async def test_closing_the_pool_closes_the_clients_it_replaced_too(
    make_pool: Callable[..., ConnectionPool],
) -> None:
    """A recycled client waits `RETIRE_AFTER_S` to be closed; a pool closed before then
    (a drain, a test) closes it with the others, not leaving its connection open."""
    pool = make_pool(concurrency=6, streams_per_connection=3)
    replaced = pool.clients[1]
    replaced.connect()
    pool.recycle(1, replaced, "no acknowledgement")
    assert pool.clients[1] is not replaced
    await pool.close()
    assert replaced.connection.state == "closed"
