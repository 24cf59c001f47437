"""`worker doctor`: the worker's own credentials and services, checked live.

    uv run worker doctor [--channels 'conversation:*']

One line per check, `ok` or `FAIL` with what is wrong and the fix; the exit status is 0
only when every check passes:

- redis: `REDIS_URL` reachable and writable (SET, GET and DEL of a scratch key with a
  short TTL under `QUEUE_PREFIX`), and its `maxmemory-policy` evicts nothing;
- ably: the endpoint answers and accepts `ABLY_API_KEY` (a token request);
- capability: that token's capability (the key's, read without side effects) against
  the least-privilege set the worker needs (`worker_permissions`), each missing
  operation named with the Ably error code the worker would meet;
- model: `GET /models` at the model endpoint answers, and lists `OPENAI_MODEL`.

No secret is ever printed (`worker.redaction`): a Redis password shows as `***`, the
Ably key by its name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.redaction import redact, redact_url, register_secrets, secrets_of
from worker.settings import Settings

CHECK_TIMEOUT_S = 10.0
REDIS_RETRIES = 2  # an answer within a second, not the worker's patient backoff
SCRATCH_TTL_S = 30
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"
CAPABILITY_DENIED = 40160  # Ably: the key or token lacks the capability for the operation


# -- the least-privilege capability --------------------------------------------------------


@dataclass(frozen=True)
class Permission:
    """One Ably operation the worker performs on one channel resource."""

    resource: str  # a channel name or pattern: "*", "conversation:*", "agents"
    operation: str  # Ably's capability operation name
    when: str  # what the worker does with it: "the worker {when}"
    error: int = CAPABILITY_DENIED  # what the worker meets without it


# On conversation channels: every channel a job names, and LISTEN_CHANNELS. Appends need
# the update capability (Ably has no append operation), and `-any`, not `-own`: a job
# reclaimed from a dead worker reopens and appends to a message another clientId created.
CONVERSATION_OPERATIONS: tuple[tuple[str, str], ...] = (
    ("publish", "creates an answer's message, or a message-per-token message"),
    ("subscribe", "listens for users' prompts and cancels"),
    ("history", "resumes a session or looks up an answer's message"),
    (
        "message-update-any",
        "appends to, closes or reopens an answer, even one another worker began",
    ),
)
# On PRESENCE_CHANNEL.
PRESENCE_OPERATIONS: tuple[tuple[str, str], ...] = (
    ("presence", "enters, updates or leaves presence"),
)


def worker_permissions(
    conversations: str | Sequence[str] = "*", presence_channel: str = "agents"
) -> list[Permission]:
    """Every operation the worker needs, on the conversation resource(s) (a namespace
    such as `conversation:*`, or `*` for all channels) and the presence channel."""
    resources = [conversations] if isinstance(conversations, str) else list(conversations)
    needed = [
        Permission(resource, operation, when)
        for resource in dict.fromkeys(resources)
        for operation, when in CONVERSATION_OPERATIONS
    ]
    needed += [Permission(presence_channel, op, when) for op, when in PRESENCE_OPERATIONS]
    return needed


def worker_capability(
    conversations: str | Sequence[str] = "*", presence_channel: str = "agents"
) -> dict[str, list[str]]:
    """The least-privilege capability for the worker's key, as Ably's JSON takes it."""
    capability: dict[str, set[str]] = {}
    for permission in worker_permissions(conversations, presence_channel):
        capability.setdefault(permission.resource, set()).add(permission.operation)
    return {resource: sorted(ops) for resource, ops in capability.items()}


def capability_table() -> str:
    """The README's table of the worker key's capability, from the same definition."""
    where = {"CONVERSATIONS": "conversation channels", "PRESENCE_CHANNEL": "`PRESENCE_CHANNEL`"}
    rows = [
        "| channels | operation | the worker needs it when it | missing, the worker gets |",
        "| --- | --- | --- | --- |",
    ]
    for p in worker_permissions("CONVERSATIONS", "PRESENCE_CHANNEL"):
        rows.append(f"| {where[p.resource]} | `{p.operation}` | {p.when} | `{p.error}` |")
    return "\n".join(rows)


def resource_covers(pattern: str, resource: str) -> bool:
    """Whether a capability resource `pattern` covers every channel `resource` names.

    Ably's wildcard is a trailing `*`: `*` is every channel, `chat:*` every channel of
    the `chat` namespace (so it covers `chat:room` and `chat:*`, never `*`)."""
    if pattern == "[*]*":  # every channel, qualified or not
        return True
    if pattern == resource:
        return True
    if resource.startswith("["):  # a qualified resource: only named exactly, or [*]*
        return False
    return pattern.endswith("*") and resource.startswith(pattern[:-1])


def granted_operations(capability: Mapping[str, Iterable[str]], resource: str) -> set[str]:
    """The operations a capability grants on every channel `resource` names."""
    granted: set[str] = set()
    for pattern, operations in capability.items():
        if resource_covers(pattern, resource):
            granted.update(operations)
    return granted


def missing_permissions(
    capability: Mapping[str, Iterable[str]], needed: Iterable[Permission]
) -> list[Permission]:
    """What `needed` asks that `capability` does not grant (`*` grants every operation)."""
    missing = []
    for permission in needed:
        granted = granted_operations(capability, permission.resource)
        if "*" not in granted and permission.operation not in granted:
            missing.append(permission)
    return missing


def wider_than(
    capability: Mapping[str, Iterable[str]], needed: Iterable[Permission]
) -> dict[str, list[str]]:
    """What `capability` grants beyond `needed`, resource by resource (for information)."""
    wanted: dict[str, set[str]] = {}
    for permission in needed:
        wanted.setdefault(permission.resource, set()).add(permission.operation)
    extra = {res: sorted(set(ops) - wanted.get(res, set())) for res, ops in capability.items()}
    return {res: ops for res, ops in extra.items() if ops}


# -- checks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'ok' if self.ok else 'FAIL':<4}  {self.name:<10}  {self.detail.rstrip('.')}"
        return text if self.ok or not self.fix else f"{text}; fix: {self.fix}"


async def check_redis(settings: Settings) -> Check:
    from redis.exceptions import (
        AuthenticationError,
        ReadOnlyError,
        RedisError,
        ResponseError,
    )

    from worker.redis_client import connect_redis

    where = redact_url(settings.redis_url)
    redis: Any = connect_redis(settings.redis_url, retries=REDIS_RETRIES)
    key = f"{settings.queue_prefix}:doctor:{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await redis.set(key, token, ex=SCRATCH_TTL_S)
            read = await redis.get(key)
            await redis.delete(key)
            if read != token:
                return Check(
                    "redis",
                    False,
                    f"{where}: wrote {key} but read back {read!r}",
                    "check that REDIS_URL names one Redis, not a proxy that splits reads",
                )
            policy = await _eviction_policy(redis)
    except AuthenticationError as exc:
        return Check(
            "redis",
            False,
            f"{where} refused the credentials: {exc}",
            "check the user and password in REDIS_URL",
        )
    except ReadOnlyError:
        return Check(
            "redis", False, f"{where} is read-only (a replica?)", "point REDIS_URL at the primary"
        )
    except ResponseError as exc:  # NOPERM, OOM, a database index it does not have
        return Check(
            "redis",
            False,
            f"{where} refused the command: {exc}",
            "check REDIS_URL, the user's ACL and Redis's memory",
        )
    except TimeoutError:
        return Check(
            "redis",
            False,
            f"no answer from {where} in {CHECK_TIMEOUT_S:.0f} s",
            "check REDIS_URL and the network",
        )
    except (RedisError, OSError) as exc:  # connection refused, DNS, TLS
        return Check(
            "redis",
            False,
            f"cannot reach Redis at {where}: {exc}",
            "check REDIS_URL and that Redis is running",
        )
    finally:
        await _quietly(redis.aclose())
    if policy not in (None, "noeviction"):
        return Check(
            "redis",
            False,
            f"{where} is writable but its maxmemory-policy is "
            f"{policy}: under memory pressure it would evict queued jobs and leases",
            "set maxmemory-policy noeviction (Heroku: heroku redis:maxmemory --policy noeviction)",
        )
    shown = f", maxmemory-policy {policy}" if policy else ""
    return Check(
        "redis",
        True,
        f"{where} reachable and writable (SET/GET/DEL {settings.queue_prefix}:doctor:*){shown}",
    )


async def _eviction_policy(redis: Any) -> str | None:
    """`maxmemory-policy` from INFO, or None where INFO is not allowed."""
    from redis.exceptions import ResponseError

    try:
        info = await redis.info("memory")
    except ResponseError:
        return None
    policy = info.get("maxmemory_policy")
    return str(policy) if policy else None


@dataclass(frozen=True)
class AblyAccess:
    check: Check
    capability: dict[str, list[str]] | None  # None: no token, nothing to compare


async def read_capability(settings: Settings) -> AblyAccess:
    """Ask for a token with the key, as the worker does (token auth, its clientId): Ably
    issues it with the key's whole capability, which the token details carry. A token
    request has no side effect on any channel."""
    from ably import AblyException

    from worker.transport.client import rest_client

    key = settings.ably_api_key.get_secret_value()
    key_name = key.partition(":")[0]
    where = settings.ably_endpoint or "Ably"
    rest = rest_client(key, settings.ably_endpoint)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            token = await rest.auth.request_token({"client_id": settings.worker_id})
    except AblyException as exc:
        refused = exc.status_code in (401, 403) or 40100 <= (exc.code or 0) < 40200
        fix = "check ABLY_API_KEY" if refused else "check ABLY_ENDPOINT and the network"
        said = f"{where} refused key {key_name}" if refused else f"cannot reach {where}"
        return AblyAccess(Check("ably", False, f"{said}: {exc.code} {exc.message}", fix), None)
    except TimeoutError:
        detail = f"no answer from {where} in {CHECK_TIMEOUT_S:.0f} s"
        return AblyAccess(Check("ably", False, detail, "check ABLY_ENDPOINT and the network"), None)
    except Exception as exc:  # the SDK wraps most, not all, transport errors
        detail = f"cannot reach {where}: {type(exc).__name__}: {exc}"
        return AblyAccess(Check("ably", False, detail, "check ABLY_ENDPOINT and the network"), None)
    finally:
        await _quietly(rest.close())
    capability = {resource: sorted(ops) for resource, ops in token.capability.items()}
    detail = f"{where} accepts key {key_name} (token issued for clientId {settings.worker_id})"
    return AblyAccess(Check("ably", True, detail), capability)


def check_capability(
    access: AblyAccess, settings: Settings, conversations: str, key_name: str
) -> Check:
    if access.capability is None:
        return Check(
            "capability",
            False,
            "not checked: no token (see the ably line)",
            "fix the ably check first",
        )
    # LISTEN_CHANNELS outside the conversation resource need the same operations.
    resources = [conversations] + [
        c for c in settings.listen_channel_list if not resource_covers(conversations, c)
    ]
    needed = worker_permissions(resources, settings.presence_channel)
    missing = missing_permissions(access.capability, needed)
    if missing:
        named = ", ".join(_named(p, access.capability) for p in missing)
        fix = (
            "grant the key the least-privilege capability "
            f"{json.dumps(worker_capability(resources, settings.presence_channel))}"
        )
        return Check("capability", False, f"key {key_name} lacks {named}", fix)
    wider = wider_than(access.capability, needed)
    also = f" (and more than it needs: {json.dumps(wider)})" if wider else ""
    scope = " and ".join(json.dumps(r) for r in [*resources, settings.presence_channel])
    return Check(
        "capability",
        True,
        f"key {key_name} grants every operation the worker needs on {scope}{also}",
    )


def _named(missing: Permission, capability: dict[str, list[str]]) -> str:
    said = f"{missing.operation} on {json.dumps(missing.resource)} (Ably error {missing.error}"
    said += f" when the worker {missing.when}"
    own = missing.operation.replace("-any", "-own")
    if own != missing.operation and own in granted_operations(capability, missing.resource):
        said += f"; {own} is not enough: workers have different clientIds"
    return said + ")"


async def check_model(settings: Settings) -> Check:
    import openai

    from worker.model import make_client

    where = settings.openai_base_url or OPENAI_DEFAULT_URL
    client = make_client(
        settings.openai_api_key.get_secret_value(),
        settings.openai_base_url,
        max_retries=0,
        timeout_s=CHECK_TIMEOUT_S,
        aiohttp=False,  # a refused connection named as such, not as a timeout
    )
    try:
        page = await client.models.list()
        ids = [model.id for model in page.data]
    except openai.AuthenticationError as exc:
        return Check(
            "model",
            False,
            f"{where} refused OPENAI_API_KEY ({exc.status_code}"
            f"{f' {exc.code}' if exc.code else ''})",
            "check OPENAI_API_KEY",
        )
    except openai.PermissionDeniedError as exc:
        return Check(
            "model",
            False,
            f"{where} denied GET /models to OPENAI_API_KEY ({exc.status_code})",
            "check the key's project and permissions",
        )
    except openai.APITimeoutError:
        return Check(
            "model",
            False,
            f"no answer from {where} in {CHECK_TIMEOUT_S:.0f} s",
            "check OPENAI_BASE_URL and the network",
        )
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        return Check(
            "model",
            False,
            f"cannot reach {where}: {cause}",
            "check OPENAI_BASE_URL and that the server is running",
        )
    except openai.APIStatusError as exc:
        return Check(
            "model",
            False,
            f"{where} answered GET /models with {exc.status_code}: {exc.message}",
            "check OPENAI_BASE_URL",
        )
    finally:
        await _quietly(client.close())
    if ids and settings.openai_model not in ids:
        listed = ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
        return Check(
            "model",
            False,
            f"{where} answers but does not list OPENAI_MODEL "
            f"{settings.openai_model!r} (it lists {listed})",
            "set OPENAI_MODEL to a model it serves",
        )
    listed = f"lists {len(ids)} models, OPENAI_MODEL {settings.openai_model!r} among them"
    return Check("model", True, f"{where} answers GET /models: {listed if ids else 'no list'}")


async def _quietly(closing: Any) -> None:
    try:
        await asyncio.wait_for(closing, 2)
    except Exception:  # closing a client that never connected: nothing to report
        pass


async def _guarded(name: str, work: Any) -> Any:
    """A check that raised (a bug, an SDK surprise) is one FAIL line, not a traceback."""
    try:
        return await work
    except Exception as exc:
        return Check(name, False, f"the check itself failed: {type(exc).__name__}: {exc}")


async def run_checks(settings: Settings, conversations: str = "*") -> list[Check]:
    """Every check, side by side, in a fixed order."""
    from worker.transport.client import quiet_sdk_logs

    quiet_sdk_logs(logging.CRITICAL)  # failures come back as exceptions, said once each
    key_name = settings.ably_api_key.get_secret_value().partition(":")[0]
    redis, access, model = await asyncio.gather(
        _guarded("redis", check_redis(settings)),
        _guarded("ably", read_capability(settings)),
        _guarded("model", check_model(settings)),
    )
    if isinstance(access, Check):  # read_capability itself raised
        access = AblyAccess(access, None)
    capability = check_capability(access, settings, conversations, key_name)
    return [redis, access.check, capability, model]


def doctor(settings: Settings, conversations: str, echo: Callable[[str], Any] = print) -> int:
    """Run every check, print one line each; 0 when all pass, else 1."""
    register_secrets(*secrets_of(settings))  # whatever an error message quotes
    checks = asyncio.run(run_checks(settings, conversations))
    for check in checks:
        echo(redact(check.line()))
    return 0 if all(check.ok for check in checks) else 1
