"""The local Ably: Sockudo built with `ably-compat`, configured for one key and started here.

    python -m worker.devstack.ably --port 8080 [--key APP.KEY:SECRET]

prints the endpoint and key once `GET /time` answers, and stops Sockudo on SIGTERM or
SIGINT. Tests use `LocalAbly` as an async context manager on a free port. The worker
reaches it with `ABLY_ENDPOINT=http://127.0.0.1:PORT` and `ABLY_API_KEY=<key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from worker.devstack.ports import free_port
from worker.devstack.processes import ChildServer, server_process_options, stop_on_signals
from worker.devstack.sockudo_install import ensure_installed

DEFAULT_KEY = "dev.local:devsecret"
STARTUP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class AblyKey:
    """An Ably API key `APP.KEYID:SECRET`, split as Sockudo's app config wants it."""

    app_id: str
    key_name: str  # "APP.KEYID": what Ably calls the key name
    secret: str

    @classmethod
    def parse(cls, key: str) -> AblyKey:
        name, sep, secret = key.partition(":")
        app_id, dot, key_id = name.partition(".")
        if not (sep and dot and app_id and key_id and secret):
            raise ValueError("an Ably key looks like APP.KEYID:SECRET")
        return cls(app_id=app_id, key_name=name, secret=secret)

    def __str__(self) -> str:
        return f"{self.key_name}:{self.secret}"


def render_config(
    key: AblyKey,
    host: str,
    port: int,
    stats_flush_interval_ms: int = 0,
    resume_window_s: int = 120,
    extra_keys: dict[str, dict[str, list[str]]] | None = None,
) -> str:
    """A Sockudo configuration for local development: one app, everything in memory.

    Ably compatibility on; every channel takes updates and appends (versioned messages)
    and keeps history (memory backend: Sockudo's default is Postgres); metrics off so
    several servers can run side by side. `extra_keys` adds keys of the same app, each
    limited to an Ably capability (`{"chat:*": ["publish"]}`); the main key can do anything.
    """
    return f"""\
debug = false
host = "{host}"
port = {port}
mode = "development"
shutdown_grace_period = 1
websocket_max_payload_kb = 64
activity_timeout = 120

[adapter]
driver = "local"

[cache]
driver = "memory"

[queue]
driver = "memory"

[rate_limiter]
enabled = false

[metrics]
enabled = false

[app_manager]
driver = "memory"

[[app_manager.array.apps]]
id = "{key.app_id}"
key = "{key.key_name}"
secret = "{key.secret}"
enabled = true

[app_manager.array.apps.policy.limits]
max_connections = 100000
max_client_events_per_second = 100000

[app_manager.array.apps.policy.features]
enable_client_messages = true

[app_manager.array.apps.policy.channels]
allowed_origins = ["*"]

[app_manager.array.apps.policy.idempotency]
enabled = true
ttl_seconds = 300

[app_manager.array.apps.policy.connection_recovery]
enabled = true

# Pages on this machine: ably-js sends REST requests (history) with an `Authorization`
# header, so a browser sends them with credentials and refuses a CORS answer of `*`; the
# answer must name the page's origin and allow credentials, as Ably's does. (SDKs other
# than a browser's send no Origin and are not affected.)
[cors]
origin = ["http://127.0.0.1:*", "http://localhost:*"]
credentials = true

[ably_compat]
enabled = true
# ACK a publish as soon as it is committed (0): Sockudo's default (10 ms) batches ACKs,
# and a burst of more than 32 on one connection overflows its control queue (dropped ACKs).
stats_flush_interval_ms = {stats_flush_interval_ms}

[push]
storage_driver = "memory"
queue_driver = "memory"
allow_memory_drivers = true
fcm_enabled = false
apns_enabled = false
webpush_enabled = false
hms_enabled = false
wns_enabled = false

[versioned_messages]
enabled = true
driver = "memory"
retention_window_seconds = 86400

[history]
enabled = true
rewind_enabled = true
backend = "memory"
retention_window_seconds = 86400
max_messages_per_channel = 10000

[presence_history]
enabled = true

[connection_recovery]
enabled = true
# How long a dropped connection can still be resumed (Ably's is about two minutes).
buffer_ttl_seconds = {resume_window_s}
max_buffer_size = 1000

[idempotency]
enabled = true
ttl_seconds = 300

[ai_transport]
enabled = true

[[ai_transport.channels]]
prefix = "ai:"

[ai_transport.rollup]
enabled = true
default_window_ms = 40
""" + "".join(_extra_key(key, AblyKey.parse(k), cap) for k, cap in (extra_keys or {}).items())


