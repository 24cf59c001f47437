"""`python -m worker.devstack.openai_local`: run the server until SIGTERM or SIGINT.

Prints its base URL (for OPENAI_BASE_URL) on one line once it is listening.
"""

from __future__ import annotations

import argparse
import sys

from worker import eventloop, gc_tuning
from worker.devstack.openai_local.options import ServerConfig
from worker.devstack.openai_local.server import OpenAILocalServer
from worker.devstack.processes import stop_on_signals


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, eventloop.Kind]:
    parser = argparse.ArgumentParser(
        prog="python -m worker.devstack.openai_local",
        description="A local OpenAI-compatible server (Responses and Chat Completions).",
    )
    defaults = ServerConfig()
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=8787, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="answer length")
    parser.add_argument(
        "--tokens-per-second", type=float, default=defaults.tokens_per_second, help="0: no delay"
    )
    parser.add_argument("--first-token-ms", type=float, default=defaults.first_token_ms)
    parser.add_argument("--api-key", default=None, help="the only key accepted (default: any)")
    parser.add_argument("--retry-after", type=float, default=defaults.retry_after_s)
    parser.add_argument("--batch-interval-ms", type=float, default=defaults.batch_interval_ms)
    parser.add_argument("--store-size", type=int, default=defaults.store_size)
    eventloop.add_argument(parser)
    args = parser.parse_args(argv)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        tokens=args.tokens,
        tokens_per_second=args.tokens_per_second,
        first_token_ms=args.first_token_ms,
        api_key=args.api_key,
        retry_after_s=args.retry_after,
        batch_interval_ms=args.batch_interval_ms,
        store_size=args.store_size,
    )
    return config, args.event_loop


async def serve(config: ServerConfig) -> None:
    stop = stop_on_signals()
    async with OpenAILocalServer(config) as server:
        gc_tuning.tune()  # every answer's stream comes from here
        print(server.base_url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    config, loop = parse_args(argv)
    eventloop.run(serve(config), loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
