"""`ProcessLease` on a manual clock: when this process may still touch its jobs."""

from __future__ import annotations

import pytest

from tests.unit.doubles import ManualClock
from worker.lease import ProcessLease


def test_no_lease_before_the_first_renewal() -> None:
    lease = ProcessLease(10, clock=ManualClock(100.0))
    assert not lease.valid()
    assert lease.remaining_s() == -float("inf")


def test_valid_after_a_renewal_until_ttl_minus_margin() -> None:
    clock = ManualClock(100.0)
    lease = ProcessLease(10, clock=clock)  # margin: min(1 s, 20 % of the ttl) = 1 s
    lease.renewed(100.0)
    assert lease.valid()
    assert lease.remaining_s() == pytest.approx(9.0)
    clock.advance(8.9)
    assert lease.valid()
    assert lease.remaining_s() == pytest.approx(0.1)
    clock.advance(0.1)  # 109: the key lives until 110, but the lease ends a margin early
    assert not lease.valid()
    assert lease.remaining_s() == pytest.approx(0.0)
    clock.advance(5)
    assert not lease.valid()
    assert lease.remaining_s() == pytest.approx(-5.0)


def test_margin_is_a_fifth_of_a_short_ttl_and_can_be_set() -> None:
    clock = ManualClock()
    short = ProcessLease(2, clock=clock)
    short.renewed(0.0)
    assert short.remaining_s() == pytest.approx(1.6)
    exact = ProcessLease(2, clock=clock, margin_s=0)
    exact.renewed(0.0)
    assert exact.remaining_s() == pytest.approx(2.0)


def test_a_renewal_sent_before_the_lapse_does_not_revive_a_lease_the_clock_has_passed() -> None:
    """A renewal counts from when it was sent, not when its answer came back: a heartbeat
    sent at 105 that hung until 120 proves the key lived until 115 at most."""
    clock = ManualClock(100.0)
    lease = ProcessLease(10, clock=clock)
    lease.renewed(100.0)
    clock.advance(20)  # 120: lapsed at 109
    lease.renewed(105.0)  # sent before the lapse, succeeded only now
    assert not lease.valid()
    assert lease.remaining_s() == pytest.approx(-6.0)  # 105 + 10 - 1 - 120


def test_an_older_renewal_never_moves_the_lease_back() -> None:
    clock = ManualClock(100.0)
    lease = ProcessLease(10, clock=clock)
    lease.renewed(104.0)
    lease.renewed(101.0)  # an earlier heartbeat whose answer came late
    clock.advance(12)  # 112 < 104 + 9
    assert lease.valid()
    assert lease.remaining_s() == pytest.approx(1.0)


def test_a_renewal_after_the_lapse_restores_the_lease() -> None:
    clock = ManualClock(100.0)
    lease = ProcessLease(10, clock=clock)
    lease.renewed(100.0)
    clock.advance(20)
    assert not lease.valid()
    lease.renewed(clock())
    assert lease.valid()
