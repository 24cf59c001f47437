"""`worker doctor` as an operator runs it: its own process, the environment they would
set, the real local services (redis-server, Sockudo, the local OpenAI server).

A reduced-capability key comes from the local Ably's configuration (`LocalAbly`'s
`extra_keys`): Sockudo issues its tokens with that key's capability, as Ably does.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.worker_harness import Stack
from worker.devstack.ably import LocalAbly
from worker.devstack.openai_local import OpenAILocalServer
from worker.devstack.redis_server import LocalRedis
from worker.doctor import (
    capability_table,
    missing_permissions,
    resource_covers,
    worker_capability,
    worker_permissions,
)
from worker.redis_client import connect_redis

pytestmark = pytest.mark.timeout(90)

CHECKS = ["redis", "ably", "capability", "model"]
# Keys of the local Ably's app ("dev", as DEFAULT_KEY), each limited to a capability.
REDUCED_KEY = "dev.reduced:reduced-secret"
REDUCED_CAPABILITY = {
    "chat:*": ["publish", "subscribe", "history", "message-update-own"],
    "elsewhere": ["presence"],
}
LEAST_KEY = "dev.least:least-secret"  # exactly what the worker needs on chat:* and agents
LEAST_CAPABILITY = worker_capability("chat:*", "agents")


@pytest.fixture(scope="module")
async def limited_ably() -> AsyncIterator[LocalAbly]:
    """A local Ably whose extra keys carry reduced capabilities."""
    keys = {REDUCED_KEY: REDUCED_CAPABILITY, LEAST_KEY: LEAST_CAPABILITY}
    async with LocalAbly(extra_keys=keys) as server:
        yield server


@dataclass
class Report:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"

    @property
    def lines(self) -> dict[str, tuple[str, str]]:
        """check name -> (ok | FAIL, the rest of its line); one line per check, in order."""
        parsed = {}
        for line in self.out.splitlines():
            status, name, detail = line.split(maxsplit=2)
            parsed[name] = (status, detail)
        assert list(parsed) == CHECKS and len(self.out.splitlines()) == 4, str(self)
        return parsed

    def failed(self) -> set[str]:
        return {name for name, (status, _) in self.lines.items() if status == "FAIL"}

    def missing(self) -> set[tuple[str, str, int]]:
        """(operation, resource, Ably error code) the capability line names as missing."""
        found = re.findall(r'(\S+) on "([^"]+)" \(Ably error (\d+)', self.lines["capability"][1])
        return {(op, resource, int(code)) for op, resource, code in found}


async def doctor(env: dict[str, str], *args: str) -> Report:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "doctor", *args, env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode is not None
    return Report(proc.returncode, out.decode(), err.decode())


def with_key(stack: Stack, ably: LocalAbly, key: str, **settings: str) -> dict[str, str]:
    return {**stack.env(ably_endpoint=ably.endpoint, **settings), "ABLY_API_KEY": key}


# -- everything in order -----------------------------------------------------------------


async def test_all_checks_pass_against_the_local_stack(stack: Stack) -> None:
    ran = await doctor(stack.env())

    assert ran.code == 0, str(ran)
    assert ran.failed() == set(), str(ran)
    lines = ran.lines
    assert stack.redis.url in lines["redis"][1] and "writable" in lines["redis"][1]
    assert "noeviction" in lines["redis"][1]
    assert "dev.local" in lines["ably"][1]  # the key by its name, never its secret
    # The dev key may do anything: enough, and said to be more than needed.
    assert "more than it needs" in lines["capability"][1]
    assert "'local'" in lines["model"][1]
    assert "devsecret" not in ran.out + ran.err


async def test_no_redis_scratch_key_is_left_behind(stack: Stack) -> None:
    assert (await doctor(stack.env())).code == 0
    redis = connect_redis(stack.redis.url)
    try:
        assert await redis.keys(f"{stack.prefix}:*") == []
    finally:
        await redis.aclose()


# -- the Ably key's capability ---------------------------------------------------------------


async def test_a_reduced_key_is_named_with_exactly_what_it_lacks(
    stack: Stack, limited_ably: LocalAbly
) -> None:
    presence = f"agents:{stack.prefix}"  # the stack's PRESENCE_CHANNEL
    in_chat, everywhere = await asyncio.gather(
        doctor(with_key(stack, limited_ably, REDUCED_KEY), "--channels", "chat:*"),
        doctor(with_key(stack, limited_ably, REDUCED_KEY)),  # --channels '*': all channels
    )

    assert in_chat.code == 1 and in_chat.failed() == {"capability"}, str(in_chat)
    assert in_chat.missing() == {
        ("message-update-any", "chat:*", 40160),  # it has -own: not enough, and said why
        ("presence", presence, 40160),
    }, str(in_chat)
    line = in_chat.lines["capability"][1]
    assert "dev.reduced" in line and "message-update-own is not enough" in line
    assert "reduced-secret" not in in_chat.out + in_chat.err

    # `chat:*` does not cover every channel: on `*` it lacks every conversation operation.
    assert everywhere.code == 1 and everywhere.failed() == {"capability"}, str(everywhere)
    assert everywhere.missing() == {
        *((op, "*", 40160) for op in ("publish", "subscribe", "history", "message-update-any")),
        ("presence", presence, 40160),
    }, str(everywhere)


async def test_the_least_privilege_key_passes_and_listen_channels_count(
    stack: Stack, limited_ably: LocalAbly
) -> None:
    exact, listening = await asyncio.gather(
        doctor(with_key(stack, limited_ably, LEAST_KEY, presence_channel="agents"),
               "--channels", "chat:*"),
        doctor(with_key(stack, limited_ably, LEAST_KEY, presence_channel="agents",
                        listen_channels="chat:lobby,support:desk"), "--channels", "chat:*"),
    )  # fmt: skip

    assert exact.code == 0, str(exact)
    assert "more than it needs" not in exact.lines["capability"][1]  # exactly the set
    # A listened channel outside `chat:*` needs the conversation operations too.
    assert listening.code == 1 and listening.failed() == {"capability"}, str(listening)
    assert listening.missing() == {
        (op, "support:desk", 40160)
        for op in ("publish", "subscribe", "history", "message-update-any")
    }, str(listening)


async def test_a_refused_or_unreachable_ably_fails_both_ably_lines(stack: Stack) -> None:
    wrong = f"{stack.ably.key.split(':')[0]}:wrong-secret"
    refused, unreachable = await asyncio.gather(
        doctor({**stack.env(), "ABLY_API_KEY": wrong}),
        doctor(stack.env(ably_endpoint="http://127.0.0.1:1")),  # nothing listens
    )
    for ran, said in ((refused, "refused key dev.local"), (unreachable, "cannot reach")):
        assert ran.code == 1 and ran.failed() == {"ably", "capability"}, str(ran)
        assert said in ran.lines["ably"][1], str(ran)
        assert "not checked" in ran.lines["capability"][1], str(ran)
    assert "ABLY_API_KEY" in refused.lines["ably"][1]
    assert "ABLY_ENDPOINT" in unreachable.lines["ably"][1]
    assert "wrong-secret" not in refused.out + refused.err


# -- Redis ---------------------------------------------------------------------------------------


async def test_redis_failures_are_one_clear_line_never_with_the_password(stack: Stack) -> None:
    unreachable = "redis://:hunter2-secret@127.0.0.1:1/0"  # nothing listens on port 1
    async with LocalRedis(tls=True, password="right-password-1") as hosted:  # as Heroku's
        wrong_password = hosted.url.replace("right-password-1", "hunter2-secret")
        down, refused, fine = await asyncio.gather(
            doctor(stack.env(redis_url=unreachable)),
            doctor(stack.env(redis_url=wrong_password)),
            doctor(stack.env(redis_url=hosted.url)),
        )

    expected = [
        (down, "cannot reach Redis at redis://:***@127.0.0.1:1/0"),
        (refused, "refused the credentials"),
    ]
    for ran, said in expected:
        assert ran.code == 1 and ran.failed() == {"redis"}, str(ran)
        line = ran.lines["redis"][1]
        assert said in line and "REDIS_URL" in line, str(ran)
    assert "rediss://:***@127.0.0.1:" in refused.lines["redis"][1], str(refused)
    assert fine.code == 0, str(fine)
    assert fine.lines["redis"][1].startswith("rediss://:***@127.0.0.1:"), str(fine)
    for ran in (down, refused, fine):
        assert "hunter2-secret" not in ran.out + ran.err, str(ran)
        assert "right-password-1" not in ran.out + ran.err, str(ran)


async def test_a_redis_that_would_evict_jobs_fails(stack: Stack) -> None:
    async with LocalRedis() as evicting:
        redis = connect_redis(evicting.url)
        try:
            await redis.config_set("maxmemory-policy", "allkeys-lru")
        finally:
            await redis.aclose()
        ran = await doctor(stack.env(redis_url=evicting.url))

    assert ran.code == 1 and ran.failed() == {"redis"}, str(ran)
    line = ran.lines["redis"][1]
    assert "allkeys-lru" in line and "maxmemory-policy noeviction" in line, str(ran)


# -- the model endpoint ------------------------------------------------------------------------


async def test_a_wrong_key_an_unreachable_endpoint_or_an_unknown_model_fails(
    stack: Stack,
) -> None:
    async with OpenAILocalServer(api_key="sk-right-key", tokens_per_second=0) as keyed:
        wrong_key, unreachable, unknown = await asyncio.gather(
            doctor({**stack.env(openai_base_url=keyed.base_url),
                    "OPENAI_API_KEY": "sk-wrong-key-123"}),
            doctor(stack.env(openai_base_url="http://127.0.0.1:1/v1")),
            doctor(stack.env(openai_model="gpt-nope")),
        )  # fmt: skip

    expected = [
        (wrong_key, ("refused OPENAI_API_KEY", "401")),
        (unreachable, ("cannot reach http://127.0.0.1:1/v1", "OPENAI_BASE_URL")),
        (unknown, ("does not list OPENAI_MODEL 'gpt-nope'", "local")),
    ]
    for ran, words in expected:
        assert ran.code == 1 and ran.failed() == {"model"}, str(ran)
        assert all(word in ran.lines["model"][1] for word in words), str(ran)
    assert "sk-wrong-key-123" not in wrong_key.out + wrong_key.err


# -- settings --------------------------------------------------------------------------------


async def test_a_bad_setting_or_option_exits_2_with_one_line(stack: Stack) -> None:
    no_key = stack.env()
    no_key.pop("OPENAI_API_KEY")
    unset, bad_url, bad_option = await asyncio.gather(
        doctor(no_key),
        doctor({**stack.env(), "REDIS_URL": "http://secret@x"}),
        doctor(stack.env(), "--channels", "a, b"),
    )
    for ran, named in (
        (unset, "OPENAI_API_KEY"),
        (bad_url, "REDIS_URL"),
        (bad_option, "--channels"),
    ):
        assert ran.code == 2 and ran.out == "", str(ran)
        assert ran.err.startswith("error: ") and named in ran.err, str(ran)
        assert len(ran.err.strip().splitlines()) == 1, str(ran)
    assert "secret@x" not in bad_url.err


# -- the capability, as code -------------------------------------------------------------------


def test_the_least_privilege_capability() -> None:
    assert worker_capability() == {
        "*": ["history", "message-update-any", "publish", "subscribe"],
        "agents": ["presence"],
    }
    assert worker_capability("conversation:*", "workers") == {
        "conversation:*": ["history", "message-update-any", "publish", "subscribe"],
        "workers": ["presence"],
    }
    # Ably has no append operation: appends take the update capability.
    assert not any("append" in p.operation for p in worker_permissions())


@pytest.mark.parametrize(
    ("pattern", "resource", "covers"),
    [
        ("*", "*", True),
        ("*", "chat:room", True),
        ("*", "chat:*", True),
        ("chat:*", "chat:*", True),
        ("chat:*", "chat:room", True),
        ("chat:*", "*", False),
        ("chat:*", "chatter", False),
        ("chat:room", "chat:*", False),
        ("agents", "agents", True),
        ("agents", "agents:x", False),
        ("[*]*", "*", True),
        ("*", "[?rewind=1]chat", False),
    ],
)
def test_which_resource_patterns_cover_which(pattern: str, resource: str, covers: bool) -> None:
    assert resource_covers(pattern, resource) is covers


def test_missing_permissions_reads_wildcards_and_unions() -> None:
    needed = worker_permissions("chat:*", "agents")
    assert missing_permissions({"*": ["*"]}, needed) == []
    assert missing_permissions(LEAST_CAPABILITY, needed) == []
    # Operations granted through several matching resources add up.
    split = {"*": ["publish", "subscribe"], "chat:*": ["history", "message-update-any"],
             "agents": ["presence"]}  # fmt: skip
    assert missing_permissions(split, needed) == []
    assert [(p.operation, p.resource) for p in missing_permissions({}, needed)] == [
        (p.operation, p.resource) for p in needed
    ]


def test_the_readme_table_is_the_codes() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    if "message-update-any" not in readme:
        pytest.skip("the README has no capability table for the worker's key yet")
    assert capability_table() in readme
