"""A job that can never run, through `JobRunner.run`: dead-lettered with its reason and,
when it names a valid channel, a message there closed `failed` with the same reason.
Doubles of our own seams only (`tests.unit.doubles`)."""

from __future__ import annotations

import json
from typing import Any

import redis.exceptions

from tests.unit.doubles import FakeModel, FakePublisher, FakeQueue, answer, make_job
from tests.unit.test_job_runner import run, the_one
from worker.job_runner import Outcome
from worker.queue import Delivery, JobState
from worker.transport.acks import AckTimeout
from worker.transport.contract import Status

REASON = "invalid job: input: 100001 characters, over JOB_MAX_INPUT_CHARS=100000"


def refused(job_id: str = "bad-1", attempt: int = 1, error: str = REASON) -> Delivery:
    return Delivery(entry_id="1-0", job_id=job_id, attempt=attempt, job=None, error=error)


def record(channel: str, payload: Any = None) -> dict[str, str]:
    """The job record the queue keeps: the channel a bad payload names, if valid."""
    body = payload if isinstance(payload, str) else json.dumps(payload or {"input": 5})
    return {"state": "running", "channel": channel, "payload": body}


async def refuse(
    queue: FakeQueue, publisher: FakePublisher, delivery: Delivery
) -> tuple[Outcome, list[dict[str, Any]], FakeModel]:
    model = FakeModel(*answer("never"))
    outcome, logs = await run(queue, model, publisher, delivery)
    return outcome, logs, model


async def test_a_bad_job_naming_a_valid_channel_tells_its_user_and_is_dead_lettered() -> None:
    queue, publisher = FakeQueue(), FakePublisher()
    queue.records["bad-1"] = record("conversation:42")
    delivery = refused()

    outcome, logs, model = await refuse(queue, publisher, delivery)

    assert outcome is Outcome.DEAD
    [(job, _)] = publisher.made
    assert (job.id, job.channel, job.metadata) == ("bad-1", "conversation:42", {})
    assert publisher.opened == [(None, False)]
    assert publisher.closed == [(Status.FAILED, REASON)]
    assert [(c.name, c.args) for c in queue.endings()] == [("dead_letter", (delivery, REASON))]
    assert model.streamed == []
    assert the_one(logs, "job.dead_lettered")["reason"] == REASON


async def test_a_bad_job_without_a_valid_channel_or_id_is_only_dead_lettered() -> None:
    for job_id, channel in (("bad-1", ""), ("bad-1", "a b"), ("bad 1", "conversation:42")):
        queue, publisher = FakeQueue(), FakePublisher()
        queue.records[job_id] = record(channel)

        outcome, _, _ = await refuse(queue, publisher, refused(job_id))

        assert outcome is Outcome.DEAD
        assert publisher.made == [] and publisher.closed == []
        assert [c.name for c in queue.endings()] == ["dead_letter"]


async def test_a_message_that_cannot_be_sent_does_not_keep_the_job_from_the_dead_letters() -> None:
    queue = FakeQueue()
    queue.records["bad-1"] = record("conversation:42")
    publisher = FakePublisher(open_raises=AckTimeout("the create was not acknowledged"))

    outcome, logs, _ = await refuse(queue, publisher, refused())

    assert outcome is Outcome.DEAD
    assert publisher.closed == []
    assert [c.name for c in queue.endings()] == ["dead_letter"]
    the_one(logs, "job.refusal_not_published")


async def test_redis_away_when_looking_up_the_channel_still_dead_letters() -> None:
    queue, publisher = FakeQueue(), FakePublisher()
    queue.fail_once["status"] = redis.exceptions.ConnectionError("Redis away")

    outcome, _, _ = await refuse(queue, publisher, refused())

    assert outcome is Outcome.DEAD and publisher.made == []


async def test_a_redelivered_bad_job_reopens_its_one_message() -> None:
    queue, publisher = FakeQueue(), FakePublisher()
    queue.records["bad-1"] = record("conversation:42")

    outcome, _, _ = await refuse(queue, publisher, refused(attempt=2))

    assert outcome is Outcome.DEAD
    assert publisher.opened == [(None, True)]  # found by its id, not created again
    assert publisher.closed == [(Status.FAILED, REASON)]


async def test_an_earlier_message_closed_under_its_id_is_left_alone() -> None:
    """A bad payload reusing the id of a job answered long ago: that answer stays."""
    queue, publisher = FakeQueue(), FakePublisher(finished=Status.COMPLETE)
    queue.records["bad-1"] = record("conversation:42")

    outcome, _, _ = await refuse(queue, publisher, refused(attempt=2))

    assert outcome is Outcome.DEAD
    assert publisher.closed == []
    assert [c.name for c in queue.endings()] == ["dead_letter"]


async def test_a_job_whose_workers_kept_dying_is_closed_failed_with_its_own_headers() -> None:
    job = make_job("poison-1", "conversation:42", metadata={"user": "u42"})
    queue, publisher = FakeQueue(), FakePublisher()
    queue.records["poison-1"] = record("conversation:42", job.to_json())
    reason = "gave up after 3 attempts whose workers stopped mid-job"

    outcome, _, _ = await refuse(queue, publisher, refused("poison-1", 4, reason))

    assert outcome is Outcome.DEAD
    assert publisher.made[0][0] == job  # the job itself: its metadata headers go out too
    assert publisher.closed == [(Status.FAILED, reason)]


async def test_a_job_whose_answer_was_closed_complete_before_its_worker_died_completes() -> None:
    job = make_job("poison-1", "conversation:42")
    queue, publisher = FakeQueue(), FakePublisher(finished=Status.COMPLETE)
    queue.records["poison-1"] = record("conversation:42", job.to_json())
    reason = "gave up after 3 attempts whose workers stopped mid-job"

    outcome, _, _ = await refuse(queue, publisher, refused("poison-1", 4, reason))

    assert outcome is Outcome.COMPLETED
    assert publisher.closed == []
    [complete] = queue.endings()
    assert complete.name == "complete" and complete.args[1] is JobState.COMPLETED
