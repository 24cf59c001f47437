"""Tokens for users: short-lived Ably JWTs that a backend hands to a browser.

The worker holds the API key (`ABLY_API_KEY`); a browser never does. A backend that
knows who the user is issues them a JWT (Ably's recommended token format) signed with
the key's secret (HS256, `kid` = the key name), which Ably verifies itself:

- `x-ably-clientId`: the user's identity. Ably stamps it on everything the user
  publishes, and refuses a message that claims another (40012): the worker's cancel
  check compares it with the job's `user_client_id`.
- `x-ably-capability`: the user's conversation channels only, each with `subscribe`,
  `history`, `presence` and `publish` (prompts and cancels), nothing else: no
  `message-update-*` or `message-delete-*`, so the agent's answers stay the agent's.
  Channel names are exact: a wildcard (`*`) would reach other users' channels.
- `exp`: at most 24 h after `iat` (Ably's cap on a token's life; a longer one is refused).
- `ably.channel.*`: the user's role, if they have one (a user claim: Ably adds it to that
  client's messages as `extras.userClaim`, which `CANCEL_ROLES` reads).

Two ways in: `user_token()` (and `worker token --client-id ID --channel C ...`), and
`auth_handler()`, an aiohttp handler for the `authUrl` a browser's Ably SDK calls (and
calls again before the token expires).
"""

from __future__ import annotations

import inspect
import json
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

import jwt
from aiohttp import web
from pydantic import SecretStr

from worker.jobs import valid_channel
from worker.logs import get_logger

MAX_TTL_S = 24 * 3600  # Ably refuses a token that lives longer (Sockudo: 40140)
DEFAULT_TTL_S = 3600
# What a user may do on their own conversation channels; publish is for `prompt` and
# `cancel` (Ably cannot narrow publish by message name: the worker ignores other names).
USER_OPERATIONS = ("history", "presence", "publish", "subscribe")
ROLE_CLAIM = "ably.channel.*"  # a user claim on every channel: Ably's `extras.userClaim`
# JWTs travel in HTTP headers and query strings: Ably's docs put the limit at about 8 KB.
MAX_TOKEN_CHARS = 8000
# The content type `authUrl` wants for a JWT (ably-js and ably-python also take text/plain).
JWT_CONTENT_TYPE = "application/jwt"

_TTL_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ROLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,63}$")
_CLIENT_ID_MAX = 256

log = get_logger("worker.tokens")


class TokenError(ValueError):
    """A token cannot be issued as asked; `field` names the argument at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Grant(NamedTuple):
    """Who the user is and what they may reach: what a backend's `who()` returns."""

    client_id: str
    channels: Sequence[str]
    role: str | None = None


