"""The local Ably's launcher and installer as a developer uses them from the shell."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp

from worker.devstack.ports import free_port


async def test_local_ably_command_serves_prints_its_endpoint_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.devstack.ably", "--port", str(port),
        "--key", "app.key1:a-longer-secret", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    assert f"ABLY_ENDPOINT=http://127.0.0.1:{port}" in line
    assert "ABLY_API_KEY=app.key1:a-longer-secret" in line
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/time") as resp:
        assert resp.status == 200 and isinstance((await resp.json())[0], int)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    # Sockudo went with it: nothing answers on the port any more.
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(f"http://127.0.0.1:{port}/time"):
                raise AssertionError("sockudo still answers after the launcher stopped")
        except aiohttp.ClientConnectorError:
            pass


def test_a_bad_key_is_refused_by_the_launcher() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.devstack.ably", "--key", "no-colon"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and "APP.KEYID:SECRET" in result.stderr


def test_installer_without_cargo_says_what_to_install(tmp_path: object) -> None:
    # An empty PATH and HOME: no cargo anywhere, so no 15-minute build starts by mistake.
    empty = str(tmp_path)
    env = {**os.environ, "SOCKUDO_HOME": empty, "PATH": empty, "HOME": empty}
    env.pop("SOCKUDO_BIN", None)
    result = subprocess.run(
        [sys.executable, "-m", "worker.devstack.sockudo_install"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cargo was not found" in result.stderr and "Rust toolchain" in result.stderr
