"""A real `redis-server` as a child process on a free port, for tests and `worker dev`.

The binary is `REDIS_SERVER_BIN` or `redis-server` on PATH. Nothing is kept on disk unless
`appendonly` is asked for (tests that restart Redis and expect the data back ask for it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from worker.devstack.ports import free_port
from worker.devstack.processes import ChildServer, server_process_options
from worker.redis_client import connect_redis


def redis_server_binary() -> str:
    binary = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
    if not binary:
        raise RuntimeError(
            "redis-server not found: install it (`apt-get install redis-server`) "
            "or set REDIS_SERVER_BIN"
        )
    return binary


@dataclass
class LocalRedis(ChildServer):
    """`async with LocalRedis() as r: r.url` — a private redis-server, stopped on exit."""

    port: int = 0
    appendonly: bool = False
    tls: bool = False  # serve rediss:// with a self-signed certificate, as Heroku Redis does
    password: str | None = None  # `requirepass`, as hosted Redis has

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="local-redis-")
        listen = ["--port", str(self.port)] if not self.tls else [
            "--port", "0", "--tls-port", str(self.port), *self._self_signed(self._workdir.name),
        ]  # fmt: skip
        args = [
            redis_server_binary(),
            *listen, "--bind", "127.0.0.1",
            "--dir", self._workdir.name, "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--loglevel", "warning",
            *(["--requirepass", self.password] if self.password else []),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, **server_process_options())

    @staticmethod
    def _self_signed(directory: str) -> list[str]:
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
            check=True, capture_output=True,
        )  # fmt: skip
        return ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert,
                "--tls-auth-clients", "no"]  # fmt: skip

    async def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = connect_redis(self.url, retries=0)
        try:
            while True:
                if (code := self.exited()) is not None:
                    raise RuntimeError(f"redis-server exited with code {code}")
                try:
                    if await client.ping():
                        return
                except (OSError, aioredis.ConnectionError):
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def restart(self) -> None:
        self.kill()
        self.start()
        await self.wait_ready()