def parse_ttl(value: str | float | timedelta) -> int:
    """A token's life in whole seconds: `90s`, `30m`, `1h`, `1d`, a number of seconds, or
    a timedelta; more than 24 h is an error."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise TokenError("ttl", "must be a duration such as 90s, 30m or 1h")
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _TTL_RE.fullmatch(value)
        if not match:
            raise TokenError("ttl", f"{value!r} is not a duration such as 90s, 30m, 1h or 24h")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2).lower()]
    whole = round(seconds)
    if whole < 1:
        raise TokenError("ttl", "must be at least one second")
    if whole > MAX_TTL_S:
        shown = value.strip() if isinstance(value, str) else f"{whole} s"
        raise TokenError("ttl", f"{shown} is longer than 24 h, Ably's cap on a token's life")
    return whole


def user_capability(channels: Iterable[str]) -> dict[str, list[str]]:
    """The capability for a user: their channels, exactly, with `USER_OPERATIONS`."""
    names = _channels(channels)
    return {name: list(USER_OPERATIONS) for name in names}


def user_claims(
    client_id: str,
    channels: Iterable[str],
    *,
    ttl: str | float | timedelta = DEFAULT_TTL_S,
    role: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The JWT's claims for a user (what `user_token` signs)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iat": issued,
        "exp": issued + parse_ttl(ttl),
        "x-ably-clientId": _client_id(client_id),
        "x-ably-capability": json.dumps(user_capability(channels), separators=(",", ":")),
    }
    if role is not None:
        claims[ROLE_CLAIM] = _role(role)
    return claims


def user_token(
    key: str | SecretStr,
    client_id: str,
    channels: Iterable[str],
    *,
    ttl: str | float | timedelta = DEFAULT_TTL_S,
    role: str | None = None,
    now: float | None = None,
) -> str:
    """A user's JWT, signed with the API key `APP.KEYID:SECRET` (`ABLY_API_KEY`).

    Raises `TokenError` (naming the argument) for a bad key, client id, channel, ttl or
    role; the message never contains the key's secret.
    """
    key_name, secret = _split_key(key)
    claims = user_claims(client_id, channels, ttl=ttl, role=role, now=now)
    with warnings.catch_warnings():
        # PyJWT warns about HMAC secrets under 32 bytes. Ably chooses the secret (43
        # characters in production); only a local development key is short.
        warnings.filterwarnings("ignore", message="The HMAC key is", category=UserWarning)
        token = jwt.encode(
            claims, secret, algorithm="HS256", headers={"kid": key_name, "typ": "JWT"}
        )
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError(
            "channels", f"too many for one token ({len(token)} characters, over {MAX_TOKEN_CHARS})"
        )
    return token


GrantLike = Grant | tuple[Any, ...] | None
Who = Callable[[web.Request], GrantLike | Awaitable[GrantLike]]


def auth_handler(
    key: str | SecretStr, who: Who, *, ttl: str | float | timedelta = DEFAULT_TTL_S
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler for Ably's `authUrl`: the signed-in user's JWT as `application/jwt`.

    `who(request)` (plain or async) is the backend's own sign-in check: it returns a
    `Grant` (or a `(client_id, channels[, role])` tuple) for the user, None for nobody
    (401), or raises an `aiohttp.web.HTTPException` of its choice. Whatever the SDK adds
    to the request (`clientId`, `capability`, `ttl` parameters) is ignored: the backend
    alone decides. Mount it for GET (ably-js's default `authMethod`) and POST::

        handler = auth_handler(os.environ["ABLY_API_KEY"], who)
        app.router.add_route("*", "/ably/token", handler)

    The key and ttl are checked here, when the handler is made, not per request.
    """
    _split_key(key)
    lifetime = parse_ttl(ttl)

    async def issue(request: web.Request) -> web.Response:
        found = who(request)
        grant = await found if inspect.isawaitable(found) else found
        if grant is None:
            raise web.HTTPUnauthorized(text="sign in first", headers={"Cache-Control": "no-store"})
        client_id, channels, *rest = grant
        role = rest[0] if rest else None
        try:
            token = user_token(key, client_id, channels, ttl=lifetime, role=role)
        except TokenError as exc:  # the backend's grant is wrong, not the user's request
            log.error("token.refused", client_id=str(client_id)[:64], error=str(exc))
            raise web.HTTPInternalServerError(text="cannot issue a token") from None
        return web.Response(
            text=token, content_type=JWT_CONTENT_TYPE, headers={"Cache-Control": "no-store"}
        )

    return issue


# -- checks ----------------------------------------------------------------------------


def _split_key(key: str | SecretStr) -> tuple[str, str]:
    text = key.get_secret_value() if isinstance(key, SecretStr) else key
    name, sep, secret = (text or "").partition(":")
    app_id, dot, key_id = name.partition(".")
    if not (sep and dot and app_id and key_id and secret):
        raise TokenError("key", "an Ably API key looks like APP.KEYID:SECRET")
    return name, secret


def _client_id(client_id: str) -> str:
    if not isinstance(client_id, str) or not client_id.strip():
        raise TokenError("client_id", "a user token needs the user's client id")
    if client_id == "*":
        raise TokenError("client_id", "'*' would let the user publish as anyone")
    if len(client_id) > _CLIENT_ID_MAX or any(ord(c) < 0x20 or ord(c) == 0x7F for c in client_id):
        raise TokenError("client_id", f"at most {_CLIENT_ID_MAX} characters, no control characters")
    return client_id


def _channels(channels: Iterable[str]) -> list[str]:
    if isinstance(channels, str):
        channels = [channels]  # one channel, not its characters
    names: list[str] = []
    for name in channels:
        if not isinstance(name, str) or not valid_channel(name):
            raise TokenError("channels", f"{name!r} is not a valid channel name")
        if "*" in name or name.startswith("["):
            raise TokenError(
                "channels", f"{name!r}: name each channel exactly (a wildcard or qualifier "
                "would reach other users' channels)"
            )  # fmt: skip
        if name not in names:
            names.append(name)
    if not names:
        raise TokenError("channels", "a user token needs at least one channel")
    return names


def _role(role: str) -> str:
    if not isinstance(role, str) or not _ROLE_RE.fullmatch(role):
        raise TokenError("role", "1-64 letters, digits or . _ : @ / - (as listed in CANCEL_ROLES)")
    return role
