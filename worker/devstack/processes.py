"""How the devstack runs its servers: detached from the terminal, tied to our life.

Each server gets its own session, so a Ctrl-C meant for the worker (it drains first)
does not stop Redis or Sockudo under it; on Linux each also gets SIGTERM if we die
without stopping it, so a killed test run leaves no server behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import subprocess
import sys
import tempfile
from typing import Any, Self

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not glibc: the server just outlives a killed parent


def server_process_options() -> dict[str, Any]:
    options: dict[str, Any] = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        options["preexec_fn"] = _die_with_parent
    return options


class ChildServer:
    """A local server run as a child process: `start()`, `wait_ready()`, `stop()`, and
    `async with` for all three. Subclasses start `self._proc` and say when it is ready;
    a workdir, if they make one, is removed on stop."""

    _proc: subprocess.Popen[bytes] | None = None
    _workdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        raise NotImplementedError

    async def wait_ready(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        """The running server's process id (fault tests stop and continue it)."""
        assert self._proc is not None, "not started"
        return self._proc.pid

    def exited(self) -> int | None:
        """The exit code if the process has ended (it should not have), else None."""
        return None if self._proc is None else self._proc.poll()

    def kill(self) -> None:
        """Stop the process at once (SIGKILL), keeping its workdir for a restart."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    async def __aenter__(self) -> Self:
        self.start()
        try:
            await self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()


class InProcessServer:
    """A local server on this event loop (aiohttp): `async with` runs `start`/`stop`."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: how each devstack command knows to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
