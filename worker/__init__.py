"""AI Transport worker: Redis prompt jobs streamed as live answers on Ably channels."""

from typing import Any

__version__ = "0.1.0"


async def enqueue(*args: Any, **kwargs: Any) -> tuple[str, bool]:
    """Enqueue a prompt job; see `worker.producer.enqueue`."""
    # Lazy, so `import worker` stays light. (A submodule named `enqueue` would replace
    # this function on the package once imported: hence `producer`.)
    from worker.producer import enqueue as _enqueue

    return await _enqueue(*args, **kwargs)
