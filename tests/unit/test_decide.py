"""`decide()`: every way an attempt can end, on the first and the last attempt, retryable
or not, and the status the channel message is closed with for each outcome."""

from __future__ import annotations

import typing

import pytest

from worker.job_runner import (
    CLOSING_STATUS,
    EVENTS,
    Answered,
    Ending,
    Failure,
    Fenced,
    FoundFinished,
    Outcome,
    Stopped,
    StopReason,
    decide,
)
from worker.transport.contract import Status

MAX_ATTEMPTS = 3
FIRST, LAST = 1, MAX_ATTEMPTS


def _endings(retryable: bool) -> list[tuple[Ending, Outcome, Outcome]]:
    """(ending, outcome on the first attempt, outcome on the last attempt)."""
    return [
        (Answered(), Outcome.COMPLETED, Outcome.COMPLETED),
        (Answered("max_output_tokens"), Outcome.COMPLETED, Outcome.COMPLETED),
        (
            Failure("model failed: boom", retryable),
            Outcome.RETRY if retryable else Outcome.DEAD,
            Outcome.DEAD,
        ),
        (Stopped(StopReason.USER_CANCEL), Outcome.CANCELLED, Outcome.CANCELLED),
        (Stopped(StopReason.SHUTDOWN), Outcome.INTERRUPTED, Outcome.INTERRUPTED),
        (Stopped(StopReason.HEARTBEAT_LOST), Outcome.ABANDONED, Outcome.ABANDONED),
        (FoundFinished(Status.COMPLETE), Outcome.COMPLETED, Outcome.COMPLETED),
        (FoundFinished(Status.CANCELLED), Outcome.CANCELLED, Outcome.CANCELLED),
        (Fenced("close"), Outcome.ABANDONED, Outcome.ABANDONED),
    ]


MATRIX = [
    pytest.param(ending, attempt, expected, id=f"{ending!r}-attempt{attempt}-retryable={retryable}")
    for retryable in (True, False)
    for ending, on_first, on_last in _endings(retryable)
    for attempt, expected in ((FIRST, on_first), (LAST, on_last))
]


@pytest.mark.parametrize(("ending", "attempt", "expected"), MATRIX)
def test_decide_matrix(ending: Ending, attempt: int, expected: Outcome) -> None:
    assert decide(ending, attempt, MAX_ATTEMPTS) is expected


def test_the_matrix_covers_every_ending_kind_and_stop_reason() -> None:
    """A new kind of ending (or stop reason) must get a row above, not a silent default."""
    kinds = {type(e) for e, _, _ in _endings(True)}
    assert kinds == set(typing.get_args(Ending))
    reasons = {e.reason for e, _, _ in _endings(True) if isinstance(e, Stopped)}
    assert reasons == set(StopReason)


def test_retryable_failure_in_the_middle_retries_and_past_the_last_is_dead() -> None:
    failure = Failure("model failed: boom", retryable=True)
    assert decide(failure, 2, MAX_ATTEMPTS) is Outcome.RETRY
    # A delivery counted past max_attempts (its earlier workers died mid-job) is dead.
    assert decide(failure, MAX_ATTEMPTS + 1, MAX_ATTEMPTS) is Outcome.DEAD
    # With a single attempt allowed, the first is the last.
    assert decide(failure, 1, 1) is Outcome.DEAD


def test_closing_status_per_outcome() -> None:
    """What a subscriber sees at the end: a retry's message says `interrupted` (the retry
    reopens it), never `failed`; only a dead job's says `failed`."""
    assert CLOSING_STATUS == {
        Outcome.COMPLETED: Status.COMPLETE,
        Outcome.CANCELLED: Status.CANCELLED,
        Outcome.RETRY: Status.INTERRUPTED,
        Outcome.DEAD: Status.FAILED,
        Outcome.INTERRUPTED: Status.INTERRUPTED,
    }
    assert Outcome.ABANDONED not in CLOSING_STATUS  # an abandoned job's message is not ours
    assert set(EVENTS) == set(Outcome)
