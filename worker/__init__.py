"""AI Transport worker: Redis prompt jobs streamed as live answers on Ably channels."""

__version__ = "0.1.0"
