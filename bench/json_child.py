"""A benchmark's child process, spoken to in JSON lines over stdin/stdout."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


class JsonChild:
    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    @classmethod
    async def start(cls, script: str, spec: dict[str, Any], name: str, **options: Any) -> JsonChild:
        """Run `script --child SPEC`; `options` go to create_subprocess_exec."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, script, "--child", json.dumps(spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, **options,
        )  # fmt: skip
        return cls(proc, name)

    async def read(self, timeout: float) -> dict[str, Any]:
        return await read_json_line(self.proc, self.name, timeout)

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self, wait_s: float, *, raise_if_killed: bool = False) -> None:
        """Close its stdin and let it exit; kill it if it has not within `wait_s`."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), wait_s)
        except (TimeoutError, asyncio.CancelledError):
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
            if raise_if_killed:
                raise


async def read_json_line(
    proc: asyncio.subprocess.Process, name: str, timeout: float
) -> dict[str, Any]:
    """The child's next JSON line on stdout; an error naming it if it exited instead."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise RuntimeError(f"{name} {proc.pid} exited ({await proc.wait()})")
    return dict(json.loads(line))
