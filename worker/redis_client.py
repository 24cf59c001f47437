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
from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError


class _RetryExceptAuth(Retry):
    """Retry what a restart or failover causes, not a refused password: redis-py makes
    AuthenticationError a ConnectionError, and retrying it only delays the message."""

    async def call_with_retry(
        self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False
    ) -> Any:
        def retryable(error: Exception) -> bool:
            if isinstance(error, AuthenticationError):
                return False
            return is_retryable is None or is_retryable(error)

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


# Above the longest blocking read the worker makes (XREADGROUP BLOCK 1000 ms), so only a
# call that hangs (a stalled server, a half-open connection) runs into it.
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0
# A process's connections are bounded, and a command waits for a free one (up to this)
# rather than failing: redis-py refuses a command once 100 are in use (MaxConnectionsError),
# which hundreds of concurrent answers writing their progress reached, and hosted Redis
# plans cap connections per server. Redis runs commands one at a time: more connections
# than a few dozen add nothing but memory.
MAX_CONNECTIONS = 32
POOL_WAIT_S = 10.0


def connect_redis(
    url: str, *, retries: int = 8, max_connections: int = MAX_CONNECTIONS
) -> aioredis.Redis:
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": 15,
        "socket_keepalive": True,
        "retry": _RetryExceptAuth(ExponentialBackoff(cap=2.0, base=0.05), retries),
        "retry_on_error": [ConnectionError, TimeoutError, OSError],
    }
    if url.startswith("rediss://"):
        options["ssl_cert_reqs"] = None
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, **options
    )
    return aioredis.Redis.from_pool(pool)
