"""The ably-js half of the conformance suite: the unmodified npm `ably` against the local Ably.

Each test runs one named check of `tests/js/conformance.mjs` in Node against the session's
Sockudo and asserts that it passed; the check's JSON detail (what the SDK saw) is shown on
failure. The checks themselves, and the differences from Ably's documentation that they
observed, are described in that script.

Needs Node (20 or newer) and npm. `tests/js/node_modules` is installed with `npm ci` from
the committed lock file the first time it is missing or older than the lock.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from worker.devstack.ably import LocalAbly

JS_DIR = Path(__file__).parent / "js"
SCRIPT = JS_DIR / "conformance.mjs"
CHECK_TIMEOUT_MS = 20_000  # inside the script, per check
PROCESS_TIMEOUT_S = 60.0  # the whole Node process, a margin over the check's own timeout

CHECKS = [
    "connect-json",
    "connect-msgpack",
    "connect-token-auth",
    "appends-live",
    "appends-mid-stream",
    "append-headers",
    "rewind",
    "history",
    "presence",
    "capability-denied",
]


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is not on PATH: the ably-js conformance checks need Node.js 20+ and npm "
            "(https://nodejs.org, or `apt-get install nodejs npm`)",
            pytrace=False,
        )
    return node


@pytest.fixture(scope="session")
def ablyjs_installed() -> str:
    """Node's path, with tests/js/node_modules installed from the lock file (npm ci) if needed."""
    node = _node()
    installed = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(
                "npm is not on PATH: it installs ably-js for the conformance checks", pytrace=False
            )
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci in {JS_DIR} failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
    return node


async def _run_script(
    node: str, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        *args,
        cwd=JS_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(
            f"node {SCRIPT.name} {' '.join(args)} ran over {PROCESS_TIMEOUT_S:.0f} s\n"
            f"stdout:\n{out.decode()}\nstderr:\n{err.decode()}"
        )
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _results(stdout: str) -> list[dict[str, Any]]:
    results = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            results.append(json.loads(line))
    return results


async def test_check_list_matches_script(ablyjs_installed: str) -> None:
    """The names parametrized here are exactly the script's checks: none forgotten."""
    code, out, err = await _run_script(ablyjs_installed, "--list")
    assert code == 0, err
    assert out.split() == CHECKS


# "basic": clients holding the key use Basic auth, which ably-js 2.x allows over plain HTTP;
# "token": they use token auth (`useTokenAuth: true`), as a production front end would.
@pytest.mark.parametrize("auth", ["basic", "token"])
@pytest.mark.parametrize("check", CHECKS)
async def test_ablyjs(
    check: str, auth: str, ablyjs_installed: str, local_ably: LocalAbly, channel_name: str
) -> None:
    env = {
        **os.environ,
        "ABLY_ENDPOINT": local_ably.endpoint,
        "ABLY_API_KEY": local_ably.key,
        "CHANNEL_PREFIX": channel_name,
        "CHECK_TIMEOUT_MS": str(CHECK_TIMEOUT_MS),
        "ABLY_USE_TOKEN_AUTH": "1" if auth == "token" else "0",
    }
    code, out, err = await _run_script(ablyjs_installed, check, env=env)
    results = _results(out)
    assert [r.get("check") for r in results] == [check], (
        f"expected one result line for {check!r}; exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    )
    result = results[0]
    detail = json.dumps(result.get("detail"), indent=2, ensure_ascii=False)
    assert result["ok"], f"ably-js check {check!r} failed:\n{detail}\nstderr:\n{err}"
    assert code == 0, f"the check passed but node exited {code}\nstderr:\n{err}"
