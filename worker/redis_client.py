"""The one way the project opens a Redis connection.

Retries ride out a Redis restart or failover (the queue's commands are safe to resend:
each is a script or a transaction). `rediss://` URLs skip certificate verification,
because Heroku Redis serves a self-signed certificate.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError


def connect_redis(url: str, *, retries: int = 8) -> aioredis.Redis:
    options: dict[str, Any] = {
        "decode_responses": True,
        "health_check_interval": 15,
        "socket_keepalive": True,
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries),
        "retry_on_error": [ConnectionError, TimeoutError, OSError],
    }
    if url.startswith("rediss://"):
        options["ssl_cert_reqs"] = None
    return aioredis.Redis.from_url(url, **options)
