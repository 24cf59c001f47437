"""The event loop the worker runs on: uvloop, unless `EVENT_LOOP=asyncio` (a setting)
says otherwise.

uvloop (libuv under asyncio's API) makes the loop's own work (callbacks, timers, socket
reads and writes) cheaper, and the worker is mostly that: many streams of small reads and
writes. asyncio's loop stays one setting away, for a platform without uvloop (Windows)
or to compare the two side by side.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar, get_args

T = TypeVar("T")
Kind = Literal["uvloop", "asyncio"]


def run(main: Coroutine[Any, Any, T], kind: Kind = "uvloop") -> T:
    """`asyncio.run(main)` on the chosen loop (uvloop where it is installed)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # no wheel for this platform: asyncio's own loop
            return asyncio.run(main)
        return uvloop.run(main)
    return asyncio.run(main)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """`--event-loop` for the local servers: uvloop by default, like the worker (every
    frame of every stream passes through them, and on one machine their loops' CPU is
    taken from the worker's), asyncio's own to compare."""
    parser.add_argument("--event-loop", choices=get_args(Kind), default="uvloop")


def name() -> str:
    """The running loop's kind, for the start's log line."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
