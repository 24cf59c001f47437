"""The chaos soak (tests/chaos_soak.py) with 60 jobs, and its checks shown to catch faults.

`CHAOS_SOAK_SEED=N` replays one fault schedule; the seed is printed either way.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from pathlib import Path
from typing import Any

import pytest
from ably.types.message import Message

from tests.chaos_soak import (
    SoakAbly,
    SoakJob,
    check_answers,
    read_history,
    read_versions,
    run_soak,
)
from worker.jobs import Job
from worker.transport.client import realtime_client, rest_client


@pytest.mark.timeout(300)
async def test_every_job_ends_exactly_once_under_chaos(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SOAK_SEED") or random.randrange(1, 1_000_000))
    print(f"chaos soak seed {seed}")
    report = await run_soak(60, seed, log_dir=tmp_path / "worker-logs", progress=print)
    print(report.render())
    assert report.ok, report.render()
    assert len(report.kills) >= 5 and any(k.quick for k in report.kills), report.render()
    assert len(report.stops) == 1 and len(report.redis_restarts) == 1, report.render()
    assert len(report.sigterms) == 1, report.render()


async def _answer(
    channel: Any,
    job: SoakJob,
    text: str,
    status: str = "complete",
    *,
    id_suffix: str = "",
    then: str = "",
    appends: int = 2,
) -> None:
    """Stream `text` as the worker does (create, `appends` appends, closing update); `then`
    is a stale worker's append and second close after that."""

    def extras(state: str) -> dict[str, Any]:
        return {"headers": {"responseId": job.id, "status": state}}

    create = Message(name="response", id=f"{job.id}:response{id_suffix}", data="",
                     extras=extras("streaming"))  # fmt: skip
    serial = (await channel.publish(create)).serials[0]
    cuts = [len(text) * n // appends for n in range(appends + 1)]
    for part in (text[a:b] for a, b in itertools.pairwise(cuts) if b > a):
        await channel.append_message(
            Message(name="response", serial=serial, data=part, extras=extras("streaming"))
        )
    await channel.update_message(
        Message(name="response", serial=serial, data=text, extras=extras(status))
    )
    if then:
        await channel.append_message(
            Message(name="response", serial=serial, data=then, extras=extras("streaming"))
        )
        await channel.update_message(
            Message(name="response", serial=serial, data=text, extras=extras("complete"))
        )


def _job(job_id: str, channel: str, prompt: str) -> SoakJob:
    return SoakJob(Job(id=job_id, channel=channel, input=prompt), prompt, 200)


async def test_the_checks_catch_duplicates_stale_writes_wrong_text_and_open_answers(
    channel_name: str,
) -> None:
    """On the soak's own Sockudo: the stale write comes after 150 appends, past the 100
    versions Sockudo returns by default, so only a complete read of the versions sees it."""
    names = ("good", "twice", "stale", "short", "open", "missing")
    jobs = {name: _job(f"{channel_name}-{name}", channel_name, f"check {name}") for name in names}
    async with SoakAbly() as ably:
        client = realtime_client(ably.key, ably.endpoint)
        rest = rest_client(ably.key, ably.endpoint)
        try:
            channel = client.channels.get(channel_name)
            await channel.attach()
            await _answer(channel, jobs["good"], jobs["good"].expected)
            await _answer(channel, jobs["twice"], jobs["twice"].expected)
            await _answer(channel, jobs["twice"], jobs["twice"].expected, id_suffix="-again")
            stale = jobs["stale"]
            await _answer(channel, stale, stale.expected, appends=150, then=" stale")
            await _answer(channel, jobs["short"], jobs["short"].expected[:-8])
            await _answer(channel, jobs["open"], jobs["open"].expected[:20], status="interrupted")
            await asyncio.sleep(0.3)
            history = {channel_name: await read_history(rest, channel_name)}
            versions = {m.serial: await read_versions(rest, channel_name, m.serial)
                        for m in history[channel_name]}  # fmt: skip
        finally:
            await client.close()
            await rest.close()
    found: dict[str, list[str]] = {}
    for violation in check_answers(list(jobs.values()), history, versions):
        found.setdefault(violation.job_id.rsplit("-", 1)[-1], []).append(violation.what)

    assert "good" not in found, found
    assert found["twice"] == ["2 response messages"]
    assert found["stale"] == ["2 writes after it was closed 'complete' (2 complete closes)"]
    assert found["short"] == ["text differs from the answer"]
    assert found["open"] == [
        "message closed 'interrupted', not 'complete'",
        "text differs from the answer",
    ]
    assert found["missing"] == ["no response message"]
