"""AI Transport worker: Redis prompt jobs streamed as live answers on Ably channels."""

from typing import Any

__version__ = "0.1.0"


async def enqueue(*args: Any, **kwargs: Any) -> tuple[str, bool]:
    """Enqueue a prompt job; see `worker.enqueue.enqueue`."""
    from worker.enqueue import enqueue as _enqueue  # lazy: `import worker` stays light

    return await _enqueue(*args, **kwargs)
