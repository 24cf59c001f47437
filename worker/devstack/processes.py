"""How the devstack starts its servers: detached from the terminal, tied to our life.

Each server gets its own session, so a Ctrl-C meant for the worker (it drains first)
does not stop Redis or Sockudo under it; on Linux each also gets SIGTERM if we die
without stopping it, so a killed test run leaves no server behind.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from typing import Any

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