def _extra_key(main: AblyKey, key: AblyKey, capability: dict[str, list[str]]) -> str:
    if key.app_id != main.app_id:
        raise ValueError(f"an extra key must belong to app {main.app_id!r}, not {key.app_id!r}")
    # JSON's string escapes are TOML's basic-string escapes.
    return f"""
[[ably_compat.keys]]
app_id = {json.dumps(key.app_id)}
key_name = {json.dumps(key.key_name)}
secret = {json.dumps(key.secret)}
capability = {json.dumps(json.dumps(capability))}
"""


@dataclass
class LocalAbly(ChildServer):
    """Sockudo as a child process, serving Ably's REST and realtime protocol on one port."""

    port: int = 0
    key: str = DEFAULT_KEY
    host: str = "127.0.0.1"
    log_level: str = "warn"
    stats_flush_interval_ms: int = 0  # Sockudo's ACK batching; see render_config
    resume_window_s: int = 120  # a dropped connection resumes within this, else starts anew
    # More keys of the same app, each limited to a capability: {"APP.K2:S2": {"chat:*": [...]}}
    extra_keys: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Write the configuration and start Sockudo (returns before it is ready)."""
        binary = ensure_installed()
        if not self.port:
            self.port = free_port()
        self._workdir = tempfile.TemporaryDirectory(prefix="local-ably-")
        config = Path(self._workdir.name) / "sockudo.toml"
        key = AblyKey.parse(self.key)
        options = (self.stats_flush_interval_ms, self.resume_window_s, self.extra_keys)
        config.write_text(render_config(key, self.host, self.port, *options))
        # A clean environment: Sockudo reads PORT, REDIS_URL and many more from it.
        env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": self.log_level}
        self._proc = subprocess.Popen(
            [str(binary), "--config", str(config)],
            cwd=self._workdir.name,
            env=env,
            **server_process_options(),
        )

    async def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Poll `GET /time` until it answers; fail if Sockudo exits or never answers."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if (code := self.exited()) is not None:
                    raise RuntimeError(f"sockudo exited with code {code}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"{self.endpoint}/time") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"sockudo did not answer GET {self.endpoint}/time in {timeout:.0f} s")


async def _serve(server: LocalAbly) -> None:
    stop = stop_on_signals()
    async with server:
        print(f"local Ably ready: ABLY_ENDPOINT={server.endpoint} ABLY_API_KEY={server.key}",
              flush=True)  # fmt: skip
        stop_task = asyncio.create_task(stop.wait())
        while not stop_task.done():
            await asyncio.wait({stop_task}, timeout=0.5)
            if (code := server.exited()) is not None:
                raise SystemExit(f"sockudo exited with code {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--key", default=DEFAULT_KEY, help="APP.KEYID:SECRET")
    parser.add_argument("--log-level", default="warn", help="Sockudo's RUST_LOG filter")
    args = parser.parse_args(argv)
    try:
        AblyKey.parse(args.key)
    except ValueError as exc:
        parser.error(f"--key: {exc}")
    server = LocalAbly(port=args.port, key=args.key, host=args.host, log_level=args.log_level)
    asyncio.run(_serve(server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
