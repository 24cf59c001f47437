"""Free loopback ports for the local servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The listen queue of the local servers: a burst of new connections (a worker taking
# hundreds of jobs at once) overflowed aiohttp's 128, and each dropped connection came back
# a second later (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096
