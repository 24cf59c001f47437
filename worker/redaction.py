"""Secrets out of every line the worker writes: log lines, `error:` lines, `status`.

Two nets, applied to finished text:

- **by value**: the process knows its own secrets (the Ably key's secret, the OpenAI
  key, the Redis password). `register_secrets` adds them at start; every occurrence,
  also JSON-escaped or URL-encoded, becomes `[redacted]`.
- **by shape**, for what the process never chose (the tokens the Ably SDK obtains, a
  URL an SDK error quotes): a URL's password (`redis://user:***@host`), secret query
  parameters (`accessToken=`, `access_token=`, `key=`, `password=`, ...), bearer and
  basic credentials, and JWTs (`eyJ...`).

Both are one precompiled regular expression each, run over a line only when a cheap
substring test says it may match, so an ordinary log line costs a few microseconds.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

REDACTED = "[redacted]"
URL_PASSWORD = "***"  # what a URL's password shows as (`worker doctor` prints the same)

# Shorter values are not registered: replacing every "ab" in every line would garble the
# logs, and a secret that short is no secret.
MIN_SECRET_CHARS = 4

# The query parameters whose values are credentials wherever they appear.
_SECRET_PARAMS = (
    "access_token|accesstoken|token|key|api_key|apikey|password|passwd|secret|client_secret"
)

_SHAPES = re.compile(
    # a URL's userinfo password: scheme://user:PASSWORD@ (greedy to the last @ of the
    # authority, as urlsplit reads it)
    r"(?P<userinfo>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@\"'<>]*:)[^\s/\"'<>]+(?=@)"
    # a secret query parameter (or form field): ?accessToken=VALUE
    rf"|(?P<param>[?&;](?i:{_SECRET_PARAMS})=)[^&\s\"'<>#]+"
    # an Authorization header's credentials
    r"|(?P<scheme>(?i:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}"
    # a JWT (header.payload.signature, the first two base64url JSON objects)
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"
)
# Substrings without which none of `_SHAPES` can match (checked first: cheaper than a scan).
_SHAPE_HINTS = ("://", "=", "eyJ", "earer ", "asic ", "EARER ", "ASIC ")


def _shape(match: re.Match[str]) -> str:
    if match.group("userinfo"):
        return match.group("userinfo") + URL_PASSWORD
    if match.group("param"):
        return match.group("param") + REDACTED
    if match.group("scheme"):
        return match.group("scheme") + REDACTED
    return REDACTED


class Secrets:
    """The values this process must never write, as one pattern."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def register(self, *values: str | None) -> None:
        added = False
        for value in values:
            if not value or len(value) < MIN_SECRET_CHARS:
                continue
            for form in _forms(value):
                if form not in self._values:
                    self._values.add(form)
                    added = True
        if added:
            # Longest first, so a value that contains another is replaced whole.
            alternatives = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, alternatives)))

    def clear(self) -> None:
        self._values.clear()
        self._pattern = None

    def redact(self, text: str) -> str:
        pattern = self._pattern
        return text if pattern is None else pattern.sub(REDACTED, text)


def _forms(value: str) -> list[str]:
    """How a value may appear in a line: as is, escaped in JSON, encoded in a URL."""
    return list(
        dict.fromkeys([value, json.dumps(value)[1:-1], quote(value, safe=""), quote_plus(value)])
    )


SECRETS = Secrets()


def register_secrets(*values: str | None) -> None:
    """Never write these (the process's own keys and passwords) anywhere again."""
    SECRETS.register(*values)


def redact(text: str) -> str:
    """`text` with every registered secret and every credential-shaped part replaced."""
    text = SECRETS.redact(text)
    if any(hint in text for hint in _SHAPE_HINTS):
        text = _SHAPES.sub(_shape, text)
    return text


def redact_url(url: str) -> str:
    """A URL fit to print: its password (userinfo or `?password=`) as `***`."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, _password = userinfo.partition(":")
            netloc = f"{user}:{URL_PASSWORD}@{hostport}" if sep else f"{user}@{hostport}"
        query = urlencode(
            [(k, URL_PASSWORD if _is_secret_param(k) else v) for k, v in parse_qsl(parts.query)],
            safe="*",
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not a URL urlsplit can read: redact what looks like one
        return redact(url)


def url_secrets(url: str) -> list[str]:
    """The password(s) a URL carries: in its userinfo, or as a `?password=` parameter."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        found.append(parts.password or "")
        found += [v for k, v in parse_qsl(parts.query) if _is_secret_param(k)]
    except ValueError:  # malformed: take what sits between the last ':' and '@'
        authority = url.partition("://")[2].partition("/")[0]
        userinfo = authority.rpartition("@")[0]
        found.append(userinfo.partition(":")[2])
    return [value for value in found if value]


def _is_secret_param(name: str) -> bool:
    return re.fullmatch(_SECRET_PARAMS, name, re.IGNORECASE) is not None


def secrets_of(settings: Any) -> list[str]:
    """The secrets a settings object carries (`Settings`, `RedisSettings`, `AblySettings`):
    the Ably key's secret half (its name is not secret), the OpenAI key, the Redis
    password."""
    found: list[str] = []
    for name in ("ably_api_key", "openai_api_key"):
        value = getattr(settings, name, None)
        if value is not None and hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, str) and value:
            found.append(value.partition(":")[2] if name == "ably_api_key" else value)
    redis_url = getattr(settings, "redis_url", None)
    if isinstance(redis_url, str):
        found += url_secrets(redis_url)
    return found
